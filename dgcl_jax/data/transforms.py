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


@dataclasses.dataclass(frozen=True)
class _Crop:
  """One random crop in resized (and flipped) coordinates: the resized image's rows and columns
  the crop keeps, in crop order, and where they land in the crop."""
  h: int
  w: int
  nh: int
  nw: int
  rows: np.ndarray
  cols: np.ndarray
  oy: int
  ox: int


def _plan_crop(h: int, w: int, rng: np.random.Generator, p: TransformParams) -> _Crop:
  c = p.crop_size
  nh, nw, flip, top, left, y0, x0 = _draw(rng, h, w, p)
  # The crop window in resized (and flipped) coordinates, clipped to the resized image.
  ra, rb = max(y0 - top, 0), min(y0 - top + c, nh)
  ca, cb = max(x0 - left, 0), min(x0 - left + c, nw)
  cols = np.arange(ca, cb)
  if flip:
    cols = nw - 1 - cols
  return _Crop(h, w, nh, nw, np.arange(ra, rb), cols, ra - (y0 - top), ca - (x0 - left))


def _crop_label(label: np.ndarray | None, crop: _Crop, p: TransformParams, dtype) -> np.ndarray:
  """The label crop (legacy nearest), or without a label the unlabeled ignore mask (255 on padding)."""
  c = p.crop_size
  out = np.full((c, c), p.ignore_label, dtype)
  rows, cols = crop.rows, crop.cols
  if rows.size and cols.size:
    region = (slice(crop.oy, crop.oy + rows.size), slice(crop.ox, crop.ox + cols.size))
    if label is None:
      out[region] = 0
    else:
      iy = ops.legacy_nearest_indices(crop.h, crop.nh)[rows]
      ix = ops.legacy_nearest_indices(crop.w, crop.nw)[cols]
      out[region] = label[iy][:, ix]
  return out


def train_transform(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                    p: TransformParams):
  """uint8 image [H, W, 3], label [H, W] or None -> (float32 [c, c, 3], int32 [c, c]).

  Without a label the second output is the unlabeled ignore mask: 255 on padding, 0 elsewhere.
  The pipeline ships `train_window`'s compact form instead; data/assemble.py turns it into
  exactly these values on the device.
  """
  h, w = image.shape[:2]
  c = p.crop_size
  crop = _plan_crop(h, w, rng, p)
  out_image = np.zeros((c, c, 3), np.float32)
  rows, cols = crop.rows, crop.cols
  if rows.size and cols.size:
    x = normalize(image, p.mean, p.std)
    out_image[crop.oy:crop.oy + rows.size, crop.ox:crop.ox + cols.size] = _bilinear_rows_cols(
        x, *_sub(bilinear_indices(h, crop.nh), rows), *_sub(bilinear_indices(w, crop.nw), cols))
  return out_image, _crop_label(label, crop, p, np.int32)


def window_size(p: TransformParams, max_image_size=None) -> tuple[int, int]:
  """Static (height, width) of `train_window`'s source window: the most source rows and columns
  one crop can read. A crop of c rows of an image shrunk by s reads at most c / s + 2 source rows
  (bilinear reads two neighbours), and never more than the image has: `max_image_size` (h, w)
  bounds it when the dataset's largest image is known (Pascal: 500 x 500)."""
  s_min = min(float(p.rescale_range[0]), 1.0)
  bound = int(np.ceil((p.crop_size + 1) / s_min)) + 2
  if not max_image_size:
    return bound, bound
  return min(bound, int(max_image_size[0])), min(bound, int(max_image_size[1]))


def label_dtype(num_classes: int, ignore_label: int):
  """The smallest integer type shipping class ids and the ignore label: uint8 for Pascal and Cityscapes."""
  return np.uint8 if max(num_classes - 1, ignore_label) <= 255 and ignore_label >= 0 else np.int32


def train_window(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, p: TransformParams,
                 window_hw: tuple[int, int], label_type=np.uint8) -> dict[str, np.ndarray]:
  """`train_transform`'s random crop in the compact form the pipeline ships (same draws from `rng`).

  Returns 'window' uint8 [Wh, Ww, 3]: the source pixels the crop reads (top-left aligned, zeros
  after); 'index' int32 [2, 2, c]: for the crop's rows then columns, the window row/column of the
  bilinear's low and high neighbour, -1 where the crop is padding; 'frac' float32 [2, c]: the
  high neighbour's weight; 'label' [c, c] of `label_type`: the label crop, or the ignore mask.
  data/assemble.py computes the float32 crop from these on the device. ValueError if the crop
  reads more than `window_hw` (see window_size).
  """
  h, w = image.shape[:2]
  c = p.crop_size
  crop = _plan_crop(h, w, rng, p)
  index = np.full((2, 2, c), -1, np.int32)
  frac = np.zeros((2, c), np.float32)
  window = np.zeros(tuple(window_hw) + (3,), np.uint8)
  if crop.rows.size and crop.cols.size:
    spans = []
    for axis, (sel, size, new, offset) in enumerate(((crop.rows, h, crop.nh, crop.oy),
                                                     (crop.cols, w, crop.nw, crop.ox))):
      lo, hi, f = _sub(bilinear_indices(size, new), sel)
      start, stop = int(min(lo.min(), hi.min())), int(max(lo.max(), hi.max())) + 1
      if stop - start > window_hw[axis]:
        raise ValueError(f"a crop reads {stop - start} source {('rows', 'columns')[axis]}, more than the "
                         f"window's {window_hw[axis]}")
      place = slice(offset, offset + sel.size)
      index[axis, 0, place], index[axis, 1, place] = lo - start, hi - start
      frac[axis, place] = f
      spans.append((start, stop))
    (y0, y1), (x0, x1) = spans
    window[:y1 - y0, :x1 - x0] = image[y0:y1, x0:x1]
  return {"window": window, "index": index, "frac": frac, "label": _crop_label(label, crop, p, label_type)}


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
