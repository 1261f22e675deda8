"""Orbax checkpoints of the whole TrainState, the data-iterator state and run metadata.

Layout under the run's workdir:
  checkpoints/<step>/{state,meta,data}   the latest `keep` checkpoints (a CheckpointManager directory)
  checkpoints/best/<step>/...            the best checkpoint by validation mIoU
  checkpoints/<step>.damaged             a checkpoint that could not be restored, set aside
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it on
success), so a run killed mid-save keeps its previous checkpoint intact; the temporary
folder such a kill leaves behind is removed when the next run opens the directory.

Restoring the newest step falls back to older ones: a step whose files cannot be read
(truncated, deleted, missing item) is named in one warning and skipped; a writer moves it
aside to `<step>.damaged` once an older step has restored. A checkpoint whose arrays do not
have the shapes the config gives is not damaged: that is a CheckpointError, nothing moved.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp


ITEMS = ("state", "meta", "data")
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message is one line naming the folder and the reason."""


class DamagedCheckpointError(CheckpointError):
  """The requested step's files cannot be read, or no step's can."""


class ConfigMismatchError(CheckpointError):
  """The checkpoint's arrays do not have the shapes the config gives (another network or bank)."""


def _manager(directory: str, keep: int, name: str, read_only: bool = False) -> ocp.CheckpointManager:
  """name: the prefix of the manager's multi-process barrier keys. Orbax names a save's barriers
  after its step folder only ('async_write_complete.3' for checkpoints/3 and checkpoints/best/3
  alike): the latest and the best managers save the same step at an evaluation, and without their
  own prefixes the second save's barrier collides with the first's while that one is still open
  ("Barrier ... is already ongoing" on one process, a timeout on the others)."""
  # Read-only: the options orbax would otherwise reset with a warning each.
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                         read_only=read_only, save_interval_steps=0 if read_only else 1,
                                         enable_async_checkpointing=not read_only,
                                         multiprocessing_options=ocp.options.MultiprocessingOptions(
                                             barrier_sync_key_prefix=f"dgcl_{name}"))
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _reason(e: BaseException) -> str:
  """One line from an exception chain: the innermost cause's first line (TensorStore hides it)."""
  inner = e
  while inner.__cause__ is not None:
    inner = inner.__cause__
  lines = [l.strip() for l in str(inner).splitlines() if l.strip()]
  text = lines[0] if lines else type(inner).__name__
  text = text if len(text) <= 240 else text[:237] + "..."
  return f"{type(inner).__name__}: {text}"


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def named_leaves(tree) -> dict[str, Any]:
  """{'params.backbone.conv1.kernel': leaf}: the names orbax stores a TrainState's leaves under."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params.backbone.conv1.kernel': shape} of a tree of arrays, ShapeDtypeStructs or orbax metadata."""
  return {name: tuple(getattr(leaf, "shape", ())) for name, leaf in named_leaves(tree).items()}


def check_shapes(stored: dict[str, tuple], expected: dict[str, tuple], where: str, what: str,
                 allow_extra: bool = False) -> None:
  """Raises ConfigMismatchError (one line) naming the first leaf whose presence or shape differs."""
  for name, shape in expected.items():
    if name not in stored:
      raise ConfigMismatchError(f"{where} has no {name} that {what} needs: the checkpoint was written by "
                                f"another model or code version")
    if tuple(stored[name]) != tuple(shape):
      raise ConfigMismatchError(f"{where}: {name} has shape {tuple(stored[name])}, {what} gives {tuple(shape)}")
  extra = sorted(set(stored) - set(expected))
  if extra and not allow_extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ConfigMismatchError(f"{where} holds {extra[0]}{more} that {what} lacks")


def remove_stale_temporaries(directory: str) -> list[str]:
  """Deletes `*.orbax-checkpoint-tmp-*` folders (a save killed midway) directly under `directory`."""
  removed = []
  if not os.path.isdir(directory):
    return removed
  for name in sorted(os.listdir(directory)):
    if _TMP_MARK in name:
      path = os.path.join(directory, name)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
      logging.info("Removed %s, left by an interrupted save.", path)
  return removed


class Checkpointer:
  """The latest and the best checkpoints of one run."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.best_directory = os.path.join(self.directory, "best")
    self.read_only = read_only
    if read_only:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(f"no checkpoints in {workdir}: {self.directory} does not exist")
      self.latest = _manager(self.directory, keep, "latest", read_only=True)
      self.best = (_manager(self.best_directory, 1, "best", read_only=True)
                   if os.path.isdir(self.best_directory) else None)
    else:
      if jax.process_index() == 0:
        remove_stale_temporaries(self.directory)
        remove_stale_temporaries(self.best_directory)
      self.latest = _manager(self.directory, keep, "latest")
      self.best = _manager(self.best_directory, 1, "best")

  def save(self, step: int, state, meta: dict[str, Any], data_state: Any) -> None:
    self.latest.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        data=ocp.args.JsonSave(data_state)))

  def save_best(self, step: int, state, meta: dict[str, Any], data_state: Any) -> None:
    self.best.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        data=ocp.args.JsonSave(data_state)))

  def _manager_of(self, which: str):
    if which not in ("latest", "best"):
      raise ValueError(f"which={which!r}: expected 'latest' or 'best'")
    return self.latest if which == "latest" else self.best

  def steps(self, which: str = "latest") -> list[int]:
    manager = self._manager_of(which)
    return [] if manager is None else sorted(manager.all_steps())

  def step_directory(self, which: str, step: int) -> str:
    return os.path.join(self.directory if which == "latest" else self.best_directory, str(step))

  def stored_shapes(self, which: str, step: int) -> dict[str, tuple[int, ...]]:
    """{'params.backbone...': shape} of the TrainState saved at `step`, from its metadata only."""
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_directory(which, step)) / "state")
    return leaf_shapes(metadata)

  def _first_restorable(self, which: str, step: int | None, restore_one: Callable[[int], Any]):
    """(step, restore_one(step)) for `step`, or the newest step that restores (damaged ones skipped)."""
    manager = self._manager_of(which)
    if manager is None:
      return None
    available = self.steps(which)
    if step is not None:
      if step not in available:
        raise CheckpointError(f"no {which} checkpoint at step {step} in {manager.directory}; "
                              f"available: {available}")
      try:
        return step, restore_one(step)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpointError(f"checkpoint {self.step_directory(which, step)} cannot be restored: "
                              f"{_reason(e)}") from None
    damaged = []
    found = None
    for candidate in sorted(available, reverse=True):
      try:
        found = candidate, restore_one(candidate)
        break
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        folder = self.step_directory(which, candidate)
        logging.warning("checkpoint %s cannot be restored (%s): trying the previous one", folder, _reason(e))
        damaged.append((candidate, folder, _reason(e)))
    if found is None:
      if not damaged:
        return None
      listing = "; ".join(f"{folder}: {reason}" for _, folder, reason in damaged)
      raise DamagedCheckpointError(f"no checkpoint in {manager.directory} can be restored ({listing}); move the "
                            f"folder aside to start the run over")
    if damaged and not self.read_only:
      self._set_aside([folder for _, folder, _ in damaged], manager)
    return found

  def _set_aside(self, folders: list[str], manager) -> None:
    """Renames damaged step folders to <step>.damaged (process 0) so orbax no longer lists them."""
    if jax.process_index() == 0:
      for folder in folders:
        target, n = folder + ".damaged", 1
        while os.path.exists(target):
          target, n = f"{folder}.damaged{n}", n + 1
        os.rename(folder, target)
        logging.warning("moved the damaged checkpoint %s to %s", folder, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("dgcl_jax checkpoint set aside")
    manager.reload()

  def restore(self, abstract_state, which: str = "latest", step: int | None = None):
    """(state, meta, data_state) of `which` ('latest' or 'best') at `step` (default: the newest that
    restores), or None where there is none. Raises CheckpointError (one line) when `step` cannot be
    restored, when no step can, or when the stored shapes differ from `abstract_state`'s."""
    expected = leaf_shapes(abstract_state)
    manager = self._manager_of(which)

    def restore_one(s):
      check_shapes(self.stored_shapes(which, s), expected, f"checkpoint {self.step_directory(which, s)}",
                   "this run's config")
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
          data=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["meta"]), restored["data"]

    found = self._first_restorable(which, step, restore_one)
    return None if found is None else found[1]

  def restore_latest(self, abstract_state):
    return self.restore(abstract_state, "latest")

  def restore_fields(self, select: Callable[[int, dict], dict[str, Any]], which: str = "latest",
                     step: int | None = None):
    """(step, meta, {field: subtree}) restoring only some TrainState fields, e.g. one network's variables.

    select(step, meta) -> {field: abstract subtree (ShapeDtypeStructs with shardings)}, called with
    each candidate step's meta; its ValueError propagates. Falls back over damaged steps as `restore`.
    """
    manager = self._manager_of(which)

    def restore_one(s):
      folder = self.step_directory(which, s)
      meta = dict(manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      try:
        wanted = select(s, meta)
      except ValueError as e:  # e.g. an untrained teacher asked for: not damage
        raise CheckpointError(str(e)) from None
      stored = self.stored_shapes(which, s)
      for field, subtree in wanted.items():
        check_shapes({k: v for k, v in stored.items() if k == field or k.startswith(field + ".")},
                     {f"{field}.{k}" if k else field: v for k, v in leaf_shapes(subtree).items()},
                     f"checkpoint {folder}", "the config")
      restore_args = jax.tree_util.tree_map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), wanted)
      restored = ocp.PyTreeCheckpointer().restore(
          epath.Path(folder) / "state",
          args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True))
      return meta, {field: restored[field] for field in wanted}

    found = self._first_restorable(which, step, restore_one)
    return None if found is None else (found[0], *found[1])

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()
