"""Orbax checkpoints of the whole TrainState, the data-iterator state and run metadata.

Layout under the run's workdir:
  checkpoints/<step>/{state,meta,data}   the latest `keep` checkpoints (a CheckpointManager directory)
  checkpoints/best/<step>/...            the best checkpoint by validation mIoU
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it on
success), so a run killed mid-save keeps its previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

ITEMS = ("state", "meta", "data")


def _manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class Checkpointer:
  """The latest and the best checkpoints of one run."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.best_directory = os.path.join(self.directory, "best")
    if read_only:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(f"no checkpoints in {workdir}: {self.directory} does not exist")
      self.latest = _manager(self.directory, keep, read_only=True)
      self.best = _manager(self.best_directory, 1, read_only=True) if os.path.isdir(self.best_directory) else None
    else:
      self.latest = _manager(self.directory, keep)
      self.best = _manager(self.best_directory, 1)

  def save(self, step: int, state, meta: dict[str, Any], data_state: Any) -> None:
    self.latest.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        data=ocp.args.JsonSave(data_state)))

  def save_best(self, step: int, state, meta: dict[str, Any], data_state: Any) -> None:
    self.best.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        data=ocp.args.JsonSave(data_state)))

  def steps(self, which: str = "latest") -> list[int]:
    manager = self.latest if which == "latest" else self.best
    return [] if manager is None else list(manager.all_steps())

  def restore(self, abstract_state, which: str = "latest", step: int | None = None):
    """(state, meta, data_state) of `which` ('latest' or 'best') at `step` (default newest), or None."""
    manager = self.latest if which == "latest" else self.best
    if manager is None:
      return None
    if step is None:
      step = manager.latest_step()
    if step is None:
      return None
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no {which} checkpoint at step {step} in {manager.directory}; "
                              f"available: {sorted(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
        data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"]), restored["data"]

  def restore_latest(self, abstract_state):
    return self.restore(abstract_state, "latest")

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()
