"""The TrainState, the static parts of training it is made with, and its creation.

`Parts` builds the networks, the optimizer and the epoch length once per run; the step functions
(step.py) and the initial state both take them from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
from flax.training import dynamic_scale
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dgcl_jax import config_base
from dgcl_jax import dgcl
from dgcl_jax import models
from dgcl_jax import schedules


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpointed whole."""
  step: jax.Array                 # int32 [], optimizer steps taken
  params: Any                     # student parameters
  batch_stats: Any                # student BN running statistics
  teacher_params: Any             # EMA of the student's parameters
  teacher_batch_stats: Any        # the teacher's own BN statistics (never averaged)
  opt_state: Any
  memory_bank: dgcl.MemoryBank
  rng: jax.Array                  # raw uint32 [2] key; step keys are fold_in(rng, step)
  loss_scale: dynamic_scale.DynamicScale   # float16 student only (scale and finite-step count)


def teacher_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher runs in float32 whatever the student's compute dtype (REFERENCE s.3)."""
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.dtype = "float32"
  return cfg


def total_steps(config, steps_per_epoch: int | None = None) -> int:
  """num_epochs x the epoch length (read from the split lists when not given)."""
  if steps_per_epoch is None:
    from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    steps_per_epoch = pipeline.steps_per_epoch(config)
  return int(config.num_epochs) * int(steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class Parts:
  """What training is built from, made once: the networks, the optimizer, the epoch length.

  student: the network in config.model.dtype; teacher: its float32 build (also the one that
  evaluates either's variables); max_iter: the run's total number of steps.
  """
  config: Any
  steps_per_epoch: int
  max_iter: int
  student: Any
  teacher: Any
  optimizer: optax.GradientTransformation

  @classmethod
  def create(cls, config, steps_per_epoch: int | None = None) -> "Parts":
    if steps_per_epoch is None:
      from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      steps_per_epoch = pipeline.steps_per_epoch(config)
    max_iter = total_steps(config, steps_per_epoch)
    return cls(config=config, steps_per_epoch=int(steps_per_epoch), max_iter=max_iter,
               student=models.build(config.model), teacher=models.build(teacher_model_config(config.model)),
               optimizer=schedules.make_optimizer(config, max_iter))


def make_loss_scale(config) -> dynamic_scale.DynamicScale:
  """Dynamic loss scale as the reference's GradScaler (REFERENCE s.3 step 1): start
  optim.loss_scale_init, halve on a non-finite gradient (the step is skipped), double after
  optim.loss_scale_growth_interval finite steps in a row. Used with model.dtype='float16'."""
  o = config.optim
  # Flax grows on the step that finds `growth_interval` finite steps behind it, the
  # GradScaler after the `growth_interval`-th finite step: one less here gives the same scales.
  return dynamic_scale.DynamicScale(
      growth_factor=2.0, backoff_factor=0.5, growth_interval=int(o.loss_scale_growth_interval) - 1,
      fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(o.loss_scale_init, jnp.float32))


def _init_variables(module, rng):
  variables = models.init_variables(module, rng)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def empty_memory_bank(config) -> dgcl.MemoryBank:
  """The bank `config` trains with (entries as wide as the network's fts and rep, models.feature_dims);
  a 1-entry placeholder without the contrastive loss (the state's structure stays uniform at
  negligible cost)."""
  m = config.model
  if config.method == "dgcl":
    fts_dim, rep_dim = models.feature_dims(m)
    return dgcl.MemoryBank.create(m.num_classes, config.dgcl.bank_capacity, fts_dim, rep_dim)
  return dgcl.MemoryBank.create(m.num_classes, 1, 1, 1)


def create_train_state(config, rng: jax.Array, *, parts: Parts | None = None,
                       load_pretrained: bool = True) -> TrainState:
  """Initial state: student and teacher initialized separately, empty memory bank; the
  pretrained backbone (config.model.pretrained) loaded into both unless `load_pretrained` is False."""
  parts = Parts.create(config) if parts is None else parts
  student_rng, teacher_rng, state_rng = jax.random.split(rng, 3)
  student_vars = _init_variables(parts.student, student_rng)
  teacher_vars = _init_variables(parts.teacher, teacher_rng)
  pretrained = config_base.pretrained_dir(config) if load_pretrained else None
  if pretrained:
    from dgcl_jax import convert  # pylint: disable=g-import-not-at-top
    student_vars = convert.load_pretrained(pretrained, student_vars)
    teacher_vars = convert.load_pretrained(pretrained, teacher_vars)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=student_vars["params"], batch_stats=student_vars["batch_stats"],
      teacher_params=teacher_vars["params"], teacher_batch_stats=teacher_vars["batch_stats"],
      opt_state=parts.optimizer.init(student_vars["params"]),
      memory_bank=empty_memory_bank(config), rng=state_rng, loss_scale=make_loss_scale(config))


def abstract_train_state(config, parts: Parts, sharding) -> TrainState:
  """ShapeDtypeStructs (with `sharding`) of the state `config` trains: what a checkpoint restores into."""
  abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(config.seed), parts=parts,
                                                       load_pretrained=False))
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
