"""Evaluation: confusion matrices, mIoU, and the reference's sliding-window / multi-scale inference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dgcl_jax import ops


def confusion_matrix(predictions, labels, num_classes: int, ignore_label: int = 255):
  """[K, K] int32 counts (rows: ground truth, columns: prediction); ignore and out-of-range skipped."""
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions.astype(jnp.int32), num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def predictions_and_confusion(module, variables, images, labels, num_classes: int, ignore_label: int = 255):
  """(argmax predictions [B, H, W] int32, confusion [K, K]) of an eval-mode forward of images
  [B, H, W, 3], logits resized to the labels' [B, H, W]."""
  out = module.apply(variables, images, train=False)
  logits = ops.resize_bilinear_align_corners(out["pred"].astype(jnp.float32), labels.shape[1:3])
  predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return predictions, confusion_matrix(predictions, labels, num_classes, ignore_label)


def confusion_from_model(module, variables, images, labels, num_classes: int, ignore_label: int = 255):
  """Confusion matrix [K, K] of `predictions_and_confusion`."""
  return predictions_and_confusion(module, variables, images, labels, num_classes, ignore_label)[1]


@functools.partial(jax.jit, static_argnums=0)
def _forward(module, variables, images):
  """Eval-mode float32 logits; jitted once per network (modules compare by their config)."""
  return module.apply(variables, images, train=False)["pred"].astype(jnp.float32)


def miou_from_confusion(confusion: np.ndarray) -> tuple[float, np.ndarray]:
  """(mean IoU, per-class IoU [K]) with the reference's rule IoU = I / (U + 1e-10), all classes."""
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - intersection
  iou = intersection / (union + 1e-10)
  return float(iou.mean()), iou


class Predictor:
  """Logits of one image [1, H, W, 3] (normalized), center crop / sliding window, scales, flip."""

  def __init__(self, module, variables, num_classes: int, crop_size: int):
    self.variables = variables
    self.num_classes = num_classes
    self.crop_size = int(crop_size)
    self.module = module

  def _logits(self, image, out_hw):
    pred = _forward(self.module, self.variables, jnp.asarray(image))
    return ops.resize_bilinear_align_corners(pred, out_hw)

  def sliding_window(self, image: np.ndarray) -> jax.Array:
    """The reference's sliding window: stride ceil(2/3 crop), last window snapped to the edge."""
    crop = self.crop_size
    _, h, w, _ = image.shape
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
      image = np.pad(image, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))
    ph, pw = image.shape[1:3]
    stride = int(math.ceil(crop * 2 / 3))
    rows = int(math.ceil(max(ph - crop, 0) / stride)) + 1
    cols = int(math.ceil(max(pw - crop, 0) / stride)) + 1
    total = jnp.zeros((1, ph, pw, self.num_classes), jnp.float32)
    count = np.zeros((1, ph, pw, 1), np.float32)
    for r in range(rows):
      for c in range(cols):
        y0 = min(r * stride, ph - crop)
        x0 = min(c * stride, pw - crop)
        window = image[:, y0:y0 + crop, x0:x0 + crop]
        total = total.at[:, y0:y0 + crop, x0:x0 + crop].add(self._logits(window, (crop, crop)))
        count[:, y0:y0 + crop, x0:x0 + crop] += 1
    logits = total / jnp.asarray(count)
    return logits[:, top:top + h, left:left + w]

  def center(self, image: np.ndarray) -> jax.Array:
    """The whole image in one forward. A network that needs sides in whole patches (the DPT's 14)
    gets the image resized to the nearest multiples (bilinear, align_corners=True) and its logits
    resized back, as UniMatch V2's evaluation does; other networks see the image as it is."""
    from dgcl_jax import models  # pylint: disable=g-import-not-at-top
    multiple = models.input_multiple(self.module)
    h, w = image.shape[1:3]
    size = (max(multiple, int(h / multiple + 0.5) * multiple), max(multiple, int(w / multiple + 0.5) * multiple))
    if multiple > 1 and size != (h, w):
      image = ops.resize_bilinear_align_corners(jnp.asarray(image), size)
    return self._logits(image, (h, w))

  def predict(self, image: np.ndarray, mode: str = "sliding", scales=(1.0,), flip: bool = False) -> jax.Array:
    """Summed logits [1, H, W, K] over scales (and horizontal flips) at the image's size."""
    _, h, w, _ = image.shape
    total = jnp.zeros((1, h, w, self.num_classes), jnp.float32)
    long_side = max(h, w)
    for scale in scales:
      if scale == 1.0:
        scaled = image
      else:
        ratio = round(scale * long_side) / long_side
        size = (max(1, int(round(h * ratio))), max(1, int(round(w * ratio))))
        scaled = np.asarray(ops.resize_bilinear_align_corners(jnp.asarray(image), size))
      views = [scaled] + ([scaled[:, :, ::-1]] if flip else [])
      for i, view in enumerate(views):
        view = np.ascontiguousarray(view)
        logits = self.sliding_window(view) if mode == "sliding" else self.center(view)
        if i == 1:
          logits = logits[:, :, ::-1]
        total = total + ops.resize_bilinear_align_corners(logits, (h, w))
    return total
