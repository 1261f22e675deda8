"""Times one jit-compiled memory-bank update + value_and_grad of the DGCL loss on one slice.

Defaults are Pascal's shapes: bank 21 x 10000 x 256 (fts and rep) full, one slice of 8 images of
129 x 129 pixels with 256-dim fts and rep. Smaller shapes via flags, e.g. on CPU:

  python scripts/benchmark_dgcl.py --size 33 --capacity 2000 --max-pixels 2000

`--case issue13` is the CPU comparison with the reference's PyTorch code of issue 13: bank
21 x 4000 x 256 full, 8 images of 65 x 65 features, each with 3 object classes (ellipses) over
background and its last 2 rows labeled 255.

`--reference_dir PATH` (a checkout of the original PyTorch project, github Gavinwxy/DGCL) also times,
in the same process and on the same bank contents, features and labels, the original's own code for
the same work: `dgcl.dgcl.compute_dgcl_loss` forward + backward to rep, then
`dgcl.dgcl.FeatureMemory.update` (with the density its update computes), called as its
train_semi.py calls them (k_low_thresh=200, k_den_cal=[8, 16, 32]). The two sides run alternately,
`--rounds` rounds of `--runs` timed runs each after one untimed warm-up run per side; every round and
the overall medians and ratio are printed. Torch gets as many threads as the cores this process may
use (XLA's CPU client uses them all), or `--torch_threads`.

  python scripts/benchmark.py dgcl --case issue13 --share-density --reference_dir /path/to/DGCL
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import warnings

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
  p.add_argument("--runs", type=int, default=5, help="timed runs per side and round")
  p.add_argument("--reference_dir", default="",
                 help="a checkout of the original project (Gavinwxy/DGCL): time its loss + bank update too")
  p.add_argument("--rounds", type=int, default=0,
                 help="alternating rounds of --runs runs per side (0: 3 with --reference_dir, else 1)")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads for the reference (0: the cores this process may use)")
  args = p.parse_args(argv)
  if args.rounds <= 0:
    args.rounds = 3 if args.reference_dir else 1
  if args.reference_dir and args.slices > 1:
    p.error("--reference_dir compares one device batch: use --slices 1")
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


def _cores() -> int:
  """The cores this process may run on: what XLA's CPU client sizes its thread pool by."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


class _Reference:
  """The original project's own loss + bank update (dgcl/dgcl.py of a checkout at `ref_dir`).

  Only this adapter is ours; the original's functions are imported from `ref_dir` and called as its
  train_semi.py calls them in a semi-supervised step once the bank is full:

    contra_loss = compute_dgcl_loss(rep=rep, fts=fts.float().detach(), memo=memobank, label=label,
                                    k_low_thresh=200, k_den_cal=[8, 16, 32])
    (loss).backward()
    memobank.update(fts.float().detach(), rep.float().detach(), label)

  Adapter: inputs NHWC numpy -> contiguous NCHW torch tensors (the layout the original's model
  outputs) and int64 labels; rep is a leaf with requires_grad, so backward stops at rep as our
  value_and_grad(rep) does. The bank's lists are set to the same contents as ours
  (FeatureMemory.__init__ makes them empty). Two substitutions for one CPU process, by attribute on
  the imported module / for the duration of the calls, the original's source untouched:
  `gather_together` (dist.barrier + all_gather over the processes; with one process the identity)
  is replaced by the identity, and without CUDA `Tensor.cuda()` (on the bank's initial lists, the
  anchors, a non-full class's zero densities) returns the tensor itself. The original's
  `autocast` (CUDA mixed precision) is CUDA-only, so on CPU the loss runs in float32, as ours with
  the default float32 rep.
  """

  def __init__(self, ref_dir, threads, bank_np, fts_np, rep_np, labels_np):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads)
    ref_dir = os.path.abspath(ref_dir)
    if not os.path.isfile(os.path.join(ref_dir, "dgcl", "dgcl.py")):
      raise SystemExit(f"--reference_dir {ref_dir}: no dgcl/dgcl.py (a checkout of github Gavinwxy/DGCL)")
    sys.path.insert(0, ref_dir)
    # The original's `torch.cuda.amp.autocast` warns of its deprecation at every call.
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
    self.mod = importlib.import_module("dgcl.dgcl")
    self.mod.gather_together = lambda tensor: tensor   # one process: all_gather over 1 rank
    fts_b, rep_b, dens_b = bank_np
    k, cap = dens_b.shape
    with self._cuda_is_identity():
      self.memo = self.mod.FeatureMemory(memory_per_class=cap, n_classes=k, feat_dim=fts_b.shape[-1],
                                         proj_dim=rep_b.shape[-1], k=[8, 16, 32])
    self.memo.fts_memory = [torch.from_numpy(fts_b[c].copy()) for c in range(k)]
    self.memo.proj_memory = [torch.from_numpy(rep_b[c].copy()) for c in range(k)]
    self.memo.feat_density = [torch.from_numpy(dens_b[c].copy()) for c in range(k)]
    if not self.memo.check_if_full():
      raise SystemExit("reference bank not full: its loss would not run")
    def nchw(x):
      return torch.from_numpy(np.ascontiguousarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()
    self.fts = nchw(fts_np)
    self.rep = nchw(rep_np).requires_grad_(True)
    self.labels = torch.from_numpy(np.asarray(labels_np)).long()
    np.random.seed(0)    # the original draws its subsets with np.random

  @contextlib.contextmanager
  def _cuda_is_identity(self):
    torch = self.torch
    if torch.cuda.is_available():
      yield
      return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **kw: self
    try:
      yield
    finally:
      torch.Tensor.cuda = saved

  def step(self) -> float:
    """One loss forward + backward and one bank update; returns the loss."""
    self.rep.grad = None
    with self._cuda_is_identity():
      loss = self.mod.compute_dgcl_loss(rep=self.rep, fts=self.fts.float().detach(), memo=self.memo,
                                        label=self.labels.detach(), k_low_thresh=200, k_den_cal=[8, 16, 32])
      if loss is None:
        loss = 0 * self.rep.sum()
      loss.backward()
      self.memo.update(self.fts.float().detach(), self.rep.float().detach(), self.labels.detach())
    return float(loss.detach())


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  import jax
  import jax.numpy as jnp
  from dgcl_jax import dgcl

  k, cap, cf, cr = args.classes, args.capacity, args.fts_dim, args.rep_dim
  b, s = args.batch, args.size
  rng = np.random.default_rng(0)
  bank_np = (rng.normal(size=(k, cap, cf)).astype(np.float32), rng.normal(size=(k, cap, cr)).astype(np.float32),
             rng.uniform(size=(k, cap)).astype(np.float32))
  bank = dgcl.MemoryBank(fts=jnp.asarray(bank_np[0]), rep=jnp.asarray(bank_np[1]), density=jnp.asarray(bank_np[2]),
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
  rep_np = rng.normal(size=(b, s, s, cr)).astype(np.float32)
  fts_np = rng.normal(size=(b, s, s, cf)).astype(np.float32)
  labels_np = labels
  rep = jnp.asarray(rep_np, rep_dtype)
  fts = jnp.asarray(fts_np)
  labels = jnp.asarray(labels)
  reference = None
  if args.reference_dir and not args.compile_only:
    threads = args.torch_threads or _cores()
    # Same values as ours: the bank's initial contents, fts, rep (as float32 as our rep holds them), labels.
    reference = _Reference(args.reference_dir, threads, bank_np, fts_np,
                           np.asarray(rep.astype(jnp.float32)), labels_np)
    print(f"reference: {os.path.abspath(args.reference_dir)} dgcl/dgcl.py (compute_dgcl_loss + backward, "
          f"FeatureMemory.update), torch {reference.torch.__version__}, torch threads "
          f"{reference.torch.get_num_threads()} (cores this process may use, XLA's CPU threads: {_cores()})")
    fixed = {"max_pixels": 10000, "max_new": 1000}
    off = [f"--{n.replace('_', '-')} {getattr(args, n)} (reference {v})" for n, v in fixed.items()
           if getattr(args, n) != v]
    if args.bf16_rep:
      off.append("--bf16-rep (reference float32)")
    if off:
      print("note: the reference's fixed settings differ: " + ", ".join(off))
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
  def ours(i):
    nonlocal bank
    t0 = time.perf_counter()
    bank, loss, grad = compiled(bank, rep, fts, labels, jax.random.fold_in(key, i))
    jax.block_until_ready((bank, loss, grad))
    return time.perf_counter() - t0, float(loss)

  def theirs():
    t0 = time.perf_counter()
    loss = reference.step()
    return time.perf_counter() - t0, loss

  # One untimed warm-up run per side, then rounds of --runs timed runs per side, the side that goes
  # first alternating. Each side's bank evolves over its runs from the same initial contents, as in
  # training (each run pushes the same fts/rep/labels).
  ours(0)
  if reference is not None:
    theirs()
  times, ref_times, losses, ref_losses, calls = [], [], [], [], 1
  for r in range(args.rounds):
    load = os.getloadavg()
    t_ours, t_ref = [], []
    for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):   # who goes first alternates
      for _ in range(args.runs):
        if side == "ours":
          t, l = ours(calls)
          calls += 1
          t_ours.append(t)
          losses.append(l)
        elif reference is not None:
          t, l = theirs()
          t_ref.append(t)
          ref_losses.append(l)
    times += t_ours
    if reference is None:
      continue
    ref_times += t_ref
    print(f"round {r + 1}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | dgcl-jax median "
          f"{1e3 * np.median(t_ours):.1f} ms (min {1e3 * min(t_ours):.1f}) | reference median "
          f"{1e3 * np.median(t_ref):.1f} ms (min {1e3 * min(t_ref):.1f}) | ratio "
          f"{np.median(t_ref) / np.median(t_ours):.2f}x")
  loss = losses[-1]

  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind}")
  print(f"shapes: bank {k}x{cap}x{cf}/{cr}, slice {b}x{s}x{s}, classes present {len(present)}, "
        f"max_pixels {args.max_pixels}, topk_chunk {chunk}, rep {jnp.dtype(rep_dtype).name}, "
        f"shared density {share}")
  print(f"compile: {compile_s:.1f} s")
  print(f"bank.update + value_and_grad(dgcl_loss): median {1e3 * np.median(times):.1f} ms "
        f"over {len(times)} runs (min {1e3 * min(times):.1f}), loss {float(loss):.4f}")
  if reference is not None:
    print(f"reference compute_dgcl_loss + backward + FeatureMemory.update: median "
          f"{1e3 * np.median(ref_times):.1f} ms over {len(ref_times)} runs (min {1e3 * min(ref_times):.1f}), "
          f"loss mean {np.mean(ref_losses):.4f} (ours {np.mean(losses):.4f}); torch threads "
          f"{reference.torch.get_num_threads()}")
    print(f"ratio reference / dgcl-jax (medians over all rounds): {np.median(ref_times) / np.median(times):.2f}x; "
          f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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
