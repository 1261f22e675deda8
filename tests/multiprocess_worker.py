"""Worker for tests/test_multiprocess.py: a few dgcl train steps, one JSON line of losses on stdout.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT
(NUM_PROCESSES 1 runs without jax.distributed.)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  import jax  # pylint: disable=g-import-not-at-top
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dgcl_jax import runtime, state as state_lib  # pylint: disable=g-import-not-at-top
  from dgcl_jax.step import StepFunctions  # pylint: disable=g-import-not-at-top
  import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.tiny_config("dgcl")
  mesh = runtime.make_mesh()
  fns = StepFunctions(state_lib.Parts.create(config, steps_per_epoch=4), mesh)
  state = state_lib.create_train_state(config, jax.random.PRNGKey(0))
  state = state.replace(memory_bank=tiny.full_bank(config))
  state = jax.device_put(jax.tree_util.tree_map(np.asarray, state), fns.replicated)
  rows = config.batch_size // jax.process_count()
  history = []
  for i in range(3):
    batch = tiny.random_batch(config, i)
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}
    with mesh:
      state, metrics, _ = fns.train_step(state, runtime.global_batch(local, fns.batch_sharding), semi=True)
    history.append({k: float(v) for k, v in metrics.items()})
  # The bank is replicated: this process's copy of it.
  counts = np.asarray(state.memory_bank.count.addressable_data(0)).tolist()
  fts_sum = float(np.asarray(state.memory_bank.fts.addressable_data(0), np.float64).sum())
  print("RESULT " + json.dumps({"history": history, "devices": jax.device_count(), "counts": counts, "fts_sum": fts_sum}), flush=True)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
