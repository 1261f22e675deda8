"""Losses, label making and CutMix for one slice of the batch (REFERENCE.md section 3).

Every function works on ONE slice (leading batch dim B) with static shapes; the
trainer reshapes the global batch to [num_slices, B, ...] and vmaps them, which
reproduces the reference's per-device statistics. Random draws take explicit keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dgcl_jax import ops

IGNORE = 255


def _numpy_linear(sorted_at, n, position):
  """numpy's default ('linear') quantile from sorted_at(rank) -> value of that rank and the
  virtual index position(n - 1) (q x (n - 1) for numpy)."""
  pos = position(jnp.maximum(n - 1, 0).astype(jnp.float32))
  pos = jnp.clip(pos, 0.0, jnp.maximum(n - 1, 0).astype(jnp.float32))
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  v_lo, v_hi = sorted_at(lo), sorted_at(hi)
  # where() keeps frac == 0 from turning inf - inf into nan.
  out = jnp.where(frac > 0, v_lo + (v_hi - v_lo) * frac, v_lo)
  return jnp.where(n > 0, out, jnp.inf)


def _quantile(values, valid, position, method, num_bins, max_value):
  v = jnp.ravel(values).astype(jnp.float32)
  m = jnp.ravel(valid).astype(bool)
  n = jnp.sum(m, dtype=jnp.int32)
  if method == "sort":
    s = jnp.sort(jnp.where(m, v, jnp.inf))
    return _numpy_linear(lambda k: s[k], n, position)
  if method != "histogram":
    raise ValueError(f"unknown quantile method {method!r}")
  if max_value is None:
    top = jnp.max(jnp.where(m, v, 0.0))
  else:
    top = jnp.asarray(max_value, jnp.float32)
  top = jnp.maximum(top, 1e-12)
  width = top / num_bins
  idx = jnp.clip(jnp.floor(v / width), 0, num_bins - 1).astype(jnp.int32)
  counts = jnp.zeros((num_bins,), jnp.int32).at[idx].add(m.astype(jnp.int32))
  cum = jnp.cumsum(counts)

  def at_rank(k):
    # The bin holding rank k; place the value linearly inside it by its rank there.
    b = jnp.minimum(jnp.searchsorted(cum, k, side="right"), num_bins - 1)
    inside = (k - (cum[b] - counts[b])).astype(jnp.float32) + 0.5
    return (b.astype(jnp.float32) + inside / jnp.maximum(counts[b], 1).astype(jnp.float32)) * width

  return _numpy_linear(at_rank, n, position)


def masked_quantile(values, valid, q, method="sort", num_bins=4096, max_value=None):
  """Quantile q in [0, 1] of values[valid] (any shape) with numpy's linear interpolation.

  method='sort' is exact; 'histogram' uses num_bins bins over [0, max_value] (default:
  the largest valid value) and is exact to one bin width. Returns +inf when no entry
  is valid (so a `>= quantile` filter removes nothing).
  """
  q = jnp.asarray(q, jnp.float32)
  return _quantile(values, valid, lambda last: q * last, method, num_bins, max_value)


def _percent_position(percent):
  """Virtual index (1 - percent/100) x last, exact when it is an integer.

  float32 1 - percent/100 is inexact (0.36 for 64), which would move an integer index
  off its rank and the threshold off a pixel's entropy; (100 - percent) x last / 100,
  snapped when 100 x round(.) equals the numerator, keeps integer ranks exact.
  """
  def position(last):
    x = (100.0 - jnp.asarray(percent, jnp.float32)) * last
    k = jnp.round(x / 100.0)
    return jnp.where(k * 100.0 == x, k, x / 100.0)
  return position


def entropy(probs, axis=-1):
  """Per-pixel entropy sum(-p log(p + 1e-10)) along `axis`."""
  probs = probs.astype(jnp.float32)
  return -jnp.sum(probs * jnp.log(probs + 1e-10), axis=axis)


def filter_by_entropy(probs, valid, percent, method="sort", num_bins=4096, ignore_label=IGNORE):
  """Argmax labels [B, H, W] int32 of probs [B, H, W, C]; valid pixels whose entropy is
  >= the (1 - percent/100) quantile over valid pixels become ignore_label.

  As the reference, only valid pixels are filtered (its mask is `ge(thresh) * valid`);
  invalid pixels keep their argmax and are ignored by the caller's ignore mask.
  """
  ent = entropy(probs)
  thresh = _quantile(ent, valid, _percent_position(percent), method, num_bins,
                     math.log(probs.shape[-1]))
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return jnp.where((ent >= thresh) & valid, ignore_label, labels)


def resize_logits(logits, out_hw):
  """Logits [B, h, w, C] -> float32 [B, H, W, C], bilinear align_corners=True."""
  return ops.resize_bilinear_align_corners(logits.astype(jnp.float32), out_hw)


def pseudo_labels(teacher_logits, ignore_mask, percent, method="sort", num_bins=4096, ignore_label=IGNORE):
  """Pseudo labels [B, H, W] int32 at crop size (REFERENCE s.3 step 2).

  teacher_logits: [B, h, w, C] stride-4 logits of the unlabeled images; ignore_mask:
  [B, H, W] (ignore_label = padding); percent: r, the share of valid pixels dropped.
  """
  h, w = ignore_mask.shape[1:3]
  probs = jax.nn.softmax(resize_logits(teacher_logits, (h, w)), axis=-1)
  return filter_by_entropy(probs, ignore_mask != ignore_label, percent, method, num_bins, ignore_label)


def contrastive_labels(labeled_labels, teacher_logits, ignore_mask, percent, method="sort",
                       num_bins=4096, ignore_label=IGNORE):
  """Labels [2B, h, w] int32 at feature size for [labeled; unlabeled] (s.3 step 7).

  labeled_labels, ignore_mask: [B, H, W] at crop size (ignore_mask of the UNMIXED
  unlabeled images, those the teacher saw); teacher_logits: [B, h, w, C].
  """
  h, w = teacher_logits.shape[1:3]
  lab = ops.resize_nearest_legacy(labeled_labels, (h, w)).astype(jnp.int32)
  # The reference takes the quantile over `ignore_mask_small != 255`, the legacy-nearest
  # resized ignore mask, so that is the valid set here too.
  valid = ops.resize_nearest_legacy(ignore_mask, (h, w)) != ignore_label
  probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  unl = filter_by_entropy(probs, valid, percent, method, num_bins, ignore_label)
  unl = jnp.where(valid, unl, ignore_label)
  return jnp.concatenate([lab, unl], axis=0)


def cutmix_boxes(rng, batch, height, width):
  """Bool box masks [B, H, W] with the reference's law (s.3 step 3).

  w uniform in {floor(W/2)+1, ..., W-1}, h = round-half-even(H*W/2 / w), x0 uniform in
  {0..W-w}, y0 in {0..H-h}.
  """
  kw, kx, ky = jax.random.split(rng, 3)
  bw = jax.random.randint(kw, (batch,), width // 2 + 1, width)
  # Exact integer half-even rounding of (H*W) / (2w).
  num, den = height * width, 2 * bw
  quo, rem = num // den, num % den
  up = (2 * rem > den) | ((2 * rem == den) & (quo % 2 == 1))
  bh = quo + up.astype(quo.dtype)
  x0 = jax.random.randint(kx, (batch,), 0, width - bw + 1)
  y0 = jax.random.randint(ky, (batch,), 0, height - bh + 1)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  return ((rows >= y0[:, None, None]) & (rows < (y0 + bh)[:, None, None])
          & (cols >= x0[:, None, None]) & (cols < (x0 + bw)[:, None, None]))


def cutmix(rng, images, labels, ignore_mask, prob=0.5, coin=None):
  """CutMix of one slice: if the coin succeeds (probability prob, or the given bool `coin`),
  inside box i images [B, H, W, 3], labels [B, H, W] and ignore_mask [B, H, W] come from
  sample (i + 1) mod B. Returns the mixed (images, labels, ignore_mask)."""
  k_coin, k_box = jax.random.split(rng)
  b, h, w = labels.shape
  if coin is None:
    coin = jax.random.uniform(k_coin) < prob
  box = cutmix_boxes(k_box, b, h, w) & coin

  def mix(x):
    m = box.reshape(box.shape + (1,) * (x.ndim - 3))
    return jnp.where(m, jnp.roll(x, -1, axis=0), x)

  return mix(images), mix(labels), mix(ignore_mask)


def cutmix_slices(rng, images, labels, ignore_mask, prob=0.5, shared_coin=True):
  """CutMix of every slice: images [S, B, H, W, 3], labels and ignore_mask [S, B, H, W].

  Boxes are drawn per image and partners are taken within each slice. With `shared_coin` one
  coin decides for the whole step, as in the reference (quirk, REFERENCE.md s.3 step 3: the
  coin comes from Python's `random`, seeded alike on every rank); otherwise each slice draws
  its own.
  """
  k_coin, k_slices = jax.random.split(rng)
  slice_keys = jax.random.split(k_slices, labels.shape[0])
  if shared_coin:
    coin = jax.random.uniform(k_coin) < prob
    return jax.vmap(lambda k, x, y, m: cutmix(k, x, y, m, coin=coin))(slice_keys, images, labels, ignore_mask)
  return jax.vmap(lambda k, x, y, m: cutmix(k, x, y, m, prob=prob))(slice_keys, images, labels, ignore_mask)


def _pixel_nll(logits, labels, ignore_label):
  """Per-pixel float32 negative log-likelihood [B, H, W] and validity mask."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0), valid


def _masked_mean(x, mask):
  n = jnp.sum(mask, dtype=jnp.float32)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1.0)


def cross_entropy(logits, labels, ignore_label=IGNORE):
  """Mean float32 cross-entropy over pixels with labels != ignore_label (0 if none).

  logits [B, H, W, C] already at the labels' size [B, H, W].
  """
  nll, valid = _pixel_nll(logits, labels, ignore_label)
  return _masked_mean(nll, valid)


def ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=100000, ignore_label=IGNORE):
  """OHEM cross-entropy (REFERENCE s.3, Cityscapes), logits at label size.

  Fewer than min_kept valid pixels: plain CE. Else t = the min_kept-th smallest
  true-class probability, threshold = max(t, thresh), mean CE over valid pixels whose
  true-class probability <= threshold.
  """
  nll, valid = _pixel_nll(logits, labels, ignore_label)
  plain = _masked_mean(nll, valid)
  if min_kept > valid.size:
    return plain
  prob = jnp.exp(-nll)  # true-class probability (1 on ignored pixels, masked below)
  if min_kept <= 0:
    # The reference then keeps its fixed threshold.
    return _masked_mean(nll, valid & (prob <= thresh))
  t = jnp.sort(jnp.where(valid, prob, jnp.inf).ravel())[min_kept - 1]
  hard = _masked_mean(nll, valid & (prob <= jnp.maximum(t, thresh)))
  return jnp.where(jnp.sum(valid, dtype=jnp.int32) >= min_kept, hard, plain)


def unsup_cross_entropy(logits, pseudo, ignore_mask, scale_quirk=True, ignore_label=IGNORE):
  """Unsupervised loss on mixed images (s.3 step 6), logits [B, H, W, C] at label size.

  Pixels with ignore_mask == ignore_label are ignored; mean CE over the rest, times B*H*W / n_valid
  when scale_quirk (the reference's scale on top of a mean). 0 if no valid pixel.
  """
  target = jnp.where(ignore_mask == ignore_label, ignore_label, pseudo)
  nll, valid = _pixel_nll(logits, target, ignore_label)
  n = jnp.sum(valid, dtype=jnp.float32)
  loss = _masked_mean(nll, valid)
  if scale_quirk:
    loss = loss * (valid.size / jnp.maximum(n, 1.0))
  return jnp.where(n > 0, loss, 0.0)


def supervised_loss(logits, labels, *, ohem=False, aux_logits=None, aux_weight=0.4,
                    thresh=0.7, min_kept=100000, ignore_label=IGNORE):
  """CE (or OHEM) of stride-4 logits [B, h, w, C] resized to labels [B, H, W], plus
  aux_weight x the same loss of aux_logits when given."""
  out_hw = labels.shape[1:3]

  def one(x):
    x = resize_logits(x, out_hw)
    if ohem:
      return ohem_cross_entropy(x, labels, thresh, min_kept, ignore_label)
    return cross_entropy(x, labels, ignore_label)

  loss = one(logits)
  if aux_logits is not None:
    loss = loss + aux_weight * one(aux_logits)
  return loss
