"""`python tests/fault_main.py MODE STEP [dgcl_jax.main flags]`: the command line with one failure injected.

disk_full: the checkpoint of step STEP and later ones fail in orbax's background commit with
  ENOSPC, as on a full disk (the earlier ones are written normally).
data_error: loading the batch of step STEP + 1 raises a DataError, as a file that cannot be read.
val_error: the evaluation at step STEP raises a DataError, as a validation file that cannot be read.
slow_commit: on process 0 of a multi-process run, the background commits of the checkpoints of
  step STEP (latest and best) wait 3 s before their barriers, as on a busier primary host; every
  background commit's barriers time out after 60 s (orbax's default: 20 minutes).
"""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  mode, step = sys.argv[1], int(sys.argv[2])
  del sys.argv[1:3]
  if mode == "disk_full":
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
      name = self._final_path.name  # pylint: disable=protected-access
      if name.isdigit() and int(name) >= step:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))
      return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif mode == "data_error":
    from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    original = pipeline.TrainIterator.__next__

    def next_batch(self):
      if self.step == step:
        raise pipeline.DataError("JPEGImages/broken.jpg: cannot decode image (injected)")
      return original(self)

    pipeline.TrainIterator.__next__ = next_batch
  elif mode == "val_error":
    from dgcl_jax import train  # pylint: disable=g-import-not-at-top
    from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    original = train.evaluate_state

    def evaluate_state(fns, state, config, use_teacher):
      if int(state.step) == step:
        raise pipeline.DataError("SegmentationClassAug/val.png: cannot decode label (injected)")
      return original(fns, state, config, use_teacher)

    train.evaluate_state = evaluate_state
  elif mode == "slow_commit":
    import time  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from orbax.checkpoint._src.checkpointers import async_checkpointer  # pylint: disable=g-import-not-at-top
    original = async_checkpointer._background_wait_for_commit_futures  # pylint: disable=protected-access

    def wait_for_commit(directory, *args, **kwargs):
      if jax.process_index() == 0 and directory.name == str(step):
        time.sleep(3)
      return original(directory, *args, **dict(kwargs, timeout_secs=min(kwargs["timeout_secs"], 60)))

    async_checkpointer._background_wait_for_commit_futures = wait_for_commit  # pylint: disable=protected-access
  else:
    raise SystemExit(f"unknown mode {mode}")
  from dgcl_jax import main as entry  # pylint: disable=g-import-not-at-top
  entry.run()


if __name__ == "__main__":
  main()
