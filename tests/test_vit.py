"""DINOv2 ViT + DPT head (models/vit.py, models/dpt.py) and their torch converters (convert_vit.py).

Parity data: tests/data/dpt_small_reference.npz, what UniMatch V2's own DPT (ViT-S/14, features 64)
computes with formula weights built from tests/data/dpt_small_state_dict_keys.json (see tests/data/README.md).
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgcl_jax import config_base, convert_vit, models, ops
from dgcl_jax.models import vit

_DATA = os.path.join(os.path.dirname(__file__), "data")
_KEYS = os.path.join(_DATA, "dpt_small_state_dict_keys.json")
_REFERENCE = os.path.join(_DATA, "dpt_small_reference.npz")


def _model_config(size="small", **overrides):
  m = config_base.model_config()
  m.arch = "dpt"
  m.vit = size
  m.rep_dim = 32 if size == "tiny" else m.rep_dim
  m.num_classes = 5 if size == "tiny" else m.num_classes
  for k, v in overrides.items():
    setattr(m, k, v)
  return m


@functools.lru_cache(maxsize=None)
def _key_list():
  with open(_KEYS) as f:
    return tuple((k, tuple(s)) for k, s in json.load(f)["keys"])


def _formula_state_dict(keys):
  """The fixture's weights: each tensor a formula of its key's position and shape (tests/data/README.md)."""
  sd = {}
  for i, (key, shape) in enumerate(keys):
    n = math.prod(shape)
    base = np.sin(0.37 * np.arange(n, dtype=np.float64) + 1.3 * i)
    if key.endswith("num_batches_tracked"):
      value = np.zeros(n)
    elif key.endswith("running_var"):
      value = 1 + 0.25 * (base + 1)
    elif key.endswith(("ls1.gamma", "ls2.gamma")):
      value = 0.1 + 0.05 * base
    elif key.endswith(".weight") and len(shape) == 1:
      value = 1 + 0.1 * base
    elif len(shape) >= 2 and not key.endswith(("cls_token", "pos_embed", "mask_token")):
      value = base * np.sqrt(2 / (n / shape[0]))
    else:
      value = 0.02 * base
    sd[key] = value.astype(np.float32).reshape(shape)
  return sd


def _release_keys(width=384):
  """The DINOv2 release checkpoint's keys: the fixture's 'backbone.' ones, widths scaled from ViT-S's 384."""
  return [(k[len("backbone."):], tuple(d * width // 384 if d % 384 == 0 else d for d in s))
          for k, s in _key_list() if k.startswith("backbone.")]


def _shapes(m):
  module = models.build(m)
  return jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0)))


def _filled(m, fill=0.0):
  return jax.tree_util.tree_map(lambda s: jnp.full(s.shape, fill, s.dtype), _shapes(m))


@functools.lru_cache(maxsize=None)
def _tiny_variables():
  """Random variables of the tiny variant, from shapes alone (an init compile costs seconds)."""
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['var']", "['scale']", "['gamma']")):
      return jnp.asarray(1.0 + rng.uniform(0.0, 0.2, s.shape), s.dtype)
    std = 0.2 if len(s.shape) < 2 else 1.0 / math.sqrt(math.prod(s.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(_model_config("tiny")))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  return msg


@pytest.fixture(scope="module")
def small():
  m = _model_config("small")
  sd = _formula_state_dict(_key_list())
  return m, sd, convert_vit.from_torch_vit(sd, _filled(m, 7.0))


def test_fixture_parity_backbone_fused_and_pred(small):
  m, _, variables = small
  ref = np.load(_REFERENCE)
  images = jnp.asarray(ref["input"].transpose(0, 2, 3, 1))
  module = models.build(m)
  capture = lambda mdl, method: mdl.name == "backbone"
  out, inter = jax.jit(lambda v, x: module.apply(v, x, train=False, capture_intermediates=capture))(variables, images)
  layers = inter["intermediates"]["backbone"]["__call__"][0]
  errors = {f"layer{i}": _rel(np.asarray(layers[i]).reshape(1, 49, 384), ref[f"layer{i}"]) for i in range(4)}
  assert out["fts"].shape == (1, 56, 56, 64) and out["pred"].shape == (1, 56, 56, 21)
  errors["fused"] = _rel(np.asarray(out["fts"]).transpose(0, 3, 1, 2), ref["fused"])
  pred = ops.resize_bilinear_align_corners(out["pred"], (98, 98))
  errors["pred"] = _rel(np.asarray(pred).transpose(0, 3, 1, 2), ref["pred"])
  assert out["rep"].shape == (1, 56, 56, m.rep_dim)
  assert max(errors.values()) <= 1e-4, errors


def _bicubic_reference(grid, out_h, out_w, factor_h, factor_w, a=-0.75):
  """torch bicubic (align_corners=False, scale factors given), one output pixel at a time, float64."""
  def weight(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

  n_h, n_w = grid.shape[:2]
  out = np.zeros((out_h, out_w, grid.shape[2]))
  for i in range(out_h):
    sy = (i + 0.5) / factor_h - 0.5
    y0 = math.floor(sy)
    for j in range(out_w):
      sx = (j + 0.5) / factor_w - 0.5
      x0 = math.floor(sx)
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          w = weight(sy - y0 - dy) * weight(sx - x0 - dx)
          out[i, j] += w * grid[min(max(y0 + dy, 0), n_h - 1), min(max(x0 + dx, 0), n_w - 1)]
  return out


@pytest.mark.parametrize("h, w", [(3, 4), (8, 6), (2, 9)])
def test_pos_embed_interpolation_matches_numpy_bicubic(h, w):
  n, c = 5, 3
  pos = np.random.default_rng(0).normal(size=(1, 1 + n * n, c)).astype(np.float32)
  got = np.asarray(vit.interpolate_pos_embed(jnp.asarray(pos), h, w))
  # DINOv2: scale factors (grid + 0.1) / n, the output size floor(n * factor) = grid.
  want = _bicubic_reference(pos[0, 1:].reshape(n, n, c).astype(np.float64), h, w, (h + 0.1) / n, (w + 0.1) / n)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  np.testing.assert_allclose(got[0, 1:].reshape(h, w, c), want, rtol=1e-5, atol=1e-5)
  # Same-size grid: DINOv2 returns the stored embedding without interpolating.
  np.testing.assert_array_equal(np.asarray(vit.interpolate_pos_embed(jnp.asarray(pos), n, n)), pos)


def test_bicubic_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  n = 6
  grid = np.random.default_rng(1).normal(size=(1, 2, n, n)).astype(np.float32)
  for h, w in ((4, 9), (11, 3)):
    fy, fx = vit.pos_embed_factors(n, h, w)
    want = torch.nn.functional.interpolate(torch.from_numpy(grid), scale_factor=(fy, fx), mode="bicubic",
                                           antialias=False).numpy()
    got = np.einsum("ij,kl,bcjl->bcik", vit.torch_bicubic_matrix(n, h, fy), vit.torch_bicubic_matrix(n, w, fx), grid)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, width", [("small", 384), ("base", 768)])
def test_release_checkpoint_keys_convert_into_the_backbone(size, width):
  m = _model_config(size)
  shapes = _shapes(m)
  sd = {k: np.full(s, 0.5, np.float32) for k, s in _release_keys(width)}
  assert "mask_token" in sd and "blocks.11.ls2.gamma" in sd
  sd["blocks.3.attn.qkv.weight"] = np.arange(3 * width * width, dtype=np.float32).reshape(3 * width, width)
  v = convert_vit.load_dinov2_backbone(sd, shapes)
  backbone = jax.tree_util.tree_leaves(v["params"]["backbone"])
  assert all(isinstance(x, jax.Array) for x in backbone)       # every backbone leaf came from the file
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(v["params"]["head"]))
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, shapes))
  np.testing.assert_array_equal(v["params"]["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"],
                                sd["blocks.3.attn.qkv.weight"].T)


def test_wrong_shape_is_a_one_line_error_naming_the_key(small):
  m, sd, _ = small
  bad = dict(sd)
  bad["backbone.blocks.3.mlp.fc1.weight"] = sd["backbone.blocks.3.mlp.fc1.weight"].T
  with pytest.raises(ValueError) as excinfo:
    convert_vit.from_torch_vit(bad, _shapes(m))
  msg = _one_line(excinfo)
  assert "backbone.blocks.3.mlp.fc1.weight has shape (384, 1536), the model expects (1536, 384)" in msg
  base = {k: np.zeros(s, np.float32) for k, s in _release_keys(768)}
  with pytest.raises(ValueError) as excinfo:
    convert_vit.load_dinov2_backbone(base, _shapes(m))
  msg = _one_line(excinfo)
  assert "has shape (768,), the model expects (384,)" in msg
  assert "the state dict is a ViT of width 768 (base), the model 384 (small): check model.vit" in msg


def test_missing_and_unexpected_keys_are_named(small):
  m, sd, _ = small
  bad = {k: a for k, a in sd.items() if k != "head.scratch.layer2_rn.weight"}
  bad["head.scratch.refinenet5.out_conv.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as excinfo:
    convert_vit.from_torch_vit(bad, _shapes(m))
  msg = _one_line(excinfo)
  assert "missing 1 keys: head.scratch.layer2_rn.weight" in msg
  assert "unexpected 1 keys: head.scratch.refinenet5.out_conv.weight" in msg
  with pytest.raises(ValueError, match="DINOv2 release"):
    convert_vit.load_unimatch_v2({k: np.zeros(s, np.float32) for k, s in _release_keys()}, _shapes(m))


def test_unimatch_checkpoint_with_module_prefix_converts(small):
  m, sd, plain = small
  ema = {"module." + k: a + 1.0 for k, a in sd.items()}
  checkpoint = {"model": {"module." + k: a for k, a in sd.items()}, "model_ema": ema, "epoch": 3}
  init = _filled(m, 7.0)
  v = convert_vit.load_unimatch_v2(checkpoint, init)
  jax.tree_util.tree_map(np.testing.assert_array_equal, v, plain)
  p = v["params"]["head"]
  np.testing.assert_array_equal(p["resize_layers_0"]["kernel"],
                                sd["head.resize_layers.0.weight"].transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(p["refinenet2"]["resConfUnit1"]["conv2"]["kernel"],
                                sd["head.scratch.refinenet2.resConfUnit1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["rep_fc1"]["kernel"], init["params"]["head"]["rep_fc1"]["kernel"])
  np.testing.assert_array_equal(v["batch_stats"]["head"]["rep_bn"]["var"], init["batch_stats"]["head"]["rep_bn"]["var"])
  v_ema = convert_vit.load_unimatch_v2(checkpoint, init, ema=True)
  np.testing.assert_array_equal(v_ema["params"]["backbone"]["norm"]["scale"], sd["backbone.norm.weight"] + 1.0)


def _loss_and_grads(m, variables, images):
  """(loss, grads, number of rematerialized calls) of a nonlinear function of every output."""
  module = models.build(m)

  def loss_fn(params):
    out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                          mutable=["batch_stats"])
    return sum(jnp.sum(jnp.sin(v)) for v in out.values())

  remat_calls = str(jax.make_jaxpr(loss_fn)(variables["params"])).count("custom_vjp_call")
  # Cheap XLA optimization: both variants compile the same way, in half the time.
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(variables["params"]).compile(
      {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
  return (*compiled(variables["params"]), remat_calls)


def test_remat_gives_the_same_loss_and_gradients_on_tiny():
  plain, remat = _model_config("tiny", remat=False), _model_config("tiny", remat=True)
  variables = _tiny_variables()
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 42, 56, 3))
  loss0, grads0, calls0 = _loss_and_grads(plain, variables, images)
  loss1, grads1, calls1 = _loss_and_grads(remat, variables, images)
  assert (calls0, calls1) == (0, 4 + 7 + 1)   # blocks, residual conv units, rep_bn
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  assert jax.tree_util.tree_structure(grads1) == jax.tree_util.tree_structure(grads0)
  # Per leaf to 1e-5 of its largest entry, plus 1e-7 of the largest gradient overall: rep_fc1's bias
  # feeds rep_bn in training mode, its exact gradient is 0 and both give float32 cancellation noise.
  overall = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads0))
  for (path, g1), g0 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree_util.tree_leaves(grads0)):
    atol = 1e-5 * float(jnp.abs(g0).max()) + 1e-7 * overall
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads0["backbone"]["pos_embed"]).max()) > 0   # the interpolation is differentiated


def test_build_init_and_output_shapes_on_tiny():
  m = _model_config("tiny")
  module = models.build(m)
  assert isinstance(module, models.DPTSegmenter) and models.init_image_size(module) == 70
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0)))   # default size 70
  assert set(shapes) == {"params", "batch_stats"}
  assert shapes["params"]["backbone"]["pos_embed"].shape == (1, 1370, 48)
  assert "resConfUnit1" not in shapes["params"]["head"]["refinenet4"]
  variables = _tiny_variables()
  images = jnp.cos(jnp.arange(2 * 28 * 42 * 3, dtype=jnp.float32)).reshape(2, 28, 42, 3)
  out = jax.jit(module.apply)(variables, images)
  assert out["pred"].shape == (2, 16, 24, 5) and out["fts"].shape == (2, 16, 24, 16)   # 8x the 2x3 patch grid
  assert out["rep"].shape == (2, 16, 24, 32)
  half = jax.jit(models.build(_model_config("tiny", dtype="bfloat16")).apply)(variables, images)
  assert half["pred"].dtype == jnp.bfloat16
  assert _rel(half["pred"].astype(jnp.float32), out["pred"]) < 0.05
  assert isinstance(models.build(config_base.model_config()), models.DeepLabV3Plus)
  with pytest.raises(ValueError, match="unknown model.arch 'unet'"):
    models.build(_model_config("tiny", arch="unet"))


@pytest.mark.parametrize("shape", [(1, 97, 98, 3), (1, 28, 30, 3)])
def test_image_side_not_a_multiple_of_14_is_refused(shape):
  m = _model_config("tiny")
  with pytest.raises(ValueError) as excinfo:
    jax.eval_shape(lambda: models.build(m).init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
  msg = _one_line(excinfo)
  assert f"multiples of 14: got {shape[1]}x{shape[2]}" in msg
  with pytest.raises(ValueError, match="multiples of 14: got 64x64"):
    models.init_variables(models.build(m), jax.random.PRNGKey(0), image_size=64)
