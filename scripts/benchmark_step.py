"""Time one full jit-compiled train_step on random data (called as `benchmark.py step`).

  python scripts/benchmark.py step --config=configs/pascal.py:732 [--semi] [--full_bank] [--steps=10]
      [--set=model.dtype=bfloat16 --set=batch_size=8 ...]

Prints compile time, median step time, images/s (labeled + unlabeled) and, on GPU, peak memory.
"""

from __future__ import annotations

import argparse
import ast
import time


def _set(config, assignment: str):
  key, _, value = assignment.partition("=")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  node = config
  *parents, leaf = key.split(".")
  for name in parents:
    node = node[name]
  node[leaf] = value


def main(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py step", description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/pascal.py:732")
  parser.add_argument("--set", action="append", default=[], help="field=value overrides")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--semi", action="store_true", help="time the semi-supervised step (default: supervised)")
  parser.add_argument("--full_bank", action="store_true", help="start with a full memory bank (contrastive on)")
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dgcl_jax import config_base, train  # pylint: disable=g-import-not-at-top

  config = config_base.load_config_file(args.config)
  for assignment in args.set:
    _set(config, assignment)
  config.steps_per_epoch = 1000
  mesh = train.make_mesh()
  fns = train.StepFunctions(config, mesh, steps_per_epoch=1000)
  state = train.create_train_state(config, jax.random.PRNGKey(0), load_pretrained=False)
  if args.full_bank and config.method == "dgcl":
    bank = state.memory_bank
    rng = np.random.default_rng(0)
    state = state.replace(memory_bank=bank.replace(
        fts=jnp.asarray(rng.normal(size=bank.fts.shape), jnp.float32),
        rep=jnp.asarray(rng.normal(size=bank.rep.shape), jnp.float32),
        density=jnp.asarray(rng.uniform(size=bank.density.shape), jnp.float32),
        count=jnp.full(bank.count.shape, bank.fts.shape[1], bank.count.dtype)))
  if args.semi:
    state = state.replace(step=jnp.asarray(1000 * config.sup_only_epochs + 1000, jnp.int32))
  state = jax.device_put(state, fns.replicated)
  b, crop, k = config.batch_size, config.data.crop_size, config.model.num_classes
  rng = np.random.default_rng(0)
  labels = np.repeat(np.repeat(rng.integers(0, k, (b, crop // 16 + 1, crop // 16 + 1)), 16, 1), 16, 2)
  batch = {
      "labeled_image": rng.normal(size=(b, crop, crop, 3)).astype(np.float32),
      "labeled_label": labels[:, :crop, :crop].astype(np.int32),
      "unlabeled_image": rng.normal(size=(b, crop, crop, 3)).astype(np.float32),
      "unlabeled_ignore": np.zeros((b, crop, crop), np.int32),
  }
  batch = jax.device_put(batch, fns.batch_sharding)
  t0 = time.perf_counter()
  state, metrics, _ = fns.train_step(state, batch, semi=args.semi)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"config: {args.config} method={config.method} batch={b}+{b} crop={crop} dtype={config.model.dtype} "
        f"semi={args.semi} full_bank={args.full_bank}")
  print(f"first step (compile + run): {compile_s:.1f} s", flush=True)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics, _ = fns.train_step(state, batch, semi=args.semi)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    print(f"  step {i + 1}: {1000 * times[-1]:.1f} ms", flush=True)
  median = float(np.median(times))
  print(f"step: median {1000 * median:.1f} ms over {args.steps} | {2 * b / median:.1f} images/s")
  print("losses: " + ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main(sys.argv[1:]))
