"""Random-access data sources: Pascal VOC, Cityscapes, custom folders, TFDS and synthetic.

Each split is a picklable object with `__len__`, `load(i, with_label)` -> (image uint8
[H, W, 3], label uint8 [H, W] or None), `name(i)` and `check(with_labels)`, so that grain
worker processes (spawned) can rebuild it. Bad input raises `DataError` with one line
naming the file and the problem.
"""

from __future__ import annotations

import concurrent.futures
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


# Modes that PIL's convert("RGB") maps faithfully (alpha dropped, palette looked up, CMYK and
# YCbCr converted); 16-bit grayscale is scaled by hand, since PIL clips it to 255.
_RGB_MODES = frozenset(("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "HSV"))
_GRAY16_MODES = frozenset(("I;16", "I;16L", "I;16B", "I;16N", "I"))
_LABEL_MODES = ("L", "P")


def _check_image_mode(mode: str, path: str) -> None:
  if mode not in _RGB_MODES and mode not in _GRAY16_MODES:
    raise DataError(f"{path}: image mode {mode} is not supported; expected RGB, RGBA, grayscale (8 or 16 bit), "
                    "palette, CMYK or YCbCr")


def _check_label_mode(mode: str, path: str) -> None:
  if mode not in _LABEL_MODES:
    raise DataError(f"{path}: label image has mode {mode}; expected 8-bit 'L' or palette 'P' class indices")


def _image_to_rgb(im: Image.Image, path: str) -> np.ndarray:
  """A decoded PIL image -> uint8 [H, W, 3]; 16-bit grayscale scaled by 255 / 65535, rounded."""
  if im.mode in _GRAY16_MODES:
    v = np.asarray(im)
    if v.size and (v.min() < 0 or v.max() > 65535):  # mode 'I' is 32-bit: only 16-bit data has a known scale
      raise DataError(f"{path}: image mode {im.mode} has values in [{v.min()}, {v.max()}]; expected [0, 65535]")
    gray = ((v.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return np.repeat(gray[..., None], 3, axis=-1)
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")  # PIL asks for this route for palettes with transparency; alpha dropped below
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str) -> np.ndarray:
  """RGB image as uint8 [H, W, 3]; DataError if missing, undecodable or of an unsupported mode."""
  try:
    with Image.open(path) as im:
      _check_image_mode(im.mode, path)
      im.load()
      arr = _image_to_rgb(im, path)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None
  return arr


def load_label(path: str, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """Class-index mask as uint8 [H, W]; DataError if missing, undecodable, not 'L'/'P' or out of range."""
  try:
    with Image.open(path) as im:
      _check_label_mode(im.mode, path)
      im.load()
      arr = np.asarray(im)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{path}: label file not found") from None
  except Exception as e:
    raise DataError(f"{path}: cannot decode label ({type(e).__name__}: {_one_line(e)})") from None
  return check_label_values(arr, num_classes, ignore_label, path)


def check_pair_file(image: str, label: str | None, num_classes: int, ignore_label: int,
                    decode_label: bool) -> None:
  """Start-up check of one listed pair without decoding the image: its header (PIL reads only that
  on open) and mode; the label's mode and size; with `decode_label`, its pixels' class ids."""
  try:
    with Image.open(image) as im:
      _check_image_mode(im.mode, image)
      size = im.size
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{image}: image file not found") from None
  except Exception as e:
    raise DataError(f"{image}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None
  if label is None:
    return
  try:
    with Image.open(label) as im:
      _check_label_mode(im.mode, label)
      if im.size != size:
        raise DataError(f"{label}: image size {size[0]}x{size[1]} differs from label size {im.size[0]}x{im.size[1]}")
      if decode_label:  # PIL's histogram of an 'L' or 'P' image: 256 counts, no array copy
        _check_counts(im.histogram(), num_classes, ignore_label, label)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{label}: label file not found") from None
  except Exception as e:
    raise DataError(f"{label}: cannot decode label ({type(e).__name__}: {_one_line(e)})") from None


def check_workers() -> int:
  """Threads for start-up checks: PIL releases the GIL while reading and decoding."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus = os.cpu_count() or 1
  return min(32, cpus + 4)


def first_error(fn, n: int, where: str = "", workers: int | None = None) -> None:
  """Runs fn(i) for i in [0, n) on a thread pool; raises the DataError of the lowest failing i,
  naming the list `where` and counting the other failures (one line)."""
  def run(chunk):
    errors = []
    for i in chunk:
      try:
        fn(i)
      except DataError as e:
        errors.append(str(e))
    return errors
  workers = min(workers or check_workers(), n)
  # A few contiguous chunks per thread: one future per item costs more than a stat.
  size = max(1, math.ceil(n / (4 * max(workers, 1))))
  chunks = [range(a, min(a + size, n)) for a in range(0, n, size)]
  if workers <= 1:
    found = list(map(run, chunks))
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      found = list(ex.map(run, chunks))
  errors = [m for chunk in found for m in chunk]
  if errors:
    notes = ([f"listed in {where}"] if where else []) + (
        [f"{len(errors) - 1} more bad entries in this list"] if len(errors) > 1 else [])
    raise DataError(errors[0] + (f" ({'; '.join(notes)})" if notes else ""))


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
  _check_counts(np.bincount(arr.ravel(), minlength=256), num_classes, ignore_label, where)
  return arr


def _check_counts(counts, num_classes: int, ignore_label: int, where: str) -> None:
  """counts [256]: pixels per label value."""
  counts = np.array(counts, np.int64)
  if 0 <= ignore_label < counts.size:
    counts[ignore_label] = 0
  bad = np.flatnonzero(counts[num_classes:]) + num_classes
  if bad.size:
    raise DataError(f"{where}: label values {bad[:5].tolist()} outside [0, {num_classes}) and not {ignore_label}")


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

  def check(self, with_labels: bool = True, decode_labels: bool = False) -> None:
    """Every listed file exists (a stat each); with `decode_labels` also the image headers and modes,
    the labels' modes and sizes, and the labels' class ids (images are never decoded here)."""
    if not self.images:
      raise DataError(f"{self.list_path}: split list is empty")
    labels = self.labels if with_labels else None

    def exists(i):
      if not os.path.isfile(self.images[i]):
        raise DataError(f"{self.images[i]}: image file not found")
      if labels is not None and not os.path.isfile(labels[i]):
        raise DataError(f"{labels[i]}: label file not found")

    def decodes(i):
      check_pair_file(self.images[i], None if labels is None else labels[i], self.num_classes,
                      self.ignore_label, decode_label=True)

    first_error(decodes if decode_labels else exists, len(self.images), self.list_path)


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

  def check(self, with_labels: bool = True, decode_labels: bool = False) -> None:
    del with_labels, decode_labels  # generated: nothing to read
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

  def check(self, with_labels: bool = True, decode_labels: bool = False) -> None:
    """Records exist; labels are checked as they are read (decoding a record decodes its image too)."""
    del with_labels, decode_labels
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


def _synthetic_split(config, split: str, n) -> SyntheticSplit:
  d = config.data
  return SyntheticSplit(int(config.seed), split, int(n), int(d.synthetic_image_size), int(config.model.num_classes))


def _tfds_split(config, split: str, start: int, stop: int | None) -> TfdsSplit:
  d = config.data
  if not d.tfds_name:
    raise DataError("config.data.tfds_name is empty: name the TFDS dataset")
  return TfdsSplit(d.tfds_name, d.tfds_data_dir, split, start, stop, d.tfds_image_key, d.tfds_label_key,
                   int(config.model.num_classes), int(d.ignore_label))


def _paths_fn(config):
  d = config.data
  check_root(config)
  return {"pascal": _pascal_paths, "cityscapes": _cityscapes_paths}.get(d.name) or _custom_paths_fn(d)


def build_val_split(config):
  """The validation split of `config.data` alone (reads the val list only, no images)."""
  d = config.data
  if d.name == "synthetic":
    return _synthetic_split(config, "val", d.synthetic_num_val)
  if d.name == "tfds":
    return _tfds_split(config, d.tfds_val_split, 0, None)
  return _file_split(d.root, d.val_list, int(config.model.num_classes), int(d.ignore_label), _paths_fn(config))


def build_splits(config) -> Splits:
  """The labeled, unlabeled and val splits of `config.data` (reads list files, no images)."""
  d = config.data
  ignore = int(d.ignore_label)
  if d.name == "synthetic":
    return Splits(_synthetic_split(config, "labeled", d.synthetic_num_labeled),
                  _synthetic_split(config, "unlabeled", d.synthetic_num_unlabeled), build_val_split(config))
  if d.name == "tfds":
    n_lab = int(d.tfds_num_labeled)
    if d.tfds_name and n_lab <= 0:
      raise DataError(f"config.data.tfds_num_labeled={n_lab}: must be positive")
    return Splits(_tfds_split(config, d.tfds_train_split, 0, n_lab),
                  _tfds_split(config, d.tfds_train_split, n_lab, None), build_val_split(config))
  fn = _paths_fn(config)
  labeled = _file_split(d.root, d.labeled_list, int(config.model.num_classes), ignore, fn)
  # Labels of unlabeled images only for the ground-truth pseudo-label diagnostic (config.loss).
  oracle = config.loss.pseudo_labels == "ground_truth"
  if d.unlabeled_list:
    unlabeled = _file_split(d.root, d.unlabeled_list, int(config.model.num_classes), ignore, fn, with_labels=oracle)
  else:  # no unlabeled list: the labeled images (without their labels) serve as the unlabeled set
    unlabeled = labeled if oracle else dataclasses.replace(labeled, labels=None)
  val = _file_split(d.root, d.val_list, int(config.model.num_classes), ignore, fn)
  return Splits(labeled, unlabeled, val)


def resample_indices(n_items: int, n_out: int, seed: int, stream: int = 0) -> np.ndarray:
  """The reference's law: repeat [0, n_items) ceil(n_out / n_items) times, draw n_out without replacement."""
  reps = math.ceil(n_out / n_items)
  rng = np.random.default_rng([seed, 7919, stream, n_items, n_out])
  draw = rng.choice(n_items * reps, size=n_out, replace=False)
  return (draw % n_items).astype(np.int64)
