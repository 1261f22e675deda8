"""Training and validation input pipelines on grain (REFERENCE.md sections 2 and 3).

The training stream is a pure function of (seed, global step, row): step s lies in epoch
e = s // L at position j = s % L; both streams use epoch e's permutation of [0, n_sup), laid
out like the reference's DistributedSampler (slice w of W, row k of its B rows reads padded
position (j * B + k) * W + w). Each row's transform draws from a generator seeded with
(seed, stream, epoch, position), so batches do not depend on the worker count, and the
iterator state is just the number of steps consumed.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Iterator

from absl import logging
import grain
import numpy as np

from dgcl_jax import config_base
from dgcl_jax.data import sources
from dgcl_jax.data import transforms
from dgcl_jax.data.sources import DataError, load_image  # re-exported

__all__ = [
    "DataError", "check_inputs", "check_val_inputs", "steps_per_epoch", "create_train_iterator",
    "create_val_iterator", "num_val_images", "class_names", "palette", "load_image", "normalize", "num_unlabeled",
]

_LABELED, _UNLABELED = 1, 2
_MAX_STEPS = 1 << 40


def normalize(image_uint8: np.ndarray, config) -> np.ndarray:
  """uint8 [..., 3] RGB -> float32 normalized with config.data.mean / std."""
  return transforms.normalize(image_uint8, config.data.mean, config.data.std)


def class_names(config) -> tuple[str, ...]:
  names = tuple(config.data.class_names)
  n = int(config.model.num_classes)
  if len(names) != n:
    names = tuple(names[:n]) + tuple(f"class_{i}" for i in range(len(names), n))
  return names


def palette(num_classes: int) -> np.ndarray:
  """The Pascal VOC colour map: uint8 [num_classes, 3]."""
  out = np.zeros((num_classes, 3), np.uint8)
  for i in range(num_classes):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out[i] = (r, g, b)
  return out


def check_inputs(config) -> None:
  """Before anything compiles: the training lists and the validation set (check_val_inputs).

  Training files are only required to exist (a stat each: Pascal's ~10k unlabeled images, whose
  labels need not exist, REFERENCE.md section 2); their decoding problems surface when read.
  Raises DataError, one line naming the file and the problem.
  """
  splits = sources.build_splits(config)
  splits.labeled.check(with_labels=True)
  splits.unlabeled.check(with_labels=config.loss.pseudo_labels == "ground_truth")
  splits.val.check(with_labels=True, decode_labels=True)


def check_val_inputs(config) -> None:
  """The validation set alone, in parallel threads: every image's header and mode, every label
  decoded (mode 'L' or 'P', size equal to its image's, class ids < num_classes or ignore_label).
  Images are not decoded (a truncated JPEG is named when read). Raises DataError, one line."""
  sources.build_val_split(config).check(with_labels=True, decode_labels=True)


def num_unlabeled(config) -> int:
  """n_sup: the size of the unlabeled set, to which the labeled stream is resampled (reads lists only)."""
  d = config.data
  if d.name in ("pascal", "cityscapes", "custom"):
    return len(sources.read_list(d.unlabeled_list or d.labeled_list))
  return len(sources.build_splits(config).unlabeled)


def steps_per_epoch(config, n_sup: int | None = None) -> int:
  """L = config.steps_per_epoch if > 0, else floor(ceil(n_sup / W) / (batch_size / W)); n_sup read
  from the split lists unless given."""
  if int(config.steps_per_epoch) > 0:
    return int(config.steps_per_epoch)
  w = int(config.num_slices)
  n_sup = num_unlabeled(config) if n_sup is None else int(n_sup)
  steps = math.ceil(n_sup / w) // (int(config.batch_size) // w)
  if steps < 1:
    raise DataError(f"{config.data.unlabeled_list or config.data.name}: {n_sup} unlabeled images give no full "
                    f"batch of {config.batch_size}; lower config.batch_size or set config.steps_per_epoch")
  return steps


def num_val_images(config) -> int:
  return len(sources.build_val_split(config))


def _num_workers(config) -> int:
  n = int(config.data.num_workers)
  if n >= 0:
    return n
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus = os.cpu_count() or 1
  return max(1, min(cpus, 32))


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  return int(process_index), int(process_count)


class _TrainRows:
  """Random access to this process's rows of the training stream from `start_step` on."""

  def __init__(self, splits, params, seed, n_sup, steps, batch_size, num_slices, process_index,
               local_batch, start_step, labeled_map, unlabeled_map, with_unlabeled_labels=False,
               max_image_size=(), label_type=np.uint8):
    self.labeled, self.unlabeled, self.params = splits.labeled, splits.unlabeled, params
    self.seed, self.n_sup, self.steps = seed, n_sup, steps
    self.slice_batch, self.num_slices = batch_size // num_slices, num_slices
    self.row0, self.local_batch, self.start_step = process_index * local_batch, local_batch, start_step
    self.labeled_map, self.unlabeled_map = labeled_map, unlabeled_map
    self.with_unlabeled_labels = with_unlabeled_labels
    self.max_image_size = tuple(max_image_size or ())
    self.window_hw = transforms.window_size(params, self.max_image_size)
    self.label_type = label_type
    self._perm = (None, None)

  def __len__(self) -> int:
    return _MAX_STEPS * self.local_batch

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, 104729, epoch]).permutation(self.n_sup))
    return self._perm[1]

  def indices(self, k: int) -> tuple[int, int, int, int]:
    """Row k -> (epoch, position in the epoch, labeled list index, unlabeled list index)."""
    step = self.start_step + k // self.local_batch
    row = self.row0 + k % self.local_batch
    epoch, j = divmod(step, self.steps)
    w, r = divmod(row, self.slice_batch)
    # DistributedSampler pads its list by wrapping around: padded[i] = perm[i % n].
    pos = (j * self.slice_batch + r) * self.num_slices + w
    idx = int(self._permutation(epoch)[pos % self.n_sup])
    return epoch, pos, int(self.labeled_map[idx]), int(self.unlabeled_map[idx])

  def _load(self, split, i: int, with_label: bool):
    image, label = split.load(i, with_label=with_label)
    limit = self.max_image_size
    if limit and (image.shape[0] > limit[0] or image.shape[1] > limit[1]):
      where = split.images[i] if hasattr(split, "images") else split.name(i)
      raise DataError(f"{where}: image {image.shape[0]}x{image.shape[1]} (HxW) is larger than "
                      f"config.data.max_image_size={tuple(limit)}; raise it")
    return image, label

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    """Row k in the compact form transforms.train_window ships (data/assemble.py finishes it)."""
    epoch, pos, lab, unl = self.indices(k)
    window = functools.partial(transforms.train_window, p=self.params, window_hw=self.window_hw,
                               label_type=self.label_type)
    row = {}
    image, label = self._load(self.labeled, lab, with_label=True)
    for key, value in window(image, label, np.random.default_rng([self.seed, _LABELED, epoch, pos])).items():
      row[f"labeled_{key}"] = value
    image, u_label = self._load(self.unlabeled, unl, with_label=self.with_unlabeled_labels)
    unlabeled = window(image, None, np.random.default_rng([self.seed, _UNLABELED, epoch, pos]))
    unlabeled["ignore"] = unlabeled.pop("label")
    for key, value in unlabeled.items():
      row[f"unlabeled_{key}"] = value
    if self.with_unlabeled_labels:  # the same draws, so the label lines up with the image
      row["unlabeled_label"] = window(image, u_label, np.random.default_rng([self.seed, _UNLABELED, epoch, pos]))["label"]
    return row


def _grain_iter(rows, batch: int | None, num_workers: int, buffer: int):
  ds = grain.MapDataset.source(rows)
  if batch:
    ds = ds.batch(batch, drop_remainder=True)
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer))
  else:
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(buffer, 1)))
  return iter(ds)


def _unwrap_data_error(e: BaseException) -> DataError | None:
  """A DataError raised in a grain worker may come back wrapped; find it by type or by text."""
  seen = e
  while seen is not None:
    if isinstance(seen, DataError):
      return seen
    seen = seen.__cause__ or seen.__context__
  text = str(e)
  if "DataError" in text:
    for line in text.splitlines():
      if "DataError:" in line:
        return DataError(line.split("DataError:", 1)[1].strip())
  return None


def _next(it):
  try:
    return next(it)
  except StopIteration:
    raise
  except Exception as e:  # pylint: disable=broad-except
    found = _unwrap_data_error(e)
    if found is not None and found is not e:
      raise DataError(str(found)) from None
    raise


def _own(batch: dict[str, Any]) -> dict[str, Any]:
  """Plain numpy copies: grain's worker outputs live in shared memory, freed when dropped here."""
  return {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}


class TrainIterator:
  """Infinite iterator over this process's rows of the training batches; resumable by step count."""

  def __init__(self, config, process_index: int, process_count: int):
    config_base.check_batch_split(config, num_processes=process_count)
    self._config = config
    self._splits = sources.build_splits(config)
    self.n_sup = len(self._splits.unlabeled)
    self.steps_per_epoch = steps_per_epoch(config, self.n_sup)   # the lists are read once, above
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = int(config.batch_size) // process_count
    seed = int(config.seed)
    self._labeled_map = sources.resample_indices(len(self._splits.labeled), self.n_sup, seed, _LABELED)
    self._unlabeled_map = sources.resample_indices(self.n_sup, self.n_sup, seed, _UNLABELED)
    self._params = transforms.TransformParams.from_config(config)
    self._workers = _num_workers(config)
    self.step = 0
    self._it = None

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  def _rows(self, start_step: int) -> _TrainRows:
    c = self._config
    return _TrainRows(self._splits, self._params, int(c.seed), self.n_sup, self.steps_per_epoch,
                      int(c.batch_size), int(c.num_slices), self.process_index, self.local_batch,
                      start_step, self._labeled_map, self._unlabeled_map,
                      with_unlabeled_labels=c.loss.pseudo_labels == "ground_truth",
                      max_image_size=tuple(c.data.get("max_image_size", ()) or ()),
                      label_type=transforms.label_dtype(int(c.model.num_classes), int(c.data.ignore_label)))

  def _start(self):
    self._it = _grain_iter(self._rows(self.step), self.local_batch, self._workers,
                           int(self._config.data.prefetch_buffer_size))

  def record_indices(self, step: int) -> tuple[list[int], list[int]]:
    """(labeled, unlabeled) list indices of this process's rows at global `step` (no loading)."""
    rows = self._rows(step)
    found = [rows.indices(r) for r in range(self.local_batch)]
    return [f[2] for f in found], [f[3] for f in found]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._start()
    batch = _next(self._it)
    self.step += 1
    return _own(batch)

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable: the number of batches consumed (plus facts checked on restore)."""
    return {"step": int(self.step), "seed": int(self._config.seed), "n_sup": int(self.n_sup),
            "steps_per_epoch": int(self.steps_per_epoch)}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "n_sup", "steps_per_epoch"):
      if key in state and int(state[key]) != int(self.get_state()[key]):
        logging.warning("input pipeline state has %s=%s, the config gives %s; the resumed batches differ from "
                        "the original run's", key, state[key], self.get_state()[key])
    self.close()
    self.step = int(state["step"])

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def create_train_iterator(config, process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """The training batches of this process: a dict of numpy arrays per step, forever.

  Rows [p * b, (p + 1) * b) of the global batch, b = batch_size // process_count, in the compact
  form of transforms.train_window, which the train step turns into float32 crops on the device
  (data/assemble.train_batch): for each of 'labeled' and 'unlabeled', '<stream>_window' uint8
  [b, Wh, Ww, 3] (source pixels), '<stream>_index' int32 [b, 2, 2, crop] and '<stream>_frac'
  float32 [b, 2, crop] (bilinear tables); 'labeled_label' and 'unlabeled_ignore' (255 on padding)
  [b, crop, crop] in uint8 (int32 where class ids or the ignore label exceed 255); with
  config.loss.pseudo_labels='ground_truth' also 'unlabeled_label'.
  """
  p, n = _process(process_index, process_count)
  return TrainIterator(config, p, n)


class _ValRows:
  """Rows of the centre-crop validation batches for one process; padding rows are dummies."""

  def __init__(self, split, params, global_batch, process_index, local_batch):
    self.split, self.params = split, params
    self.global_batch, self.row0, self.local_batch = global_batch, process_index * local_batch, local_batch
    self.num_batches = math.ceil(len(split) / global_batch)

  def __len__(self) -> int:
    return self.num_batches * self.local_batch

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    t, r = divmod(k, self.local_batch)
    i = t * self.global_batch + self.row0 + r
    c = self.params.crop_size
    if i >= len(self.split):
      return {"image": np.zeros((c, c, 3), np.float32),
              "label": np.full((c, c), self.params.ignore_label, np.int32), "valid": np.bool_(False)}
    image, label = self.split.load(i, with_label=True)
    image, label = transforms.center_transform(image, label, self.params)
    return {"image": image, "label": label, "valid": np.bool_(True)}


class _FullRows:
  """Full-size validation images of one process: images p, p + P, p + 2P, ..."""

  def __init__(self, split, params, process_index, process_count):
    self.split, self.params = split, params
    self.indices = list(range(process_index, len(split), process_count))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, k: int) -> dict[str, Any]:
    i = self.indices[k]
    image, label = self.split.load(i, with_label=True)
    return {"image": transforms.normalize(image, self.params.mean, self.params.std)[None],
            "label": label.astype(np.int32)[None], "name": self.split.name(i), "index": i}


class ValIterable:
  """Re-iterable validation batches; len() is the number of batches (items in 'full' mode)."""

  def __init__(self, rows, batch: int | None, workers: int, buffer: int):
    self._rows, self._batch, self._workers, self._buffer = rows, batch, workers, buffer

  def __len__(self) -> int:
    return len(self._rows) // (self._batch or 1)

  def __iter__(self):
    if len(self._rows) == 0:
      return
    it = _grain_iter(self._rows, self._batch, min(self._workers, len(self)), self._buffer)
    try:
      for _ in range(len(self)):
        yield _own(_next(it))
    finally:
      if hasattr(it, "close"):
        it.close()


def create_val_iterator(config, mode: str = "center", process_index: int | None = None,
                        process_count: int | None = None, batch_size: int | None = None) -> ValIterable:
  """Validation data of this process; each image is scored once across processes.

  mode 'center': batches of 'image' float32 [b, vc, vc, 3], 'label' int32 [b, vc, vc], 'valid'
  bool [b], where b = batch_size is this process's share (default config.batch_size //
  process_count; the global batch is b * process_count, process p holding rows [p b, (p+1) b))
  and vc = config.data.val_crop_size; the last batches are filled with all-255 dummies (valid
  False), and every process gets the same number of batches.
  mode 'full': one image per item: 'image' [1, H, W, 3], 'label' [1, H, W], 'name', 'index'
  (images p, p + P, ...; batch_size is ignored).
  """
  p, n = _process(process_index, process_count)
  split = sources.build_val_split(config)
  params = transforms.TransformParams.from_config(config, crop_size=int(config.data.val_crop_size))
  workers, buffer = _num_workers(config), int(config.data.prefetch_buffer_size)
  if mode == "full":
    return ValIterable(_FullRows(split, params, p, n), None, workers, buffer)
  if mode != "center":
    raise ValueError(f"mode={mode!r}: expected 'center' or 'full'")
  local = int(batch_size or max(1, int(config.batch_size) // n))
  return ValIterable(_ValRows(split, params, local * n, p, local), local, workers, buffer)
