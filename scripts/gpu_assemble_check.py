"""Checks on the default JAX device that the device half of the training transform (data/assemble.py)
gives the numpy transform's float32 crops bit for bit at Pascal's shapes, and times it.

  python scripts/gpu_assemble_check.py [--crops 16] [--crop 513]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--crops", type=int, default=16)
  parser.add_argument("--crop", type=int, default=513)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import assemble, transforms  # pylint: disable=g-import-not-at-top

  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  p = transforms.TransformParams(crop_size=args.crop, mean=mean, std=std)
  window_hw = transforms.window_size(p, (500, 500))
  rng = np.random.default_rng(0)
  dense, compact = [], []
  for i in range(args.crops):
    h, w = (375, 500) if i % 3 else (500, 375)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    dense.append(transforms.train_transform(image, None, np.random.default_rng(i), p)[0])
    compact.append(transforms.train_window(image, None, np.random.default_rng(i), p, window_hw))
  batch = [np.stack([c[k] for c in compact]) for k in ("window", "index", "frac")]
  fn = jax.jit(assemble.crop_images)
  norm = assemble.normalization(mean, std)
  out = np.asarray(fn(*batch, *norm))
  expected = np.stack(dense)
  diff = np.abs(out - expected)
  print(f"assemble on {jax.devices()[0].device_kind}: exact {np.array_equal(out, expected)} over {args.crops} "
        f"crops of {args.crop} (max abs diff {diff.max():.3g}, {np.count_nonzero(diff)} values differ)")
  device_batch = jax.device_put(batch)
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*device_batch, *norm))
    times.append(time.perf_counter() - t0)
  print(f"assemble time: median {1000 * float(np.median(times)):.2f} ms for {args.crops} crops")
  return 0


if __name__ == "__main__":
  sys.exit(main())
