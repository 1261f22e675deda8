"""Learning rate, SGD, EMA and progress schedules against hand-written NumPy versions."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgcl_jax import schedules
from dgcl_jax.config_base import base_config


def test_poly_lr_values():
  sched = schedules.poly_lr(0.01, 100, 0.9)
  for i in (0, 1, 37, 99, 100):
    np.testing.assert_allclose(float(sched(i)), 0.01 * (1 - i / 100) ** 0.9, rtol=1e-6, atol=1e-12)
  assert float(sched(0)) == np.float32(0.01)
  assert float(sched(150)) == 0.0
  np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(50))), 0.01 * 0.5 ** 0.9, rtol=1e-6)


def _params(rng):
  return {
      "backbone": {"conv": rng.normal(size=(3, 2)).astype(np.float32), "bn": rng.normal(size=(2,)).astype(np.float32)},
      "decoder": {"w": rng.normal(size=(2, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)},
      "aux": {"w": rng.normal(size=(4,)).astype(np.float32)},
  }


def _optimize(cfg, max_iter, params, grads):
  """params after schedules.make_optimizer's steps with `grads`, one jitted update each."""
  tx = schedules.make_optimizer(cfg, max_iter)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, g)
  return params


def test_sgd_matches_pytorch_rule_with_decoder_multiplier():
  cfg = base_config()
  cfg.optim.base_lr, cfg.optim.decoder_lr_mult = 0.01, 10.0
  cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power = 0.9, 1e-2, 0.9
  max_iter = 10
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(3)]
  p_jax = _optimize(cfg, max_iter, params, grads)

  # PyTorch SGD, one param group per lr: d = g + wd p; buf = d (first) / m buf + d; p -= lr buf.
  def torch_sgd(name, path):
    p = params[name][path].astype(np.float64)
    buf = None
    for i, g in enumerate(grads):
      mult = 1.0 if name == "backbone" else cfg.optim.decoder_lr_mult
      lr = cfg.optim.base_lr * mult * (1 - i / max_iter) ** 0.9
      d = g[name][path] + cfg.optim.weight_decay * p
      buf = d if buf is None else cfg.optim.momentum * buf + d
      p = p - lr * buf
    return p

  for name, group in params.items():
    for path in group:
      np.testing.assert_allclose(np.asarray(p_jax[name][path]), torch_sgd(name, path), rtol=1e-5, atol=1e-6)
  # The multiplier reaches 'decoder' and 'aux' but not 'backbone'.
  assert schedules.param_labels(params) == {
      "backbone": {"conv": "backbone", "bn": "backbone"},
      "decoder": {"w": "head", "b": "head"}, "aux": {"w": "head"}}


def test_learning_rates_for_logging():
  cfg = base_config()
  b, h = schedules.learning_rates(cfg, 1000, 250)
  np.testing.assert_allclose(float(b), 0.001 * 0.75 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(h), 0.01 * 0.75 ** 0.9, rtol=1e-6)


def test_ema_decay_around_the_supervised_boundary():
  fn = jax.jit(schedules.ema_decay, static_argnums=(1, 2, 3))
  iters, sup = 5, 2   # first semi-supervised step: 10
  want = {10: 0.0, 11: 0.5, 12: 2 / 3, 13: 0.75, 1009: 0.999, 5000: 0.999}
  for i, w in want.items():
    np.testing.assert_allclose(float(fn(jnp.int32(i), iters, sup, 0.999)), w, rtol=1e-6, atol=1e-7)
  assert float(fn(jnp.int32(9), iters, sup, 0.999)) == 0.0   # supervised steps: no EMA, clamped to 0
  np.testing.assert_allclose(float(schedules.ema_decay(1009, iters, sup, 0.9999)), 1 - 1 / 1000, rtol=1e-6)


def test_ema_update():
  rng = np.random.default_rng(1)
  t, s = _params(rng), _params(rng)
  out = jax.jit(schedules.ema_update)(t, s, jnp.float32(0.9))
  for name in t:
    for k in t[name]:
      np.testing.assert_allclose(np.asarray(out[name][k]), 0.9 * t[name][k] + 0.1 * s[name][k], rtol=1e-6, atol=1e-6)
      assert out[name][k].dtype == t[name][k].dtype
  same = schedules.ema_update(t, s, 0.0)
  np.testing.assert_allclose(np.asarray(same["decoder"]["w"]), s["decoder"]["w"])


def test_teacher_reset_active_window():
  fn = jax.jit(schedules.teacher_reset_active, static_argnums=(1, 2, 3))
  got = [bool(fn(jnp.int32(i), 5, 1, True)) for i in range(12)]
  assert got == [False] * 5 + [True] * 5 + [False] * 2
  assert not any(bool(fn(jnp.int32(i), 5, 1, False)) for i in range(12))
  got = [bool(schedules.teacher_reset_active(i, 4, 0)) for i in range(6)]
  assert got == [True] * 4 + [False] * 2


def test_progress_and_percents():
  assert schedules.epoch_progress(1, 80, 1) == 0.0
  np.testing.assert_allclose(schedules.epoch_progress(40, 80, 1), 39 / 79)
  p = schedules.epoch_progress(79, 80, 1)
  np.testing.assert_allclose(schedules.drop_percent(p, 20.0), 20 * (1 - 78 / 79))
  np.testing.assert_allclose(float(schedules.contrastive_percent(0.0)), 80.0)
  np.testing.assert_allclose(float(schedules.contrastive_percent(0.5)), 40.0)
  np.testing.assert_allclose(float(schedules.contrastive_percent(0.95)), 10.0)   # floor
  assert schedules.drop_percent(1.0, 20.0) == 0.0   # no floor
  # Traced epoch works too.
  np.testing.assert_allclose(float(jax.jit(lambda e: schedules.epoch_progress(e, 10, 2))(jnp.int32(6))), 0.5)


def test_adamw_matches_pytorch_rule_with_head_multiplier():
  """optim.name='adamw' (UniMatch V2's optimizer for the DINOv2 DPT) against PyTorch's AdamW written out
  in NumPy: p *= 1 - lr wd; m, v moments; p -= lr m_hat / (sqrt(v_hat) + eps), per-group poly lr."""
  cfg = base_config()
  o = cfg.optim
  o.name, o.base_lr, o.decoder_lr_mult, o.weight_decay, o.poly_power = "adamw", 5e-3, 40.0, 0.01, 0.9
  o.betas, o.eps = (0.9, 0.999), 1e-8
  max_iter = 8
  rng = np.random.default_rng(1)
  params = {"backbone": {"pos_embed": rng.normal(size=(1, 5, 3)).astype(np.float32),
                         "blocks_0": {"qkv": {"kernel": rng.normal(size=(3, 9)).astype(np.float32)}}},
            "head": {"projects_0": {"bias": rng.normal(size=(4,)).astype(np.float32)},
                     "rep_fc1": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}}}
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(4)]
  p_jax = _optimize(cfg, max_iter, params, grads)

  def torch_adamw(top, leaf_of):
    p = leaf_of(params[top]).astype(np.float64)
    m = v = 0.0
    b1, b2 = o.betas
    for i, g in enumerate(grads):
      g = leaf_of(g[top]).astype(np.float64)
      lr = o.base_lr * (1.0 if top == "backbone" else o.decoder_lr_mult) * (1 - i / max_iter) ** 0.9
      p = p * (1 - lr * o.weight_decay)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      m_hat, v_hat = m / (1 - b1 ** (i + 1)), v / (1 - b2 ** (i + 1))
      p = p - lr * m_hat / (np.sqrt(v_hat) + o.eps)
    return p

  leaves = {"backbone": [lambda t: t["pos_embed"], lambda t: t["blocks_0"]["qkv"]["kernel"]],
            "head": [lambda t: t["projects_0"]["bias"], lambda t: t["rep_fc1"]["kernel"]]}
  for top, getters in leaves.items():
    for leaf_of in getters:
      want = torch_adamw(top, leaf_of)
      # atol: optax computes the bias correction 1 - b2^t in float32 (PyTorch in float64), which is off by
      # up to ~3e-5 relative at t = 1: that much of a head step (lr 0.2) is 6e-6. Weight decay alone moves
      # each step by lr x wd x p ~ 2e-3, a backbone lr in the head by ~0.2.
      np.testing.assert_allclose(np.asarray(leaf_of(p_jax[top])), want, rtol=1e-5, atol=2e-5)
      # The head's 40x lr moves it further than the backbone's would.
      assert not np.allclose(want, leaf_of(params[top]), atol=1e-4)


def test_dpt_parameter_split_backbone_is_the_vit():
  """On the DINOv2 DPT's own tree, the backbone group is exactly the ViT (embeddings included) and the
  DPT head and DGCL's rep head take the multiplied lr, as UniMatch V2's two parameter groups."""
  from dgcl_jax import config_base, models  # pylint: disable=g-import-not-at-top
  m = config_base.model_config()
  m.arch, m.vit, m.num_classes, m.rep_dim = "dpt", "tiny", 3, 8
  shapes = jax.eval_shape(lambda: models.init_variables(models.build(m), jax.random.PRNGKey(0)))["params"]
  labels = jax.tree_util.tree_leaves_with_path(schedules.param_labels(shapes))
  by_group = {}
  for path, label in labels:
    by_group.setdefault(label, set()).add(path[0].key)
  assert by_group == {"backbone": {"backbone"}, "head": {"head"}}
  backbone = {jax.tree_util.keystr(p) for p, l in labels if l == "backbone"}
  assert "['backbone']['pos_embed']" in backbone and "['backbone']['cls_token']" in backbone
  head = {jax.tree_util.keystr(p) for p, l in labels if l == "head"}
  assert "['head']['rep_fc1']['kernel']" in head and "['head']['output_conv_2']['bias']" in head
