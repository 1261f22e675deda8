"""Random-access data sources: Pascal VOC, Cityscapes, custom folders, TFDS and synthetic.

Each split is a picklable object with `__len__`, `load(i, with_label)` -> (image uint8
[H, W, 3], label uint8 [H, W] or None), `name(i)` and `check(with_labels)`, so that grain
worker processes (spawned) can rebuild it. Bad input raises `DataError` with one line
naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from dgcl_jax.data import synthetic


class DataError(ValueError):
  """Input data that cannot be used; the message is one line naming the file and the problem."""


def read_list(path: str) -> list[str]:
  """Non-empty, stripped lines of a split list (a missing trailing newline is fine)."""
  if not path:
    raise DataError("a split list path is empty in the config (config.data.*_list)")
  if not os.path.isfile(path):
    raise DataError(f"{path}: split list not found")
  with open(path) as f:
    lines = [line.strip() for line in f]
  lines = [line for line in lines if line]
  if not lines:
    raise DataError(f"{path}: split list is empty")
  return lines


def load_image(path: str) -> np.ndarray:
  """RGB image as uint8 [H, W, 3]; DataError if missing or undecodable."""
  try:
    with Image.open(path) as im:
      im.load()
      arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None
  return arr


def load_label(path: str, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """Class-index mask as uint8 [H, W]; DataError if missing, undecodable, multi-channel or out of range."""
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
        raise DataError(f"{path}: label image has mode {mode}; expected one channel of class indices")
      arr = np.asarray(im)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{path}: label file not found") from None
  except Exception as e:
    raise DataError(f"{path}: cannot decode label ({type(e).__name__}: {_one_line(e)})") from None
  return check_label_values(arr, num_classes, ignore_label, path)


def check_label_values(arr: np.ndarray, num_classes: int, ignore_label: int, where: str) -> np.ndarray:
  """Returns `arr` as uint8 [H, W] after checking values lie in [0, num_classes) or equal ignore_label."""
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 2:
    raise DataError(f"{where}: label has shape {arr.shape}; expected [H, W]")
  arr = np.asarray(arr)
  if arr.dtype != np.uint8:
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise DataError(f"{where}: label values span [{arr.min()}, {arr.max()}]; expected [0, {num_classes}) or {ignore_label}")
    arr = arr.astype(np.uint8)
  counts = np.bincount(arr.ravel(), minlength=256)
  counts[ignore_label] = 0
  bad = np.flatnonzero(counts[num_classes:]) + num_classes
  if bad.size:
    raise DataError(f"{where}: label values {bad[:5].tolist()} outside [0, {num_classes}) and not {ignore_label}")
  return arr


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())[:200]


def _check_pair(image: np.ndarray, label: np.ndarray | None, where: str) -> None:
  if label is not None and image.shape[:2] != label.shape:
    raise DataError(f"{where}: image size {image.shape[1]}x{image.shape[0]} differs from label size "
                    f"{label.shape[1]}x{label.shape[0]}")


@dataclasses.dataclass
class FileSplit:
  """Images (and labels) in files: names [N], image paths [N], label paths [N] or None."""
  names: list[str]
  images: list[str]
  labels: list[str] | None
  num_classes: int
  ignore_label: int = 255
  list_path: str = ""

  def __len__(self) -> int:
    return len(self.images)

  def name(self, i: int) -> str:
    return self.names[i]

  def load(self, i: int, with_label: bool = True):
    image = load_image(self.images[i])
    if not with_label or self.labels is None:
      return image, None
    label = load_label(self.labels[i], self.num_classes, self.ignore_label)
    _check_pair(image, label, self.labels[i])
    return image, label

  def check(self, with_labels: bool = True) -> None:
    """Every listed file exists (cheap: no decoding)."""
    if not self.images:
      raise DataError(f"{self.list_path}: split list is empty")
    for k, path in enumerate(self.images):
      if not os.path.isfile(path):
        raise DataError(f"{path}: image file not found (listed in {self.list_path})")
      if with_labels and self.labels is not None and not os.path.isfile(self.labels[k]):
        raise DataError(f"{self.labels[k]}: label file not found (listed in {self.list_path})")


@dataclasses.dataclass
class SyntheticSplit:
  """The generated dataset of dgcl_jax/data/synthetic.py."""
  seed: int
  split: str
  size: int
  image_size: int
  num_classes: int

  def __len__(self) -> int:
    return self.size

  def name(self, i: int) -> str:
    return f"synthetic_{self.split}_{i:05d}"

  def load(self, i: int, with_label: bool = True):
    image, label = synthetic.generate(self.seed, self.split, i, self.image_size, self.num_classes)
    return image, (label if with_label else None)

  def check(self, with_labels: bool = True) -> None:
    if self.size <= 0:
      raise DataError(f"synthetic {self.split} split: size {self.size} must be positive")


class TfdsSplit:
  """Records [start, stop) of a TFDS split via tfds.data_source (opened lazily, also in workers)."""

  def __init__(self, name: str, data_dir: str, split: str, start: int, stop: int | None,
               image_key: str, label_key: str, num_classes: int, ignore_label: int = 255):
    self.name_, self.data_dir, self.split = name, data_dir, split
    self.image_key, self.label_key = image_key, label_key
    self.num_classes, self.ignore_label = num_classes, ignore_label
    self._source = None
    total = len(self._open())
    self.start = min(start, total)
    self.stop = total if stop is None else min(stop, total)

  def _open(self):
    if self._source is None:
      tfds = import_tfds()
      try:
        self._source = tfds.data_source(self.name_, split=self.split, data_dir=self.data_dir or None)
      except Exception as e:
        raise DataError(f"tfds:{self.name_}[{self.split}]: cannot open ({type(e).__name__}: {_one_line(e)})") from None
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self.stop - self.start

  def name(self, i: int) -> str:
    return f"{self.name_}_{self.split}_{self.start + i:06d}"

  def load(self, i: int, with_label: bool = True):
    where = f"tfds:{self.name_}[{self.split}][{self.start + i}]"
    record: Any = self._open()[self.start + i]
    image = np.asarray(record[self.image_key])
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, -1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise DataError(f"{where}: image has shape {image.shape}; expected [H, W, 3]")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, -1)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    if not with_label:
      return image, None
    label = check_label_values(np.asarray(record[self.label_key]), self.num_classes, self.ignore_label, where)
    _check_pair(image, label, where)
    return image, label

  def check(self, with_labels: bool = True) -> None:
    if len(self) <= 0:
      raise DataError(f"tfds:{self.name_}[{self.split}]: no records in [{self.start}, {self.stop})")


def import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("config.data.name='tfds' needs tensorflow_datasets: pip install tensorflow-datasets") from None
  return tfds


@dataclasses.dataclass
class Splits:
  labeled: Any
  unlabeled: Any
  val: Any


def _file_split(root, list_path, num_classes, ignore, path_fn, with_labels=True) -> FileSplit:
  names, images, labels = [], [], []
  for line in read_list(list_path):
    parts = line.split()
    if len(parts) >= 2:        # "image_path label_path" lines, relative to the root
      name, image, label = os.path.splitext(os.path.basename(parts[0]))[0], parts[0], parts[1]
    else:
      name, image, label = path_fn(parts[0])
    names.append(name)
    images.append(os.path.join(root, image))
    labels.append(os.path.join(root, label))
  return FileSplit(names, images, labels if with_labels else None, num_classes, ignore, list_path)


def _pascal_paths(item):
  return item, f"JPEGImages/{item}.jpg", f"SegmentationClassAug/{item}.png"


def _cityscapes_paths(item):
  label = item
  if label.endswith("_leftImg8bit.png"):
    label = label[:-len("_leftImg8bit.png")] + "_gtFine_labelTrainIds.png"
  label = label.replace("leftImg8bit", "gtFine", 1)
  name = os.path.basename(item).replace("_leftImg8bit.png", "")
  return name, item, label


def _custom_paths_fn(d):
  def fn(item):
    return item, f"{d.image_dir}/{item}{d.image_ext}", f"{d.mask_dir}/{item}{d.mask_ext}"
  return fn


def check_root(config) -> None:
  d = config.data
  if d.name in ("pascal", "cityscapes", "custom"):
    if not d.root:
      raise DataError(f"config.data.root is empty: set it to the {d.name} dataset directory")
    if not os.path.isdir(d.root):
      raise DataError(f"{d.root}: dataset root not found (config.data.root)")


def build_splits(config) -> Splits:
  """The labeled, unlabeled and val splits of `config.data` (reads list files, no images)."""
  d = config.data
  ignore = int(d.ignore_label)
  if d.name == "synthetic":
    size = int(d.synthetic_image_size)
    mk = lambda split, n: SyntheticSplit(int(config.seed), split, int(n), size, int(d.num_classes))
    return Splits(mk("labeled", d.synthetic_num_labeled), mk("unlabeled", d.synthetic_num_unlabeled),
                  mk("val", d.synthetic_num_val))
  if d.name == "tfds":
    if not d.tfds_name:
      raise DataError("config.data.tfds_name is empty: name the TFDS dataset")
    n_lab = int(d.tfds_num_labeled)
    if n_lab <= 0:
      raise DataError(f"config.data.tfds_num_labeled={n_lab}: must be positive")
    mk = lambda split, a, b: TfdsSplit(d.tfds_name, d.tfds_data_dir, split, a, b, d.tfds_image_key,
                                       d.tfds_label_key, int(d.num_classes), ignore)
    return Splits(mk(d.tfds_train_split, 0, n_lab), mk(d.tfds_train_split, n_lab, None),
                  mk(d.tfds_val_split, 0, None))
  check_root(config)
  fn = {"pascal": _pascal_paths, "cityscapes": _cityscapes_paths}.get(d.name) or _custom_paths_fn(d)
  labeled = _file_split(d.root, d.labeled_list, int(d.num_classes), ignore, fn)
  # Labels of unlabeled images only for the ground-truth pseudo-label diagnostic (config.loss).
  oracle = config.loss.pseudo_labels == "ground_truth"
  if d.unlabeled_list:
    unlabeled = _file_split(d.root, d.unlabeled_list, int(d.num_classes), ignore, fn, with_labels=oracle)
  else:  # no unlabeled list: the labeled images (without their labels) serve as the unlabeled set
    unlabeled = labeled if oracle else dataclasses.replace(labeled, labels=None)
  val = _file_split(d.root, d.val_list, int(d.num_classes), ignore, fn)
  return Splits(labeled, unlabeled, val)


def resample_indices(n_items: int, n_out: int, seed: int, stream: int = 0) -> np.ndarray:
  """The reference's law: repeat [0, n_items) ceil(n_out / n_items) times, draw n_out without replacement."""
  reps = math.ceil(n_out / n_items)
  rng = np.random.default_rng([seed, 7919, stream, n_items, n_out])
  draw = rng.choice(n_items * reps, size=n_out, replace=False)
  return (draw % n_items).astype(np.int64)
