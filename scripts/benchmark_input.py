"""Training input pipeline throughput on generated Pascal-layout data (VOC-size JPEGs, crop 513).

  python scripts/benchmark.py input [--workers 0,1,2,all] [--batch 8] [--steps 20] [--cores N]
      [--reference_dir PATH] [--step_ms 0]

For each worker count: images/s (labeled + unlabeled), and the bytes each image crosses the
process boundary in (what a worker hands the trainer). `--reference_dir` also times the original
PyTorch project's own Pascal datasets and DataLoaders on the same files, from a checkout of it
(PATH holds dgcl/dataset/pascal_voc.py): one DataLoader per split as its trainer builds them,
in-process for workers 0, else workers // 2 processes each for an even count (so the same number
of workers in all), in the same run, so the ratio is one machine's. `--cores N` pins the whole run (workers
included) to N cores. `--step_ms` sleeps that long after each batch, as a device step would: the
rate then shows whether the host prepares the next batch while the step runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import pascal as pascal_config  # noqa: E402
from dgcl_jax.data import pipeline  # noqa: E402


def _write_dataset(root: str, n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "JPEGImages"))
  os.makedirs(os.path.join(root, "SegmentationClassAug"))
  ids = [f"bench_{i:04d}" for i in range(n)]
  for name in ids:
    h, w = (375, 500) if rng.random() < 0.7 else (500, 375)
    base = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
    image = np.kron(base, np.ones((25, 25, 1), np.uint8))[:h, :w]
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    label = np.kron(rng.integers(0, 21, (h // 50 + 1, w // 50 + 1)), np.ones((50, 50), np.int64))[:h, :w]
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=90)
    Image.fromarray(label.astype(np.uint8), mode="L").save(os.path.join(root, "SegmentationClassAug", f"{name}.png"))
  return ids


def _timed(batches, steps: int, warmup: int, step_ms: float):
  """(seconds for `steps` batches after `warmup`, the last batch)."""
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
    if step_ms:
      time.sleep(step_ms / 1000)
  return time.perf_counter() - t0, batch


def ours(root: str, lists: dict[str, str], args, workers: int) -> tuple[float, float]:
  """(images/s, bytes shipped per image) of dgcl-jax's training pipeline."""
  c = pascal_config.get_config("732")
  c.data.root = root
  c.data.labeled_list, c.data.unlabeled_list, c.data.val_list = lists["labeled"], lists["unlabeled"], lists["val"]
  c.data.crop_size = args.crop
  c.data.num_workers = workers
  c.batch_size = args.batch
  c.num_slices = 1
  c.steps_per_epoch = 1000
  pipeline.check_inputs(c)
  it = pipeline.create_train_iterator(c, 0, 1)
  try:
    seconds, batch = _timed(it, args.steps, args.warmup, args.step_ms)
  finally:
    it.close()
  images = 2 * args.batch
  return args.steps * images / seconds, sum(v.nbytes for v in batch.values()) / images


def reference(root: str, lists: dict[str, str], args, workers: int) -> tuple[float, float]:
  """(images/s, bytes per image) of the original project's Pascal datasets and DataLoaders."""
  import collections  # pylint: disable=g-import-not-at-top
  import collections.abc  # pylint: disable=g-import-not-at-top
  # Its transforms test isinstance(x, collections.Iterable), which Python 3.10 moved to collections.abc.
  collections.Iterable = collections.abc.Iterable
  sys.path.insert(0, args.reference_dir)
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.data import DataLoader  # pylint: disable=g-import-not-at-top
  from dgcl.dataset import pascal_voc  # pylint: disable=g-import-not-at-top
  if workers == 0:
    torch.set_num_threads(1)
  cfg = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "ignore_label": 255,
         "rand_resize": [0.5, 2.0], "flip": True}   # its Pascal train config: the dataset crops
  n_sup = 10 ** 6   # enough rows for any run: the lists are repeated to it
  loaders = []
  for split, name in (("sup", "labeled"), ("unsup", "unlabeled")):
    dset = pascal_voc.voc_dset(root, lists[name], pascal_voc.build_transfrom(cfg), 0, n_sup, split)
    if args.crop != 513:   # its crop to 513 is fixed in the dataset
      dset.crop = pascal_voc.psp_trsform.Crop([args.crop] * 2, crop_type="rand", ignore_label=255)
      dset.crop_unsup = pascal_voc.psp_trsform.Crop([args.crop] * 2, crop_type="rand", ignore_label=254)
    loaders.append(DataLoader(dset, batch_size=args.batch, num_workers=workers // 2, shuffle=False,
                              drop_last=True))
  seconds, batch = _timed(zip(*loaders), args.steps, args.warmup, args.step_ms)
  images = 2 * args.batch
  return args.steps * images / seconds, sum(t.numel() * t.element_size() for pair in batch for t in pair) / images


def _worker_counts(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    part = part.strip()
    out.append(len(os.sched_getaffinity(0)) if part == "all" else int(part))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="benchmark.py input", description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--crop", type=int, default=513)
  parser.add_argument("--batch", type=int, default=8, help="labeled (and as many unlabeled) images per step")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--workers", default="0,1,2,all", help="comma-separated worker counts; 'all' = the cores")
  parser.add_argument("--cores", type=int, default=0, help="pin the run to this many cores (0: all)")
  parser.add_argument("--reference_dir", default="", help="a checkout of the original project: time its loaders too")
  parser.add_argument("--step_ms", type=float, default=0.0, help="simulated device step after each batch")
  args = parser.parse_args(argv)
  if args.cores:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
  counts = _worker_counts(args.workers)
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "VOC")
    ids = _write_dataset(root, args.images)
    half = len(ids) // 4
    lists = {}
    for name, items in (("labeled", ids[:half]), ("unlabeled", ids[half:]), ("val", ids[:half])):
      lists[name] = os.path.join(root, f"{name}.txt")
      with open(lists[name], "w") as f:
        f.write("\n".join(items) + "\n")
    print(f"{len(ids)} VOC-size JPEG + PNG pairs, crop {args.crop}, batch {args.batch} + {args.batch}, "
          f"{args.steps} steps after {args.warmup}, cores {len(os.sched_getaffinity(0))}"
          + (f", simulated step {args.step_ms:g} ms" if args.step_ms else ""))
    for workers in counts:
      rate, size = ours(root, lists, args, workers)
      line = f"workers {workers}: dgcl-jax {rate:6.1f} images/s, {size / 2**20:.2f} MiB per image"
      if args.reference_dir and workers % 2 == 0:
        ref_rate, ref_size = reference(root, lists, args, workers)
        line += (f" | reference {ref_rate:6.1f} images/s, {ref_size / 2**20:.2f} MiB per image "
                 f"({'in-process' if workers == 0 else f'{workers // 2} worker(s) per loader'}) | "
                 f"ratio {rate / ref_rate:.2f}x")
      print(line, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
