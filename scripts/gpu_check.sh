#!/bin/bash
# The GPU measurements of the README's benchmark table, prepared for one short lease of one GPU.
#
#   bash scripts/gpu_check.sh [deadline_seconds] [all|resnet|dpt]     # default 540 all
#
# In order of importance, each skipped when the deadline leaves too little time for it:
#   assemble   the device half of the input transform equals the numpy transform bit for bit on this GPU
#   4+4        Pascal dgcl step (semi-supervised, full bank): compile, step time, images/s, peak memory
#   4+4 cached the same from the persistent compilation cache: the whole process's start to its first step,
#              and the step's own peak memory (a compiling process's peak includes XLA's autotuning)
#   dgcl 4+4   the contrastive part alone (loss + gradient + bank update) at the 4+4 step's shapes
#   16+16      the published global batch (4 slices), compiled then cached, and its contrastive part
#   dpt        the DINOv2 ViT-S / ViT-B + DPT step at crop 518, 4+4 (when the config has model.arch)
# Every benchmark's whole output goes to $OUT/<name>.log (default /tmp/gpu_check) as it is printed,
# so a run killed at its limit still reports; the console gets the lines that matter. Needs jax with
# a GPU backend, flax, optax, orbax, grain and ml-collections importable, the project on PYTHONPATH.
set -u
deadline=${1:-540}
parts=${2:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dgcl_gpu_check_cache}
cd "$(dirname "$0")/.."
step="python scripts/benchmark.py step --config=configs/pascal.py:732 --semi --full_bank"
keep='^(devices|config|compilation cache|first step|step: median|peak|losses|memory analysis|compile|compiled memory|assemble|bank.update|shapes|  temp)'
start=$SECONDS

bench() {   # name needed_seconds limit_seconds command...
  local name=$1 needed=$2 limit=$3
  shift 3
  local left=$((deadline - (SECONDS - start)))
  if [ "$left" -lt "$needed" ]; then
    echo "== $name: skipped ($left s left, needs $needed)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E --line-buffered "$keep"
  echo "== $name: exit ${PIPESTATUS[0]}, wall $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import jax, flax, optax, grain; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1

if [ "$parts" != dpt ]; then
  bench assemble 30 60 python scripts/gpu_assemble_check.py
  bench step_4x4 150 240 $step --set=batch_size=4 --set=num_slices=1 --steps=10
  bench step_4x4_cached 40 90 $step --set=batch_size=4 --set=num_slices=1 --steps=3
  bench dgcl_4x4 40 80 python scripts/benchmark.py dgcl --slices 1 --batch 8 --present 0 --share-density --runs 5
  bench step_16x16 150 240 $step --steps=5
  bench step_16x16_cached 40 90 $step --steps=3
  bench dgcl_16x16 40 80 python scripts/benchmark.py dgcl --slices 4 --batch 8 --present 0 --share-density --runs 3
fi
if [ "$parts" != resnet ]; then
  dpt="--semi --full_bank --set=batch_size=4 --set=num_slices=1 --steps=5"
  bench dpt_small_4x4 90 150 python scripts/benchmark.py step --config=configs/pascal.py:732,dinov2_small $dpt
  bench dpt_base_4x4 90 150 python scripts/benchmark.py step --config=configs/pascal.py:732,dinov2_base $dpt
fi
echo "== total wall $((SECONDS - start)) s"
