"""DeepLabV3+ / ResNet v1c against a PyTorch model of the same layout (tests/torch_reference.py)."""
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
torch = pytest.importorskip("torch")
import torch_reference as tr  # noqa: E402

from configs import cityscapes, pascal, synthetic  # noqa: E402
from dgcl_jax import convert, models  # noqa: E402
from dgcl_jax.models import layers  # noqa: E402


def _small(**overrides):
  m = synthetic.get_config().model
  for k, v in overrides.items():
    m[k] = v
  return m


def _parity(m, size, batch=2, seed=0):
  # Parity of the float32 network (the real configs train the student in bfloat16; evaluation and
  # the teacher run in float32).
  m = ml_collections.ConfigDict(m.to_dict())
  m.dtype = "float32"
  torch.manual_seed(seed)
  tm = tr.randomize_(tr.TorchSegModel(m), seed).eval()
  x = torch.randn(batch, 3, size, size)
  with torch.no_grad():
    ref = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in tm(x).items()}
  variables = convert.from_torch(tr.state_dict_numpy(tm), m)
  module = models.build(m)
  out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x.numpy().transpose(0, 2, 3, 1))
  assert set(out) == set(ref)
  for k in ref:
    assert out[k].shape == ref[k].shape, k
    err = np.abs(np.asarray(out[k]) - ref[k]).max()
    assert err <= 1e-4 * np.abs(ref[k]).max(), (k, err)


def test_parity_small_variant_with_visible_dilations():
  # 97 px at output stride 8 leaves a 13x13 stage-4 map on which dilations 3, 4, 5 all reach real pixels.
  _parity(_small(replace_stride_with_dilation=(False, True, True), aspp_dilations=(3, 4, 5), aux=True), 97)


@pytest.mark.slow
def test_parity_resnet101_pascal():
  _parity(pascal.get_config().model, 65)


@pytest.mark.slow
def test_parity_resnet101_cityscapes_aux():
  _parity(cityscapes.get_config().model, 65)


def test_stage_plan_matches_reference_dilations():
  pas = models.stage_plan(101, (False, False, True), True)
  assert [p[:2] for p in pas] == [(3, 1), (4, 2), (23, 2), (3, 1)]
  assert pas[3][2] == [2, 4, 8] and set(pas[2][2]) == {1}
  cs = models.stage_plan(101, (False, True, True), True)
  assert cs[2][2] == [1] + [2] * 22 and cs[3][2] == [4, 8, 16]
  assert [p[1] for p in cs] == [1, 2, 1, 1]


@pytest.mark.parametrize("cfg,size,out,aux", [(pascal, 513, 129, None), (pascal, 769, 193, None),
                                              (cityscapes, 769, 193, 97), (cityscapes, 800, 201, 101)])
def test_output_shapes(cfg, size, out, aux):
  m = cfg.get_config().model
  module = models.build(m)
  shapes = convert.variable_shapes(m)
  o = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, size, size, 3)), train=False), shapes)
  assert o["pred"].shape == (1, out, out, m.num_classes)
  assert o["fts"].shape == (1, out, out, 256) and o["rep"].shape == (1, out, out, 256)
  assert ("aux" in o) == (aux is not None)
  if aux:
    assert o["aux"].shape == (1, aux, aux, m.num_classes)
  assert set(shapes["params"]) == ({"backbone", "decoder", "aux"} if aux else {"backbone", "decoder"})
  assert set(shapes["batch_stats"]) == set(shapes["params"])


@pytest.mark.parametrize("size", [400, 401, 9])
def test_ceil_mode_maxpool_matches_torch(size):
  x = np.random.default_rng(size).normal(size=(1, size, size, 2)).astype(np.float32)
  got = np.asarray(layers.max_pool_ceil(jnp.asarray(x), 3, 2, 1))
  want = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert got.shape == want.transpose(0, 2, 3, 1).shape
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
  if size == 400:
    assert got.shape[1] == 201


def test_batchnorm_train_and_running_stats_against_numpy_and_torch():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 6, 3)) * [1.0, 2.0, 0.5] + [0.0, 3.0, -1.0]).astype(np.float32)
  bn = layers.BatchNorm(momentum=0.9, epsilon=1e-5)
  v = bn.init(jax.random.PRNGKey(0), x, train=False)
  v = {"params": {"scale": jnp.asarray([1.0, 0.5, 2.0]), "bias": jnp.asarray([0.0, 1.0, -1.0])},
       "batch_stats": v["batch_stats"]}
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  mean = x.mean((0, 1, 2))
  var = x.var((0, 1, 2))   # biased
  n = 4 * 5 * 6
  want = (x - mean) / np.sqrt(var + 1e-5) * [1.0, 0.5, 2.0] + [0.0, 1.0, -1.0]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  tbn = torch.nn.BatchNorm2d(3).train()
  tbn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # Eval mode uses the running statistics.
  y_eval = bn.apply({"params": v["params"], "batch_stats": upd["batch_stats"]}, x, train=False)
  rs = jax.tree_util.tree_map(np.asarray, upd["batch_stats"])
  want_eval = (x - rs["mean"]) / np.sqrt(rs["var"] + 1e-5) * [1.0, 0.5, 2.0] + [0.0, 1.0, -1.0]
  np.testing.assert_allclose(np.asarray(y_eval), want_eval, rtol=1e-5, atol=1e-5)


def test_batchnorm_axis_name_counts_all_members_and_bf16_stats():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(2, 3, 4, 4, 2)) + [[[[[0.0, 5.0]]]], [[[[1.0, -5.0]]]]]).astype(np.float32)
  bn = layers.BatchNorm(axis_name="d")
  v = bn.init(jax.random.PRNGKey(0), x[0], train=False)
  y, upd = jax.vmap(lambda xi: bn.apply(v, xi, train=True, mutable=["batch_stats"]), axis_name="d")(x)
  flat = x.reshape(-1, 2)
  n = flat.shape[0]
  np.testing.assert_allclose(upd["batch_stats"]["var"][0], 0.9 + 0.1 * flat.var(0) * n / (n - 1), rtol=1e-5)
  want = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  # bfloat16 compute: float32 statistics and params, bfloat16 output.
  bn16 = layers.BatchNorm(dtype=jnp.bfloat16)
  y16, upd16 = bn16.apply(v, x[0].astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
  assert y16.dtype == jnp.bfloat16 and upd16["batch_stats"]["var"].dtype == jnp.float32
  f0 = x[0].astype(jnp.bfloat16).astype(np.float32).reshape(-1, 2)
  m0 = f0.shape[0]
  np.testing.assert_allclose(upd16["batch_stats"]["var"], 0.9 + 0.1 * f0.var(0) * m0 / (m0 - 1), rtol=1e-5)


@pytest.fixture(scope="module")
def small_model():
  """A small model with random (converted) weights: no init compile needed."""
  m = _small()
  torch.manual_seed(1)
  variables = convert.from_torch(tr.state_dict_numpy(tr.randomize_(tr.TorchSegModel(m), 1)), m)
  return m, models.build(m), variables


def test_init_pytorch_default_and_zero_init_residual():
  dec = models.Decoder(num_classes=5, channels=32, low_level_channels=8, rep_dim=16, dilations=(1, 2, 3))
  variables = jax.jit(dec.init, static_argnames="train")(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 4, 4, 64)), train=False)
  p = variables["params"]
  k = np.asarray(p["cls1"]["conv"]["kernel"])
  bound = 1 / np.sqrt(k.shape[0] * k.shape[1] * k.shape[2])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  b = np.asarray(p["cls1"]["conv"]["bias"])
  assert np.abs(b).max() <= bound and b.std() > 0.3 * bound
  fc = np.asarray(p["rep_fc1"]["kernel"])
  assert np.abs(fc).max() <= 1 / np.sqrt(fc.shape[0]) and fc.shape == (32, 16)
  np.testing.assert_array_equal(p["rep_bn"]["scale"], 1.0)
  np.testing.assert_array_equal(p["head"]["bn"]["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["head"]["bn"]["var"], 1.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  for zero in (True, False):
    block = models.resnet.Bottleneck(4, downsample=True, zero_init_residual=zero)
    bp = block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))["params"]
    np.testing.assert_array_equal(bp["bn3"]["scale"], 0.0 if zero else 1.0)
    np.testing.assert_array_equal(bp["bn2"]["scale"], 1.0)
    w = np.asarray(bp["conv2"]["kernel"])   # Kaiming normal, fan_out = 3 * 3 * 4
    assert 0.5 < w.std() / np.sqrt(2 / 36) < 1.5


def test_channel_dropout_shared_by_pred_fts_rep(small_model):
  m, module, variables = small_model
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  out, state = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True,
      rngs={"dropout": jax.random.PRNGKey(7)}))(variables, x)
  fts = np.asarray(out["fts"])
  pre = np.asarray(state["intermediates"]["decoder"]["cls2"]["__call__"][0])   # ReLU output, before dropout
  kept = np.abs(fts).sum((1, 2)) > 0
  assert 0 < (~kept).sum() < kept.size // 2
  mask = kept[:, None, None, :] / 0.9
  np.testing.assert_allclose(fts, pre * mask, rtol=1e-5, atol=1e-6)
  p = variables["params"]["decoder"]
  pred = fts @ np.asarray(p["cls_out"]["kernel"][0, 0]) + np.asarray(p["cls_out"]["bias"])
  np.testing.assert_allclose(np.asarray(out["pred"]), pred, rtol=1e-4, atol=1e-5)
  h = fts @ np.asarray(p["rep_fc1"]["kernel"]) + np.asarray(p["rep_fc1"]["bias"])
  h = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5)   # train-mode BN over all pixels
  h = np.maximum(h * np.asarray(p["rep_bn"]["scale"]) + np.asarray(p["rep_bn"]["bias"]), 0)
  rep = h @ np.asarray(p["rep_fc2"]["kernel"]) + np.asarray(p["rep_fc2"]["bias"])
  np.testing.assert_allclose(np.asarray(out["rep"]), rep, rtol=1e-3, atol=1e-4)
  # Eval mode: no dropout.
  out, state = jax.jit(lambda v, x: module.apply(v, x, train=False, capture_intermediates=True,
                                                 mutable=["intermediates"]))(variables, x)
  np.testing.assert_array_equal(out["fts"], state["intermediates"]["decoder"]["cls2"]["__call__"][0])


def test_bfloat16_compute_keeps_float32_params(small_model):
  m, _, variables = small_model
  m16 = _small(dtype="bfloat16")
  module16 = models.build(m16)
  out, upd = jax.jit(lambda v, x: module16.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": jax.random.PRNGKey(0)}))(
                                                     variables, jnp.ones((2, 32, 32, 3)))
  assert out["pred"].dtype == jnp.bfloat16 and out["rep"].shape == (2, 9, 9, m.rep_dim)   # 32 -> 16 -> 9 (ceil)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(upd))
  assert all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in out.values())
