"""Times one jit-compiled memory-bank update + value_and_grad of the DGCL loss on one slice.

Defaults are Pascal's shapes: bank 21 x 10000 x 256 (fts and rep) full, one slice of 8 images of
129 x 129 pixels with 256-dim fts and rep. Smaller shapes via flags, e.g. on CPU:

  python scripts/benchmark_dgcl.py --size 33 --capacity 2000 --max-pixels 2000

`--case issue13` is the CPU comparison with the reference's PyTorch code of issue 13: bank
21 x 4000 x 256 full, 8 images of 65 x 65 features, each with 3 object classes (ellipses) over
background and its last 2 rows labeled 255.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _parse(argv):
  p = argparse.ArgumentParser(prog="benchmark.py dgcl", description=__doc__.splitlines()[0])
  p.add_argument("--case", choices=("issue13",), default=None,
                 help="preset: issue13 = --capacity 4000 --size 65 --objects-per-image 3 --border-rows 2")
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--capacity", type=int, default=10000, help="bank entries per class")
  p.add_argument("--fts-dim", type=int, default=256)
  p.add_argument("--rep-dim", type=int, default=256)
  p.add_argument("--batch", type=int, default=8, help="images in the slice")
  p.add_argument("--size", type=int, default=129, help="feature map height = width")
  p.add_argument("--present", type=int, default=0,
                 help="classes present in the labels (0: all); the rest are absent")
  p.add_argument("--ignore-frac", type=float, default=0.1,
                 help="share of pixels labeled 255 (random labels only)")
  p.add_argument("--objects-per-image", type=int, default=0,
                 help="instead of random labels per pixel: background 0 and this many distinct object "
                      "classes per image, each an ellipse of radii 5..14 pixels")
  p.add_argument("--border-rows", type=int, default=0, help="last rows of each image labeled 255")
  p.add_argument("--max-pixels", type=int, default=10000)
  p.add_argument("--max-new", type=int, default=1000)
  p.add_argument("--topk-chunk", type=int, default=0, help="multi-pass top-k chunk (0: one lax.top_k)")
  p.add_argument("--bf16-rep", action="store_true", help="rep in bfloat16, as the student's")
  p.add_argument("--slices", type=int, default=1,
                 help="slices of --batch images each, as the trainer (dgcl_loss_slices + one bank update)")
  p.add_argument("--share-density", action="store_true",
                 help="the update reuses the densities the loss computed (dgcl_loss(return_density=True) "
                      "-> bank.update(density=...))")
  p.add_argument("--compile-only", action="store_true", help="report compiled memory, do not run")
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args(argv)
  if args.case == "issue13":
    given = set(a.split("=")[0] for a in argv if a.startswith("--"))
    for name, value in (("capacity", 4000), ("size", 65), ("objects_per_image", 3), ("border_rows", 2)):
      if "--" + name.replace("_", "-") not in given:
        setattr(args, name, value)
  return args


def _object_labels(rng, batch, size, num_classes, objects):
  """[batch, size, size] int32: background 0 and `objects` distinct classes > 0 per image, as ellipses."""
  labels = np.zeros((batch, size, size), np.int32)
  yy, xx = np.mgrid[:size, :size]
  for i in range(batch):
    for c in rng.choice(np.arange(1, num_classes), size=objects, replace=False):
      cy, cx = rng.uniform(0, size, size=2)
      ry, rx = rng.uniform(5, 14, size=2)
      labels[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
  return labels


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  import jax
  import jax.numpy as jnp
  from dgcl_jax import dgcl

  k, cap, cf, cr = args.classes, args.capacity, args.fts_dim, args.rep_dim
  b, s = args.batch, args.size
  rng = np.random.default_rng(0)
  bank = dgcl.MemoryBank(
      fts=jnp.asarray(rng.normal(size=(k, cap, cf)), jnp.float32),
      rep=jnp.asarray(rng.normal(size=(k, cap, cr)), jnp.float32),
      density=jnp.asarray(rng.uniform(size=(k, cap)), jnp.float32),
      count=jnp.full((k,), cap, jnp.int32))
  present = np.arange(k) if args.present <= 0 else rng.choice(k, size=min(args.present, k), replace=False)
  if args.objects_per_image > 0:
    labels = _object_labels(rng, b, s, k, args.objects_per_image)
    present = np.setdiff1d(np.unique(labels), [255])
  else:
    labels = rng.choice(present, size=(b, s, s)).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < args.ignore_frac] = 255
  if args.border_rows > 0:
    labels[:, s - args.border_rows:] = 255
  if args.objects_per_image > 0:
    cls, cnt = np.unique(labels, return_counts=True)
    print("pixels per class: " + ", ".join(f"{c}: {n}" for c, n in zip(cls, cnt)))
  rep_dtype = jnp.bfloat16 if args.bf16_rep else jnp.float32
  rep = jnp.asarray(rng.normal(size=(b, s, s, cr)), rep_dtype)
  fts = jnp.asarray(rng.normal(size=(b, s, s, cf)), jnp.float32)
  labels = jnp.asarray(labels)
  chunk = args.topk_chunk or None

  if args.slices > 1:
    tile = lambda x: jnp.stack([x] * args.slices)  # pylint: disable=unnecessary-lambda-assignment
    rep, fts, labels = tile(rep), tile(fts), tile(labels)

  share = args.share_density
  loss_kw = dict(max_pixels=args.max_pixels, topk_chunk=chunk)
  if share:
    loss_kw["return_density"] = True

  def step(bank, rep, fts, labels, key):
    k_loss, k_bank = jax.random.split(key)
    if args.slices > 1:
      keys = jax.random.split(k_loss, args.slices)
      def loss_fn(r):
        out = dgcl.dgcl_loss_slices(r, fts, labels, bank, keys, **loss_kw)
        return (jnp.mean(out[0]), out[1]) if share else jnp.mean(out)
      flat = lambda x: x.reshape((-1,) + x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
    else:
      loss_fn = lambda r: dgcl.dgcl_loss(r, fts, labels, bank, k_loss, **loss_kw)  # pylint: disable=unnecessary-lambda-assignment
      flat = lambda x: x  # pylint: disable=unnecessary-lambda-assignment
    if share:
      (loss, density), grad = jax.value_and_grad(loss_fn, has_aux=True)(rep)
      extra = {"density": flat(density)}
    else:
      loss, grad = jax.value_and_grad(loss_fn)(rep)
      extra = {}
    bank = bank.update(flat(fts), flat(rep), flat(labels), k_bank, max_new_per_class=args.max_new,
                       topk_chunk=chunk, **extra)
    return bank, loss, grad

  fn = jax.jit(step, donate_argnums=0)
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = fn.lower(bank, rep, fts, labels, key).compile()
  compile_s = time.perf_counter() - t0
  if args.compile_only:
    ma = compiled.memory_analysis()
    print(f"slices {args.slices} x {b}x{s}x{s}, bank {k}x{cap}: compile {compile_s:.1f} s, temp "
          f"{ma.temp_size_in_bytes / 2**20:.1f} MiB, arguments {ma.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"outputs {ma.output_size_in_bytes / 2**20:.1f} MiB, aliased {ma.alias_size_in_bytes / 2**20:.1f} MiB")
    return 0
  times = []
  loss = None
  for i in range(args.runs + 1):
    t0 = time.perf_counter()
    bank, loss, grad = compiled(bank, rep, fts, labels, jax.random.fold_in(key, i))
    jax.block_until_ready((bank, loss, grad))
    if i:   # the first run warms up
      times.append(time.perf_counter() - t0)

  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind}")
  print(f"shapes: bank {k}x{cap}x{cf}/{cr}, slice {b}x{s}x{s}, classes present {len(present)}, "
        f"max_pixels {args.max_pixels}, topk_chunk {chunk}, rep {jnp.dtype(rep_dtype).name}, "
        f"shared density {share}")
  print(f"compile: {compile_s:.1f} s")
  print(f"bank.update + value_and_grad(dgcl_loss): median {1e3 * np.median(times):.1f} ms "
        f"over {len(times)} runs (min {1e3 * min(times):.1f}), loss {float(loss):.4f}")
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
  ma = compiled.memory_analysis()
  if ma is not None:
    print(f"compiled memory: temp {ma.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
          f"{ma.argument_size_in_bytes / 2**20:.1f} MiB, outputs {ma.output_size_in_bytes / 2**20:.1f} MiB, "
          f"aliased {ma.alias_size_in_bytes / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
