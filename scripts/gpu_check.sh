#!/bin/bash
# The GPU measurements of the README's benchmark table, prepared for a short lease of one GPU.
#
#   bash scripts/gpu_check.sh a   # 4+4 step (compiled, then again from the compilation cache),
#                                 # its contrastive part alone; about 5-7 minutes on an H100
#   bash scripts/gpu_check.sh b   # 16+16 step, its contrastive part, compiled memory; about 5-7 minutes
#
# Each part fits one 10-minute command. Every benchmark's whole output goes to $OUT/<name>.log
# (default /tmp/gpu_check) as it is printed, so a run killed at its limit still reports; the
# console gets the lines that matter. Needs jax with a GPU backend, flax, optax, orbax, grain and
# ml-collections importable, and the project on PYTHONPATH.
set -u
part=${1:?usage: gpu_check.sh a|b}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dgcl_gpu_check_cache}
cd "$(dirname "$0")/.."
step="python scripts/benchmark.py step --config=configs/pascal.py:732 --semi --full_bank"
keep='^(devices|config|compilation cache|first step|step: median|peak|losses|lower|memory analysis|  temp|live at|shapes|bank.update|compile|compiled memory)'

bench() {   # name seconds command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E --line-buffered "$keep"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case "$part" in
  a)
    bench step_4+4 280 $step --set=batch_size=4 --set=num_slices=1 --steps=10
    bench step_4+4_cached 100 $step --set=batch_size=4 --set=num_slices=1 --steps=3
    bench dgcl_4+4 90 python scripts/benchmark.py dgcl --slices 1 --batch 8 --present 0 --share-density
    ;;
  b)
    bench step_16+16 330 $step --steps=5
    bench dgcl_16+16 90 python scripts/benchmark.py dgcl --slices 4 --batch 8 --present 0 --share-density
    bench compile_only_4+4 150 $step --set=batch_size=4 --set=num_slices=1 --compile-only --top=10
    ;;
  *)
    echo "unknown part $part: a or b" >&2
    exit 2
    ;;
esac
