"""Benchmarks: `python scripts/benchmark.py dgcl [flags]` or `python scripts/benchmark.py input [flags]`.

  dgcl   one jit-compiled memory-bank update + contrastive loss with gradient at Pascal shapes
  input  training-pipeline images/s at the Pascal crop size on generated JPEGs
  step   one full train_step (synthetic data, any config) in steps/s and images/s
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  if len(argv) < 2 or argv[1] not in ("dgcl", "input", "step"):
    print(__doc__.strip())
    return 2
  if argv[1] == "dgcl":
    import benchmark_dgcl as bench  # pylint: disable=g-import-not-at-top
  elif argv[1] == "input":
    import benchmark_input as bench  # pylint: disable=g-import-not-at-top
  else:
    import benchmark_step as bench  # pylint: disable=g-import-not-at-top
  result = bench.main(argv[2:])
  return result if isinstance(result, int) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv) or 0)
