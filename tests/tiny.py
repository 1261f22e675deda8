"""Small configs, states and batches the step tests share (tiny synthetic shapes, 4 forced CPU devices)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from dgcl_jax import dgcl
from dgcl_jax import state as state_lib
from dgcl_jax.step import StepFunctions

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(_ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def tiny_config(method="dgcl"):
  config = load_config("synthetic", method)
  config.batch_size = 4
  config.num_slices = 2
  config.data.crop_size = 32
  config.data.val_crop_size = 32
  config.data.synthetic_image_size = 32
  config.data.synthetic_num_labeled = 8
  config.data.synthetic_num_unlabeled = 16
  config.data.synthetic_num_val = 8
  config.model.base_width = 8
  config.model.decoder_channels = 16
  config.model.low_level_channels = 8
  config.model.rep_dim = 16
  config.num_epochs = 2
  config.sup_only_epochs = 1
  config.dgcl.bank_capacity = 40
  config.dgcl.max_new_per_class = 30
  config.dgcl.density_min_entries = 30
  config.dgcl.max_pixels = 200
  config.dgcl.num_anchors = 20
  config.dgcl.num_positives = 10
  config.dgcl.num_negatives = 32
  config.dgcl.ks = (2, 4, 8)
  return config


_STATE_CACHE = {}


def initial_state(config):
  """create_train_state for `config`, cached as host arrays (init compiles slowly on CPU)."""
  key = config.to_json()
  if key not in _STATE_CACHE:
    state = state_lib.create_train_state(config, jax.random.PRNGKey(0))
    _STATE_CACHE[key] = jax.tree_util.tree_map(np.asarray, state)
  return _STATE_CACHE[key]


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, c, k = config.batch_size, config.data.crop_size, config.model.num_classes
  ignore = np.zeros((b, c, c), np.int32)
  ignore[:, :, -3:] = 255
  labels = rng.integers(0, k, (b, c, c)).astype(np.int32)
  labels[:, :2] = 255
  # Spatially smooth labels so every class has enough pixels at stride 4.
  labels[:, 2:] = (np.arange(c)[None, None, :] * k // c + np.arange(b)[:, None, None]) % k
  return {
      "labeled_image": rng.normal(size=(b, c, c, 3)).astype(np.float32),
      "labeled_label": labels,
      "unlabeled_image": rng.normal(size=(b, c, c, 3)).astype(np.float32),
      "unlabeled_ignore": ignore,
  }


_FNS_CACHE = {}


def step_functions(config, num_devices):
  """StepFunctions on the first `num_devices` devices, shared by tests so each step compiles once."""
  key = (config.to_json(), num_devices)
  if key not in _FNS_CACHE:
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    _FNS_CACHE[key] = StepFunctions(state_lib.Parts.create(config, steps_per_epoch=4), mesh)
  return _FNS_CACHE[key]


def run_steps(config, num_devices, num_steps, semi, state=None, seed=0):
  fns = step_functions(config, num_devices)
  if state is None:
    state = initial_state(config)
  # Host copy first: train_step donates its state, and the caller may reuse `state`.
  state = jax.device_put(jax.tree_util.tree_map(np.asarray, state), fns.replicated)
  history = []
  for i in range(num_steps):
    batch = jax.device_put(random_batch(config, seed + i), fns.batch_sharding)
    state, metrics, _ = fns.train_step(state, batch, semi=semi)
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


def full_bank(config, seed=0):
  rng = np.random.default_rng(seed)
  g, m = config.dgcl, config.model
  bank = dgcl.MemoryBank.create(m.num_classes, g.bank_capacity, m.decoder_channels, m.rep_dim)
  return bank.replace(
      fts=jnp.asarray(rng.normal(size=bank.fts.shape), jnp.float32),
      rep=jnp.asarray(rng.normal(size=bank.rep.shape), jnp.float32),
      density=jnp.asarray(rng.uniform(size=bank.density.shape), jnp.float32),
      count=jnp.full(bank.count.shape, g.bank_capacity, bank.count.dtype))
