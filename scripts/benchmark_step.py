"""Time one full jit-compiled train_step on random data (called as `benchmark.py step`).

  python scripts/benchmark.py step --config=configs/pascal.py:732 [--semi] [--full_bank] [--steps=10]
      [--set=model.dtype=bfloat16 --set=batch_size=8 ...] [--compile-only [--top=10] [--dump_dir=DIR]]

Prints compile time, median step time, images/s (labeled + unlabeled) and, on GPU, peak memory.
--compile-only lowers and compiles the step without running it (no state is allocated) and prints
XLA's memory analysis (temp, argument, output, alias bytes) and the largest buffers live at the
program's peak with the HLO instruction, shape and JAX op that produce them (from XLA's dump).
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import re
import shutil
import tempfile
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


# ----------------------------------------------------------------------------- XLA dump parsing

_PEAK_HEADER = re.compile(r"^\s*Live ranges at (\d+) \(peak\):")
_PEAK_LINE = re.compile(r"^\s+(\S+?)(\{[^}]*\})?: (\d+) bytes")
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def peak_live_values(live_range_text: str) -> list[tuple[str, int]]:
  """[(hlo value name, bytes)] live at the peak, from XLA's *-live-range.txt (largest first)."""
  values, inside = [], False
  for line in live_range_text.splitlines():
    if _PEAK_HEADER.match(line):
      inside = True
      continue
    if inside:
      m = _PEAK_LINE.match(line)
      if not m:
        break
      values.append((m.group(1), int(m.group(3))))
  return sorted(values, key=lambda v: -v[1])


_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERANDS = re.compile(r"([^)]*)\)")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (shape, JAX op_name metadata or '<opcode>') from optimized HLO text.

  A fusion without metadata of its own takes the first op_name inside its fused computation.
  """
  out, calls, operand, computation_op, current = {}, {}, {}, {}, None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      current = c.group(1)
      continue
    m = _HLO_LINE.match(line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    if op and current is not None:
      computation_op.setdefault(current, op.group(1))
    call = _CALLS.search(line)
    if call and not op:
      calls[m.group(1)] = call.group(1)
    if not op:
      args = _OPERANDS.match(line[m.end():])
      first = args.group(1).split(",")[0].strip().lstrip("%") if args else ""
      if first:
        operand[m.group(1)] = first
    out[m.group(1)] = (m.group(2), op.group(1) if op else f"<{m.group(3)}>")
  for name, computation in calls.items():
    if computation in computation_op:
      out[name] = (out[name][0], computation_op[computation])
  # A layout copy or convert without metadata: name it after what it copies (first operand).
  for name, (shape, op) in list(out.items()):
    source, hops = name, 0
    while out.get(source, ("", ""))[1].startswith("<") and source in operand and hops < 8:
      source, hops = operand[source], hops + 1
    if hops and not out.get(source, ("", "<"))[1].startswith("<"):
      out[name] = (shape, f"{op} of {out[source][1]}")
  return out


def _short_op(op_name: str) -> str:
  # 'jit(_train_step)/jvp(DeepLabV3Plus)/backbone/layer3_5/conv2/conv_general_dilated' -> drop the jit prefix.
  return re.sub(r"^jit\([^)]*\)/", "", op_name)


def _scope(op_name: str) -> str:
  """Coarse producer of a buffer: student/teacher model part (forward or backward), state, or JAX op path."""
  op = _short_op(op_name)
  if op.startswith("<") and " of " not in op:
    return "state and inputs" if op == "<parameter>" else f"{op} (no metadata)"
  if op.startswith("<copy> of state"):
    return "copies of the state"
  op = _short_op(op.split(" of ", 1)[-1])
  if re.match(r"(state|batch)\b", op):
    return "state and inputs"
  if "DeepLabV3Plus" in op:
    m = re.search(r"/(backbone/(?:stem\d|layer\d)|decoder|aux)", op)
    differentiated = "jvp(" in op or "transpose(" in op
    who = "student" if differentiated else "teacher"
    kind = "backward" if "transpose(" in op else "forward"
    return f"{who} {m.group(1) if m else 'model'} ({kind})"
  return "/".join(re.sub(r"\(.*?\)", "", part) for part in op.split("/")[:2]) or "(unnamed)"


def find_dump_files(dump_dir: str, module_substring: str = "train_step") -> dict[str, str]:
  """Paths of the optimized HLO text and live-range file of the newest matching module in dump_dir."""
  names = sorted(n for n in os.listdir(dump_dir) if module_substring in n)
  found = {}
  for n in names:
    if n.endswith("_after_optimizations-live-range.txt"):
      found["live_range"] = os.path.join(dump_dir, n)
    elif n.endswith("_after_optimizations.txt"):
      found["hlo"] = os.path.join(dump_dir, n)
  return found


def report_peak_buffers(dump_dir: str, top: int = 10) -> list[str]:
  """Lines describing the `top` largest buffers live at the peak, and the peak by producer."""
  files = find_dump_files(dump_dir)
  if "live_range" not in files or "hlo" not in files:
    return [f"(no XLA live-range dump in {dump_dir}: buffer breakdown unavailable)"]
  with open(files["live_range"]) as f:
    values = peak_live_values(f.read())
  with open(files["hlo"]) as f:
    instructions = hlo_instructions(f.read())
  total = sum(b for _, b in values)
  lines = [f"live at the peak: {total / 2**30:.2f} GiB in {len(values)} buffers (parameters included); "
           f"the {min(top, len(values))} largest:"]
  for name, size in values[:top]:
    shape, op = instructions.get(name, ("?", ""))
    lines.append(f"  {size / 2**20:9.1f} MiB  {name:<34s} {shape:<28s} {_short_op(op)}")
  groups = collections.Counter()
  for name, size in values:
    groups[_scope(instructions.get(name, ("", ""))[1])] += size
  lines.append("live at the peak by producer:")
  for scope, size in groups.most_common(top):
    lines.append(f"  {size / 2**30:7.2f} GiB  {scope}")
  return lines


# ----------------------------------------------------------------------------- main


def example_batch(config, rng):
  """A batch as the pipeline ships it (uint8 source windows, bilinear tables, uint8 labels; the
  step finishes the crops on the device), made from random images of the dataset's largest size
  (config.data.max_image_size, else 3/4 of the crop) with labels in 16-pixel blocks."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import transforms  # pylint: disable=g-import-not-at-top
  p = transforms.TransformParams.from_config(config)
  k, b = int(config.model.num_classes), int(config.batch_size)
  h, w = tuple(config.data.max_image_size) or (3 * p.crop_size // 4,) * 2
  window_hw = transforms.window_size(p, (h, w))
  label_type = transforms.label_dtype(k, p.ignore_label)
  rows = {"labeled": [], "unlabeled": []}
  for i in range(2 * b):
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    label = np.kron(rng.integers(0, k, (h // 16 + 1, w // 16 + 1)), np.ones((16, 16), np.int64))[:h, :w]
    stream = "labeled" if i < b else "unlabeled"
    rows[stream].append(transforms.train_window(image, label if stream == "labeled" else None, rng, p, window_hw,
                                                label_type))
  batch = {}
  for stream, label_key in (("labeled", "labeled_label"), ("unlabeled", "unlabeled_ignore")):
    for key in ("window", "index", "frac"):
      batch[f"{stream}_{key}"] = np.stack([r[key] for r in rows[stream]])
    batch[label_key] = np.stack([r["label"] for r in rows[stream]])
  return batch


def main(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py step", description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/pascal.py:732")
  parser.add_argument("--set", action="append", default=[], help="field=value overrides")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--semi", action="store_true", help="time the semi-supervised step (default: supervised)")
  parser.add_argument("--full_bank", action="store_true", help="start with a full memory bank (contrastive on)")
  parser.add_argument("--compile-only", "--compile_only", dest="compile_only", action="store_true",
                      help="compile without running; print XLA's memory analysis and the largest buffers")
  parser.add_argument("--top", type=int, default=10, help="--compile-only: how many buffers to list")
  parser.add_argument("--dump_dir", "--dump-dir", default="",
                      help="--compile-only: keep XLA's dump here (default: a temporary directory, removed)")
  args = parser.parse_args(argv)

  dump_dir = None
  if args.compile_only:
    # XLA reads its flags once, when the backend starts: set them before jax is imported.
    dump_dir = args.dump_dir or tempfile.mkdtemp(prefix="dgcl_xla_dump_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*_train_step.*").strip()
  try:
    return _run(args, dump_dir)
  finally:
    if dump_dir and not args.dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)


def _run(args, dump_dir):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dgcl_jax import config_base, runtime  # pylint: disable=g-import-not-at-top
  from dgcl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from dgcl_jax.step import StepFunctions  # pylint: disable=g-import-not-at-top

  config = config_base.load_config_file(args.config)
  for assignment in args.set:
    _set(config, assignment)
  config.steps_per_epoch = 1000
  parts = state_lib.Parts.create(config, steps_per_epoch=1000)
  fns = StepFunctions(parts, runtime.make_mesh())
  b, crop = config.batch_size, config.data.crop_size
  header = (f"config: {args.config} method={config.method} batch={b}+{b} crop={crop} dtype={config.model.dtype} "
            f"remat={config.model.get('remat', False)} semi={args.semi} full_bank={args.full_bank}")

  if args.compile_only:
    # A cached executable would skip the compile and so the dump.
    jax.config.update("jax_enable_compilation_cache", False)
    state = state_lib.abstract_train_state(config, parts, fns.replicated)
    batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.batch_sharding),
                                   example_batch(config, np.random.default_rng(0)))
    t0 = time.perf_counter()
    lowered = fns.train_step.lower(state, batch, semi=args.semi)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(header)
    print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    mem = compiled.memory_analysis()
    if mem is None:
      print("memory analysis: not available on this backend")
    else:
      gib = lambda n: f"{n / 2**30:.3f} GiB"
      print(f"memory analysis: temp {gib(mem.temp_size_in_bytes)} | argument {gib(mem.argument_size_in_bytes)} | "
            f"output {gib(mem.output_size_in_bytes)} | alias {gib(mem.alias_size_in_bytes)} | "
            f"generated code {gib(mem.generated_code_size_in_bytes)}")
      peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes)
      print(f"  temp + argument + output - alias = {gib(peak)} (upper bound of the step's device memory)")
    for line in report_peak_buffers(dump_dir, args.top):
      print(line)
    return 0

  # As the trainer: a repeated benchmark loads its compiled step from the persistent cache.
  cache = runtime.setup_compilation_cache(config)
  state = state_lib.create_train_state(config, jax.random.PRNGKey(0), parts=parts, load_pretrained=False)
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
  batch = example_batch(config, np.random.default_rng(0))
  batch = jax.device_put(batch, fns.batch_sharding)
  hits = runtime.compilation_cache_hits()
  t0 = time.perf_counter()
  step = fns.train_step.lower(state, batch, semi=args.semi).compile()
  state, metrics, _ = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  source = "loaded from the compilation cache" if runtime.compilation_cache_hits() > hits else "compiled"
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(header)
  print(f"compilation cache: {cache or 'off'}")
  print(f"first step ({source} + run): {compile_s:.1f} s", flush=True)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics, _ = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    print(f"  step {i + 1}: {1000 * times[-1]:.1f} ms", flush=True)
  median = float(np.median(times))
  print(f"step: median {1000 * median:.1f} ms over {args.steps} | {2 * b / median:.1f} images/s")
  print("losses: " + ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()))
  mem = step.memory_analysis()
  if mem is not None:   # the step's own need, apart from what compiling took
    need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    print(f"compiled memory: temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, step total (temp + arguments + "
          f"outputs - aliased) {need / 2**30:.2f} GiB")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    # A process that compiled the step also counts XLA's autotuning scratch here.
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB ({source} in this process)")
  else:   # CPU: the device memory is the process's
    import resource  # pylint: disable=g-import-not-at-top
    print(f"peak process memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main(sys.argv[1:]))
