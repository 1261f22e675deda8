"""The training and validation transforms of REFERENCE.md section 2, in numpy.

Training, in order: float + normalize, random rescale (bilinear align_corners=False without
antialiasing for the image, PyTorch legacy nearest for the label), horizontal flip, centred
pad then random crop. Resizing is separable and only the rows and columns that survive the
crop are computed, which gives exactly the values of resizing the whole image first.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dgcl_jax import ops


@dataclasses.dataclass(frozen=True)
class TransformParams:
  crop_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  rescale_range: tuple[float, float] = (0.5, 2.0)
  ignore_label: int = 255

  @classmethod
  def from_config(cls, config, crop_size: int | None = None) -> "TransformParams":
    d = config.data
    return cls(int(crop_size or d.crop_size), tuple(float(v) for v in d.mean),
               tuple(float(v) for v in d.std), tuple(float(v) for v in d.rescale_range),
               int(d.ignore_label))


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] RGB 0-255 -> float32 (x - mean) / std."""
  mean = np.asarray(mean, np.float32)
  inv_std = np.float32(1.0) / np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) * inv_std


@functools.lru_cache(maxsize=1024)
def bilinear_indices(in_size: int, out_size: int):
  """PyTorch bilinear, align_corners=False, in float32: (lo [out], hi [out], frac [out])."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear(image: np.ndarray, out_hw) -> np.ndarray:
  """Bilinear resize of [H, W, C] float32 to [out_h, out_w, C], align_corners=False, no antialiasing."""
  (h, w), (oh, ow) = image.shape[:2], out_hw
  return _bilinear_rows_cols(image.astype(np.float32, copy=False), *_sub(bilinear_indices(h, oh), slice(None)),
                             *_sub(bilinear_indices(w, ow), slice(None)))


def _sub(table, index):
  return tuple(t[index] for t in table)


def _bilinear_rows_cols(x, r_lo, r_hi, r_f, c_lo, c_hi, c_f):
  r_f = r_f[:, None, None]
  rows = x[r_lo] * (np.float32(1.0) - r_f) + x[r_hi] * r_f
  c_f = c_f[None, :, None]
  return rows[:, c_lo] * (np.float32(1.0) - c_f) + rows[:, c_hi] * c_f


def _draw(rng: np.random.Generator, h: int, w: int, p: TransformParams):
  """Random scale, flip and crop offsets; returns (new_h, new_w, flip, top, left, y0, x0)."""
  lo, hi = p.rescale_range
  if rng.random() < 0.5:
    s = lo + (1.0 - lo) * rng.random()
  else:
    s = 1.0 + (hi - 1.0) * rng.random()
  nh, nw = max(int(h * s), 1), max(int(w * s), 1)
  flip = bool(rng.random() < 0.5)
  c = p.crop_size
  pad_h, pad_w = max(c - nh, 0), max(c - nw, 0)
  y0 = int(rng.integers(0, nh + pad_h - c + 1))
  x0 = int(rng.integers(0, nw + pad_w - c + 1))
  return nh, nw, flip, pad_h // 2, pad_w // 2, y0, x0


def train_transform(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                    p: TransformParams):
  """uint8 image [H, W, 3], label [H, W] or None -> (float32 [c, c, 3], int32 [c, c]).

  Without a label the second output is the unlabeled ignore mask: 255 on padding, 0 elsewhere.
  """
  h, w = image.shape[:2]
  c = p.crop_size
  x = normalize(image, p.mean, p.std)
  nh, nw, flip, top, left, y0, x0 = _draw(rng, h, w, p)
  # The crop window in resized (and flipped) coordinates, clipped to the resized image.
  ra, rb = max(y0 - top, 0), min(y0 - top + c, nh)
  ca, cb = max(x0 - left, 0), min(x0 - left + c, nw)
  oy, ox = ra - (y0 - top), ca - (x0 - left)
  rows = np.arange(ra, rb)
  cols = np.arange(ca, cb)
  if flip:
    cols = nw - 1 - cols
  out_image = np.zeros((c, c, 3), np.float32)
  out_label = np.full((c, c), p.ignore_label, np.int32)
  if rows.size and cols.size:
    out_image[oy:oy + rows.size, ox:ox + cols.size] = _bilinear_rows_cols(
        x, *_sub(bilinear_indices(h, nh), rows), *_sub(bilinear_indices(w, nw), cols))
    if label is None:
      out_label[oy:oy + rows.size, ox:ox + cols.size] = 0
    else:
      iy = ops.legacy_nearest_indices(h, nh)[rows]
      ix = ops.legacy_nearest_indices(w, nw)[cols]
      out_label[oy:oy + rows.size, ox:ox + cols.size] = label[iy][:, ix]
  return out_image, out_label


def center_transform(image: np.ndarray, label: np.ndarray | None, p: TransformParams):
  """Validation: normalize, centre-pad (image 0, label 255) then centre-crop to p.crop_size.

  Returns (float32 [c, c, 3], int32 [c, c]); label None gives an all-ignore label.
  """
  h, w = image.shape[:2]
  c = p.crop_size
  pad_h, pad_w = max(c - h, 0), max(c - w, 0)
  top, left = pad_h // 2, pad_w // 2
  y0, x0 = (h + pad_h - c) // 2, (w + pad_w - c) // 2
  ra, rb = max(y0 - top, 0), min(y0 - top + c, h)
  ca, cb = max(x0 - left, 0), min(x0 - left + c, w)
  oy, ox = ra - (y0 - top), ca - (x0 - left)
  out_image = np.zeros((c, c, 3), np.float32)
  out_label = np.full((c, c), p.ignore_label, np.int32)
  out_image[oy:oy + rb - ra, ox:ox + cb - ca] = normalize(image[ra:rb, ca:cb], p.mean, p.std)
  if label is not None:
    out_label[oy:oy + rb - ra, ox:ox + cb - ca] = label[ra:rb, ca:cb]
  return out_image, out_label
