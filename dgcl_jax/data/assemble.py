"""The device half of the training transform: the float32 crops from the pipeline's compact batch.

The host (transforms.train_window) ships each crop's source pixels as uint8 with the bilinear
tables; normalizing and resizing here, inside the jitted step, gives exactly the float32 values
of transforms.train_transform: the same float32 operations in the same order (normalize as
(x - mean) * inv_std with the same constants, then rows, then columns, each as
lo * (1 - frac) + hi * frac). Each product is multiplied by a 1.0 the compiler cannot see
through (it comes from the data), so that no backend contracts a product and the sum into one
fused multiply-add, which would round once where numpy rounds twice (XLA on CPU and GPU does
contract a plain a * b + c * d, and drops optimization barriers). Shipping uint8 moves 4x fewer bytes across processes than float32
crops for Pascal and leaves the host only the decoding.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_STREAMS = (("labeled", "labeled_label"), ("unlabeled", "unlabeled_ignore"))


def normalization(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """(mean, 1 / std) as float32, computed as transforms.normalize computes them."""
  return np.asarray(mean, np.float32), np.float32(1.0) / np.asarray(std, np.float32)


def _lerp(lo, hi, frac, one):
  return (lo * (1.0 - frac)) * one + (hi * frac) * one


def crop_images(window: jax.Array, index: jax.Array, frac: jax.Array, mean, inv_std) -> jax.Array:
  """window uint8 [B, Wh, Ww, 3], index int32 [B, 2, 2, c], frac float32 [B, 2, c] (train_window's,
  stacked) -> float32 [B, c, c, 3], 0 where the crop is padding."""
  x = (window.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) * jnp.asarray(inv_std, jnp.float32)
  valid = index[:, :, 0] >= 0                                         # [B, 2, c]
  index = jnp.maximum(index, 0)
  one = (frac[0, 0, 0] >= 0).astype(jnp.float32)      # bilinear weights are never negative: 1.0
  take_rows = lambda i: jnp.take_along_axis(x, i[:, :, None, None], axis=1)           # [B, c, Ww, 3]
  rows = _lerp(take_rows(index[:, 0, 0]), take_rows(index[:, 0, 1]), frac[:, 0, :, None, None], one)
  take_cols = lambda i: jnp.take_along_axis(rows, i[:, None, :, None], axis=2)        # [B, c, c, 3]
  out = _lerp(take_cols(index[:, 1, 0]), take_cols(index[:, 1, 1]), frac[:, 1, None, :, None], one)
  keep = valid[:, 0, :, None] & valid[:, 1, None, :]
  return jnp.where(keep[..., None], out, 0.0)


def is_compact(batch) -> bool:
  return "labeled_window" in batch


def train_batch(batch: dict, mean, inv_std) -> dict:
  """The pipeline's compact batch -> 'labeled_image' / 'unlabeled_image' float32 [B, c, c, 3] and
  int32 labels (the keys train_transform's outputs fill); a batch of float crops passes unchanged."""
  if not is_compact(batch):
    return batch
  out = {}
  for stream, label_key in _STREAMS:
    out[f"{stream}_image"] = crop_images(batch[f"{stream}_window"], batch[f"{stream}_index"],
                                         batch[f"{stream}_frac"], mean, inv_std)
    out[label_key] = batch[label_key].astype(jnp.int32)
  if "unlabeled_label" in batch:
    out["unlabeled_label"] = batch["unlabeled_label"].astype(jnp.int32)
  return out
