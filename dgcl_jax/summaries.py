"""TensorBoard scalars and colorized image summaries (tensorboardX), written by process 0 only."""

from __future__ import annotations

import os

import numpy as np


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_label: int = 255) -> np.ndarray:
  """[H, W] class indices (ignore_label shown white) -> [H, W, 3] uint8."""
  mask = np.asarray(mask)
  out = palette[np.clip(mask, 0, len(palette) - 1)].astype(np.uint8)
  out[mask == ignore_label] = 255
  return out


def denormalize(image: np.ndarray, config) -> np.ndarray:
  """Normalized [H, W, 3] float -> uint8 RGB."""
  image = np.asarray(image, np.float32) * np.asarray(config.data.std) + np.asarray(config.data.mean)
  return np.clip(image, 0, 255).astype(np.uint8)


class Writer:
  """A thin TensorBoard writer under <workdir>/tensorboard; does nothing when disabled."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      if value is not None:
        self._writer.add_scalar(name, float(value), step)

  def image(self, step: int, name: str, image_hwc: np.ndarray) -> None:
    if self._writer is not None:
      self._writer.add_image(name, np.asarray(image_hwc), step, dataformats="HWC")

  def train_images(self, step: int, summary, config) -> None:
    if self._writer is None or not summary:
      return
    from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    palette = np.asarray(pipeline.palette(config.model.num_classes))
    image = np.asarray(summary["unlabeled_image"])[0]
    pseudo = np.asarray(summary["pseudo_label"])[0]
    self.image(step, "train/unlabeled_image", denormalize(image, config))
    self.image(step, "train/pseudo_label", colorize(pseudo, palette, config.data.ignore_label))

  def eval_images(self, step: int, fns, state, config) -> None:
    """Input, label and student/teacher predictions of the first few validation images, both
    networks in float32 as the mIoU scores them (fns: step.StepFunctions, compiled once per run)."""
    if self._writer is None or config.num_eval_images_logged <= 0:
      return
    import jax  # pylint: disable=g-import-not-at-top
    from dgcl_jax import step as step_lib  # pylint: disable=g-import-not-at-top
    from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    palette = np.asarray(pipeline.palette(config.model.num_classes))
    ignore = config.data.ignore_label
    item = next(iter(pipeline.create_val_iterator(config, mode="center", batch_size=1,
                                                  process_index=0, process_count=1)))
    image, label = item["image"], item["label"]
    self.image(step, "eval/input", denormalize(image[0], config))
    self.image(step, "eval/label", colorize(label[0], palette, ignore))
    for name, teacher in (("student", False), ("teacher", True)):
      logits = fns.predict(step_lib.variables_of(state, teacher), image)
      pred = np.asarray(jax.device_get(logits)).argmax(-1)[0]
      self.image(step, f"eval/{name}_prediction", colorize(pred, palette, ignore))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
