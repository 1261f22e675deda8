"""Times one jit-compiled memory-bank update + value_and_grad of the DGCL loss on one slice.

Defaults are Pascal's shapes: bank 21 x 10000 x 256 (fts and rep) full, one slice of 8 images of
129 x 129 pixels with 256-dim fts and rep. Smaller shapes via flags, e.g. on CPU:

  python scripts/benchmark_dgcl.py --size 33 --capacity 2000 --max-pixels 2000
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
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--capacity", type=int, default=10000, help="bank entries per class")
  p.add_argument("--fts-dim", type=int, default=256)
  p.add_argument("--rep-dim", type=int, default=256)
  p.add_argument("--batch", type=int, default=8, help="images in the slice")
  p.add_argument("--size", type=int, default=129, help="feature map height = width")
  p.add_argument("--present", type=int, default=0,
                 help="classes present in the labels (0: all); the rest are absent")
  p.add_argument("--ignore-frac", type=float, default=0.1, help="share of pixels labeled 255")
  p.add_argument("--max-pixels", type=int, default=10000)
  p.add_argument("--max-new", type=int, default=1000)
  p.add_argument("--topk-chunk", type=int, default=0, help="multi-pass top-k chunk (0: one lax.top_k)")
  p.add_argument("--bf16-rep", action="store_true", help="rep in bfloat16, as the student's")
  p.add_argument("--slices", type=int, default=1,
                 help="slices of --batch images each, as the trainer (dgcl_loss_slices + one bank update)")
  p.add_argument("--compile-only", action="store_true", help="report compiled memory, do not run")
  p.add_argument("--runs", type=int, default=5)
  return p.parse_args(argv)


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
  labels = rng.choice(present, size=(b, s, s)).astype(np.int32)
  labels[rng.uniform(size=labels.shape) < args.ignore_frac] = 255
  rep_dtype = jnp.bfloat16 if args.bf16_rep else jnp.float32
  rep = jnp.asarray(rng.normal(size=(b, s, s, cr)), rep_dtype)
  fts = jnp.asarray(rng.normal(size=(b, s, s, cf)), jnp.float32)
  labels = jnp.asarray(labels)
  chunk = args.topk_chunk or None

  if args.slices > 1:
    tile = lambda x: jnp.stack([x] * args.slices)  # pylint: disable=unnecessary-lambda-assignment
    rep, fts, labels = tile(rep), tile(fts), tile(labels)

  def step(bank, rep, fts, labels, key):
    k_loss, k_bank = jax.random.split(key)
    if args.slices > 1:
      keys = jax.random.split(k_loss, args.slices)
      loss_fn = lambda r: jnp.mean(dgcl.dgcl_loss_slices(  # pylint: disable=unnecessary-lambda-assignment
          r, fts, labels, bank, keys, max_pixels=args.max_pixels, topk_chunk=chunk))
      flat = lambda x: x.reshape((-1,) + x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
    else:
      loss_fn = lambda r: dgcl.dgcl_loss(  # pylint: disable=unnecessary-lambda-assignment
          r, fts, labels, bank, k_loss, max_pixels=args.max_pixels, topk_chunk=chunk)
      flat = lambda x: x  # pylint: disable=unnecessary-lambda-assignment
    loss, grad = jax.value_and_grad(loss_fn)(rep)
    bank = bank.update(flat(fts), flat(rep), flat(labels), k_bank, max_new_per_class=args.max_new, topk_chunk=chunk)
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
        f"max_pixels {args.max_pixels}, topk_chunk {chunk}, rep {jnp.dtype(rep_dtype).name}")
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
