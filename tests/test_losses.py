"""Losses, label making and CutMix against direct NumPy versions of the reference."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgcl_jax import losses


def _softmax_np(x):
  x = x.astype(np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _entropy_np(p):
  return -np.sum(p * np.log(p + 1e-10), axis=-1)


def _filter_np(probs, valid, percent):
  ent = _entropy_np(probs)
  labels = probs.argmax(-1).astype(np.int64)
  if valid.any():
    thresh = np.quantile(ent[valid], 1 - percent / 100)
    labels[(ent >= thresh) & valid] = 255
  return labels, ent


def _bilinear_ac_np(x, out_h, out_w):
  """align_corners=True bilinear on NHWC, straight from the formula."""
  _, h, w, _ = x.shape
  sy = np.arange(out_h) * ((h - 1) / (out_h - 1) if out_h > 1 else 0.0)
  sx = np.arange(out_w) * ((w - 1) / (out_w - 1) if out_w > 1 else 0.0)
  y0 = np.minimum(np.floor(sy).astype(int), h - 1); y1 = np.minimum(y0 + 1, h - 1); fy = sy - y0
  x0 = np.minimum(np.floor(sx).astype(int), w - 1); x1 = np.minimum(x0 + 1, w - 1); fx = sx - x0
  top = x[:, y0][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y0][:, :, x1] * fx[None, None, :, None]
  bot = x[:, y1][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y1][:, :, x1] * fx[None, None, :, None]
  return top * (1 - fy)[None, :, None, None] + bot * fy[None, :, None, None]


def _nearest_legacy_np(x, out_h, out_w):
  h, w = x.shape[1:3]
  iy = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(int), h - 1)
  ix = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(int), w - 1)
  return x[:, iy][:, :, ix]


def _ce_np(logits, labels, keep):
  logp = np.log(_softmax_np(logits))
  safe = np.where(labels == 255, 0, labels)
  nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
  return nll[keep].mean() if keep.any() else 0.0, np.exp(-nll)


_quantile = jax.jit(losses.masked_quantile, static_argnames=("method", "num_bins"))
_filter = jax.jit(losses.filter_by_entropy, static_argnames=("method", "num_bins"))


# ----------------------------------------------------------------------------- quantiles

def test_masked_quantile_sort_matches_numpy():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(3, 6, 7)).astype(np.float32)
  valid = rng.random((3, 6, 7)) < 0.6
  for q in (0.0, 0.05, 0.2, 0.5, 0.8, 0.97, 1.0):
    got = float(_quantile(values, valid, q))
    np.testing.assert_allclose(got, np.quantile(values[valid], q), rtol=1e-6, atol=1e-6)
  one = np.zeros_like(valid); one[1, 2, 3] = True
  assert float(_quantile(values, one, 0.3)) == values[1, 2, 3]
  assert float(_quantile(values, np.zeros_like(valid), 0.5)) == np.inf


def test_masked_quantile_histogram_within_one_bin():
  rng = np.random.default_rng(1)
  top, bins = math.log(5), 64
  values = (rng.random((2, 9, 11)) * top).astype(np.float32)
  valid = rng.random((2, 9, 11)) < 0.7
  for q in (0.0, 0.2, 0.5, 0.8, 1.0):
    got = float(_quantile(values, valid, q, method="histogram", num_bins=bins, max_value=top))
    assert abs(got - np.quantile(values[valid], q)) <= top / bins + 1e-6
  assert float(_quantile(values, np.zeros_like(valid), 0.5, method="histogram", num_bins=bins,
                         max_value=top)) == np.inf


def test_histogram_pseudo_labels_match_sort_except_near_threshold():
  rng = np.random.default_rng(2)
  c, bins = 5, 32
  logits = rng.normal(size=(2, 12, 13, c)).astype(np.float32) * 2
  valid = rng.random((2, 12, 13)) < 0.8
  probs = jax.nn.softmax(jnp.asarray(logits), -1)
  for percent in (20.0, 50.0, 0.0):
    a = np.asarray(_filter(probs, valid, percent, method="sort"))
    b = np.asarray(_filter(probs, valid, percent, method="histogram", num_bins=bins))
    ent = _entropy_np(np.asarray(probs, np.float64))
    thresh = np.quantile(ent[valid], 1 - percent / 100)
    near = np.abs(ent - thresh) <= math.log(c) / bins + 1e-6
    np.testing.assert_array_equal(a[~near], b[~near])


def test_entropy():
  p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(np.asarray(losses.entropy(p)), _entropy_np(p.astype(np.float64)), atol=1e-6)


# ----------------------------------------------------------------------------- labels

def test_filter_by_entropy_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 7, 9, 4)).astype(np.float32) * 3
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
  valid = rng.random((2, 7, 9)) < 0.75
  for percent in (0.0, 20.0, 64.0, 100.0):
    got = np.asarray(_filter(probs, valid, percent))
    want, _ = _filter_np(probs.astype(np.float64), valid, percent)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
  # percent 0: q = 1, so only the max-entropy valid pixel is dropped (the definition, literally).
  got = np.asarray(_filter(probs, valid, 0.0))
  assert (got[valid] == 255).sum() == 1
  # No valid pixel: nothing filtered.
  got = np.asarray(_filter(probs, np.zeros_like(valid), 30.0))
  np.testing.assert_array_equal(got, probs.argmax(-1))


def test_pseudo_labels_upsample_align_corners_and_filter():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32) * 3
  ignore = np.zeros((2, 17, 21), np.int32)
  ignore[0, :3] = 255; ignore[1, :, -4:] = 255
  got = np.asarray(losses.pseudo_labels(logits, ignore, 20.0))
  probs = _softmax_np(_bilinear_ac_np(logits.astype(np.float64), 17, 21))
  want, ent = _filter_np(probs, ignore != 255, 20.0)
  thresh = np.quantile(ent[ignore != 255], 0.8)
  ok = np.abs(ent - thresh) > 1e-5   # float32 vs float64 ties at the threshold
  assert got.shape == (2, 17, 21)
  np.testing.assert_array_equal(got[ok], want[ok])
  frac = (got[ignore != 255] == 255).mean()
  assert abs(frac - 0.2) < 0.01


def test_contrastive_labels_nearest_and_ignore():
  rng = np.random.default_rng(5)
  b, big, small, c = 2, (19, 23), (5, 6), 4
  labels = rng.integers(0, c, size=(b, *big)).astype(np.int32)
  labels[0, 0, :5] = 255
  logits = rng.normal(size=(b, *small, c)).astype(np.float32) * 3
  ignore = np.zeros((b, *big), np.int32)
  ignore[0, -6:] = 255; ignore[1, :, :8] = 255
  got = np.asarray(losses.contrastive_labels(labels, logits, ignore, 60.0))
  assert got.shape == (2 * b, *small) and got.dtype == np.int32
  np.testing.assert_array_equal(got[:b], _nearest_legacy_np(labels, *small))
  ign_small = _nearest_legacy_np(ignore, *small)
  want, _ = _filter_np(_softmax_np(logits), ign_small != 255, 60.0)
  want[ign_small == 255] = 255
  np.testing.assert_array_equal(got[b:], want)


# ----------------------------------------------------------------------------- CutMix

def _box_stats(masks):
  """Widths, heights, x0, y0 of rectangular masks [N, H, W]; asserts they are rectangles."""
  cols, rows = masks.any(1), masks.any(2)
  w, h = cols.sum(1), rows.sum(1)
  assert (masks.sum((1, 2)) == w * h).all()
  return w, h, cols.argmax(1), rows.argmax(1)


_boxes = jax.jit(losses.cutmix_boxes, static_argnums=(1, 2, 3))


# Half-even cases: 12 x 15 with w = 12 gives 7.5 -> 8; 10 x 13 with w = 10 gives 6.5 -> 6.
@pytest.mark.parametrize("height,width,half_w,half_h", [(12, 15, 12, 8), (10, 13, 10, 6), (16, 16, None, None)])
def test_cutmix_box_law(height, width, half_w, half_h):
  masks = np.asarray(_boxes(jax.random.PRNGKey(0), 2000, height, width))
  w, h, x0, y0 = _box_stats(masks)
  lo = width // 2 + 1
  assert w.min() >= lo and w.max() <= width - 1
  assert set(np.unique(w)) == set(range(lo, width))   # every width is drawn
  np.testing.assert_array_equal(h, np.round(height * width / 2 / w))   # numpy rounds half-even
  if half_w is not None:
    assert (h[w == half_w] == half_h).all()
  assert (x0 + w <= width).all() and (y0 + h <= height).all()
  assert x0.min() == 0 and y0.min() == 0 and (x0 + w == width).any() and (y0 + h == height).any()


def _cutmix_inputs(b, h, w):
  idx = np.arange(b)
  images = np.broadcast_to(idx[:, None, None, None], (b, h, w, 3)).astype(np.float32)
  labels = np.broadcast_to(10 + idx[:, None, None], (b, h, w)).astype(np.int32)
  ignore = np.broadcast_to(100 + idx[:, None, None], (b, h, w)).astype(np.int32)
  return images, labels, ignore


def test_cutmix_partner_and_coin():
  b, h, w = 3, 8, 11
  images, labels, ignore = _cutmix_inputs(b, h, w)
  keys = jax.random.split(jax.random.PRNGKey(2), 400)
  run = jax.jit(jax.vmap(losses.cutmix, in_axes=(0, None, None, None, None)))
  mi, ml, mm = map(np.asarray, run(keys, images, labels, ignore, 0.5))
  changed = (mi != images).any((1, 2, 3, 4))
  assert 0.4 < changed.mean() < 0.6
  for k in np.nonzero(changed)[0][:12]:
    for i in range(b):
      box = mi[k, i, :, :, 0] != i
      np.testing.assert_array_equal(mi[k, i, :, :, 0][box], (i + 1) % b)
      np.testing.assert_array_equal(ml[k, i] == 10 + (i + 1) % b, box)
      np.testing.assert_array_equal(mm[k, i] == 100 + (i + 1) % b, box)
      bw, bh, _, _ = _box_stats(box[None])
      assert w // 2 + 1 <= bw[0] <= w - 1 and bh[0] == np.round(h * w / 2 / bw[0])
  for prob, want_changed in ((0.0, False), (1.0, True)):
    mi, ml, mm = map(np.asarray, run(keys, images, labels, ignore, prob))
    assert ((mi != images).any((1, 2, 3, 4)) == want_changed).all()
    assert ((ml != labels).any((1, 2, 3)) == want_changed).all()


def test_cutmix_slices_share_one_coin_per_step():
  """Quirk s.3 step 3: every slice mixes or none does; with cutmix_coin='slice' they disagree."""
  s, b, h, w = 4, 2, 8, 11
  images, labels, ignore = (np.broadcast_to(x, (s,) + x.shape) for x in _cutmix_inputs(b, h, w))
  keys = jax.random.split(jax.random.PRNGKey(5), 200)
  for shared in (True, False):
    run = jax.jit(jax.vmap(lambda k: losses.cutmix_slices(k, images, labels, ignore, 0.5, shared_coin=shared)))
    mi, ml, mm = map(np.asarray, run(keys))
    changed = (mi != images[None]).any((2, 3, 4, 5))            # [steps, slices]
    assert 0.3 < changed.mean() < 0.7
    assert ((ml != labels[None]).any((2, 3, 4)) == changed).all()
    assert ((mm != ignore[None]).any((2, 3, 4)) == changed).all()
    all_or_none = (changed.all(1) | ~changed.any(1)).all()
    assert all_or_none == shared
    if shared:   # boxes still differ between slices
      assert (mi[changed.all(1)][:, 0] != mi[changed.all(1)][:, 1]).any()


# ----------------------------------------------------------------------------- losses

def test_cross_entropy_with_ignore():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.3] = 255
  want, _ = _ce_np(logits, labels, labels != 255)
  np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)), want, rtol=1e-5)
  assert float(losses.cross_entropy(logits, np.full_like(labels, 255))) == 0.0
  bf = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
  assert bf.dtype == jnp.float32


def _ohem_np(logits, labels, thresh, min_kept):
  valid = labels != 255
  _, prob = _ce_np(logits, labels, valid)
  if min_kept > valid.sum():
    return _ce_np(logits, labels, valid)[0]
  t = np.sort(prob[valid])[min_kept - 1]
  keep = valid & (prob <= max(t, thresh))
  return _ce_np(logits, labels, keep)[0]


def test_ohem_both_regimes():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 6, 7, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, size=(2, 6, 7)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.25] = 255
  n_valid = int((labels != 255).sum())
  ohem = jax.jit(losses.ohem_cross_entropy, static_argnames=("min_kept",))
  cases = [(0.7, n_valid + 1),   # too few valid pixels: plain CE
           (0.7, 200),           # min_kept above the pixel count: plain CE (static path)
           (0.7, 20),            # threshold = thresh
           (0.05, 20),           # threshold = t (t > thresh)
           (0.3, n_valid)]
  for thresh, min_kept in cases:
    got = float(ohem(logits, labels, thresh, min_kept=min_kept))
    np.testing.assert_allclose(got, _ohem_np(logits, labels, thresh, min_kept), rtol=1e-5)
  plain, _ = _ce_np(logits, labels, labels != 255)
  np.testing.assert_allclose(float(ohem(logits, labels, 0.7, min_kept=n_valid + 1)), plain, rtol=1e-5)
  assert abs(float(ohem(logits, labels, 0.05, min_kept=20)) - plain) > 1e-3


def test_unsup_cross_entropy_scale_quirk():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  pseudo = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
  pseudo[rng.random(pseudo.shape) < 0.2] = 255
  ignore = np.zeros((2, 5, 6), np.int32); ignore[1, :2] = 255
  target = np.where(ignore == 255, 255, pseudo)
  keep = target != 255
  mean, _ = _ce_np(logits, target, keep)
  on = float(losses.unsup_cross_entropy(logits, pseudo, ignore, scale_quirk=True))
  off = float(losses.unsup_cross_entropy(logits, pseudo, ignore, scale_quirk=False))
  np.testing.assert_allclose(off, mean, rtol=1e-5)
  np.testing.assert_allclose(on, mean * target.size / keep.sum(), rtol=1e-5)
  assert float(losses.unsup_cross_entropy(logits, pseudo, np.full_like(ignore, 255))) == 0.0


def test_supervised_loss_resizes_and_adds_aux():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  aux = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 13, 17)).astype(np.int32)
  labels[0, :2] = 255
  keep = labels != 255
  main, _ = _ce_np(_bilinear_ac_np(logits.astype(np.float64), 13, 17), labels, keep)
  aux_l, _ = _ce_np(_bilinear_ac_np(aux.astype(np.float64), 13, 17), labels, keep)
  np.testing.assert_allclose(float(losses.supervised_loss(logits, labels)), main, rtol=1e-5)
  got = float(losses.supervised_loss(logits, labels, aux_logits=aux, aux_weight=0.4))
  np.testing.assert_allclose(got, main + 0.4 * aux_l, rtol=1e-5)
  got = float(losses.supervised_loss(logits, labels, ohem=True, thresh=0.7, min_kept=10 ** 6))
  np.testing.assert_allclose(got, main, rtol=1e-5)


def test_per_slice_functions_vmap_under_jit():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 2, 3, 4, 3)).astype(np.float32)
  ignore = np.zeros((2, 2, 9, 13), np.int32)
  percent = jnp.array([20.0, 40.0])
  fn = jax.jit(jax.vmap(functools.partial(losses.pseudo_labels, method="sort")))
  got = np.asarray(fn(logits, ignore, percent))
  one = jax.jit(losses.pseudo_labels)
  for s in range(2):
    np.testing.assert_array_equal(got[s], np.asarray(one(logits[s], ignore[s], percent[s])))


def test_every_label_function_takes_the_configured_ignore_label():
  """With ignore_label=254 and inputs using 254 each function gives what it gives with 255 (its
  label outputs with 254 where those had 255): config.data.ignore_label is honoured everywhere."""
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, size=(2, 13, 17)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.3] = 255
  pseudo = rng.integers(0, 3, size=(2, 13, 17)).astype(np.int32)
  pseudo[rng.random(pseudo.shape) < 0.2] = 255
  ignore = np.zeros((2, 13, 17), np.int32)
  ignore[1, :4] = 255
  up = np.asarray(losses.resize_logits(logits, (13, 17)))

  def results(v):
    relabel = lambda x: np.where(x == 255, v, x)  # pylint: disable=unnecessary-lambda-assignment
    lab, pse, ign = relabel(labels), relabel(pseudo), relabel(ignore)
    return {
        "ce": losses.cross_entropy(up, lab, ignore_label=v),
        "ohem": losses.ohem_cross_entropy(up, lab, 0.3, 50, ignore_label=v),
        "unsup": losses.unsup_cross_entropy(up, pse, ign, ignore_label=v),
        "sup": losses.supervised_loss(logits, lab, ohem=True, aux_logits=logits, min_kept=50, ignore_label=v),
        "pseudo": losses.pseudo_labels(logits, ign, 30.0, ignore_label=v),
        "contrastive": losses.contrastive_labels(lab, logits, ign, 30.0, ignore_label=v),
    }

  want, got = results(255), results(254)
  for name in ("ce", "ohem", "unsup", "sup"):
    assert np.isfinite(float(want[name])) and float(want[name]) > 0, name
    assert float(got[name]) == float(want[name]), name
  for name in ("pseudo", "contrastive"):
    assert (np.asarray(want[name]) == 255).any() and not (np.asarray(got[name]) == 255).any(), name
    np.testing.assert_array_equal(np.asarray(got[name]), np.where(np.asarray(want[name]) == 255, 254,
                                                                   np.asarray(want[name])), err_msg=name)
