"""Input pipeline throughput on generated Pascal-layout data.

Use: python scripts/benchmark_input.py [--images 64] [--crop 513] [--batch 16] [--steps 20] [--workers -1]
(or scripts/benchmark.py input ...). Prints training images/s (labeled + unlabeled images).
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


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--crop", type=int, default=513)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--workers", type=int, default=-1, help="-1: sized to the machine; 0: in-process")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "VOC")
    t0 = time.perf_counter()
    ids = _write_dataset(root, args.images)
    print(f"wrote {len(ids)} JPEG + PNG pairs in {time.perf_counter() - t0:.1f}s")
    half = len(ids) // 4
    for name, items in (("labeled", ids[:half]), ("unlabeled", ids[half:]), ("val", ids[:half])):
      with open(os.path.join(tmp, f"{name}.txt"), "w") as f:
        f.write("\n".join(items))
    c = pascal_config.get_config("732")
    c.data.root = root
    c.data.labeled_list = os.path.join(tmp, "labeled.txt")
    c.data.unlabeled_list = os.path.join(tmp, "unlabeled.txt")
    c.data.val_list = os.path.join(tmp, "val.txt")
    c.data.crop_size = args.crop
    c.data.num_workers = args.workers
    c.batch_size = args.batch
    c.steps_per_epoch = 1000
    workers = pipeline._num_workers(c)  # pylint: disable=protected-access
    pipeline.check_inputs(c)
    it = pipeline.create_train_iterator(c, 0, 1)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      next(it)
    t1 = time.perf_counter()
    for _ in range(args.steps):
      batch = next(it)
    t2 = time.perf_counter()
    it.close()
  images = args.steps * args.batch * 2
  rate = images / (t2 - t1)
  print(f"crop {args.crop}, batch {args.batch} labeled + {args.batch} unlabeled, workers {workers} "
        f"(cpus {os.cpu_count()}): first {args.warmup} steps {t1 - t0:.1f}s; "
        f"{args.steps} steps {t2 - t1:.2f}s = {args.steps / (t2 - t1):.2f} steps/s, {rate:.1f} images/s "
        f"(shape {batch['labeled_image'].shape})")
  return rate


if __name__ == "__main__":
  main(sys.argv[1:])
