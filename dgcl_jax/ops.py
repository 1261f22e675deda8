"""Resize operators with the reference's (PyTorch) sampling rules.

`jax.image.resize` has neither `align_corners=True` bilinear nor PyTorch's legacy
'nearest' (source index floor(j * in / out), no half-pixel offset), so both are
written here as separable interpolation matrices: exact, static-shaped and
matmul-friendly on accelerators.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 weights of 1-D linear interpolation, align_corners=True."""
  weights = np.zeros((out_size, in_size), np.float32)
  if out_size == 1 or in_size == 1:
    weights[:, 0] = 1.0
    return weights
  # PyTorch computes the source coordinate in float32: j * (in - 1) / (out - 1).
  scale = np.float32(in_size - 1) / np.float32(out_size - 1)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def resize_bilinear_align_corners(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
  """Bilinear resize of NHWC `x` [B, H, W, C] to [B, out_h, out_w, C], align_corners=True.

  Computed in float32 (or the input's dtype if wider) and returned in x's dtype.
  """
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  wy = jnp.asarray(align_corners_matrix(in_h, out_h), dtype)
  wx = jnp.asarray(align_corners_matrix(in_w, out_w), dtype)
  y = jnp.einsum("oh,bhwc->bowc", wy, x.astype(dtype), preferred_element_type=dtype)
  y = jnp.einsum("pw,bowc->bopc", wx, y, preferred_element_type=dtype)
  return y.astype(x.dtype)


@functools.lru_cache(maxsize=256)
def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's legacy 'nearest': min(floor(j * (in / out)), in - 1) in float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest_legacy(x, out_hw: tuple[int, int]):
  """PyTorch legacy nearest resize of [B, H, W] or [B, H, W, C] (jax or numpy arrays)."""
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  iy = legacy_nearest_indices(x.shape[1], out_h)
  ix = legacy_nearest_indices(x.shape[2], out_w)
  return x[:, iy][:, :, ix]
