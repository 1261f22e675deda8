"""The run directory: is it usable, whose run it holds (config.json), what a new run needs
before it starts, who may write there (the run's lock), and how a failure to write there is reported."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging
import jax

from dgcl_jax import config_base
from dgcl_jax import errors


LOCK_NAME = ".lock"
# flock's errors on a file system that has no lock support (some NFS and Lustre mounts, FUSE).
_NO_LOCK_SUPPORT = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class WorkdirLock:
  """An exclusive flock on <workdir>/.lock held until release() or the process's death (the kernel
  drops it then, so kill -9 leaves nothing stale). The file names the holder: pid, host, start time."""

  def __init__(self, path: str, fd: int | None):
    self.path, self._fd = path, fd

  @property
  def held(self) -> bool:
    return self._fd is not None

  @classmethod
  def acquire(cls, workdir: str) -> "WorkdirLock":
    """Creates `workdir` if needed and locks it. WorkdirLockedError (one line naming the holder, nothing
    written) if another process holds it; RunEnvironmentError if the workdir cannot be used. Where the
    file system has no locks: one warning, and a WorkdirLock that holds nothing."""
    path = os.path.join(workdir, LOCK_NAME)
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays intact
    except OSError as e:
      raise errors.RunEnvironmentError(f"--workdir={workdir} cannot be used: {errors.os_reason(e)}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
      os.close(fd)
      if holder is not None:
        raise errors.WorkdirLockedError(
            f"--workdir={workdir} is in use by another training run ({holder}); wait for it to end or stop it, "
            "or use another --workdir") from None
      if e.errno in _NO_LOCK_SUPPORT:
        logging.warning("Cannot lock %s (%s: the file system has no lock support): continuing WITHOUT protection "
                        "against a second run in this workdir.", path, e.strerror or e)
        return cls(path, None)
      raise errors.RunEnvironmentError(f"--workdir={workdir} cannot be locked: {errors.os_reason(e)}") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n"
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, record.encode(), 0)
    except OSError as e:
      os.close(fd)
      raise errors.RunEnvironmentError(f"--workdir={workdir} cannot be used: cannot write {path}: "
                                       f"{e.strerror or type(e).__name__}") from None
    return cls(path, fd)

  def release(self) -> None:
    """Empties the record and unlocks (a no-op if nothing is held)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass  # the record of a finished run is harmless: the lock itself is what counts
    os.close(fd)  # drops the flock


def _read_holder(fd: int) -> str:
  """'pid 123 on host h, started 2026-12-03 10:00:00 +0000' from a held lock file's record."""
  text = ""
  for _ in range(20):  # the holder writes its record just after locking: give it a moment
    try:
      text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
      break
    if text:
      break
    time.sleep(0.05)
  try:
    record = json.loads(text)
    return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
  except (ValueError, KeyError, TypeError):
    return f"holder record {text[:200]!r}" if text else "its holder has not recorded itself yet"


def lock_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock (processes of one run may share a host); in a multi-process
  run every process learns whether it did, so all of them stop together. None on other processes."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock.acquire(workdir)
    except errors.RunEnvironmentError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = errors.RunEnvironmentError(f"--workdir={workdir}: process 0 of this run could not lock it (its "
                                         "error says why)")
  if error is not None:
    raise error
  return lock


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written there; RunEnvironmentError if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.RunEnvironmentError(f"--workdir={workdir} cannot be used: {errors.os_reason(e)}") from None


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints under workdir/checkpoints, from the folder names."""
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _stored_meta(workdir: str, step: int) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
      meta = json.load(f)
    return meta if isinstance(meta, dict) else {}
  except (OSError, ValueError):
    return {}


def check_run_identity(config, workdir: str, allow_config_change: bool = False, total_steps=None):
  """(resuming, changes) for `config` in `workdir`, reading files only.

  total_steps: the steps `config` trains for (an int, or a function giving it: read only for a
  finished run); default: computed from the config.

  resuming: the workdir holds checkpoints. changes: [(field, stored, requested)] where `config`
  differs from <workdir>/config.json in a field that changes the computation (all but
  config_base.FREE_FIELDS). Raises ConfigChangeError, nothing touched, if there are changes and
  not allow_config_change, or if the run has finished and `config` would train it further
  (its checkpoints are never trained over). A workdir from before config.json was kept per run
  is resumed unchecked, with a warning.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    return False, []
  latest = steps[-1]
  finals = [m["final"] for m in (_stored_meta(workdir, s) for s in steps) if isinstance(m.get("final"), dict)]
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      changes = config_base.config_changes(stored, config_base.as_json_dict(config))
    except (OSError, ValueError, AttributeError) as e:
      reason = errors.os_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
      if not allow_config_change:
        raise config_base.ConfigChangeError(
            f"{path}: cannot read the run's config ({reason}); pass --allow_config_change to resume "
            "with the config given") from None
      changes = [("config.json", "unreadable", "rewritten")]
  else:
    logging.warning("%s has checkpoints but no config.json (a run from an older version): resuming without "
                    "comparing configs.", workdir)
    changes = []
  if finals:
    if total_steps is None:
      from dgcl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
      total_steps = lambda: state_lib.total_steps(config)  # pylint: disable=unnecessary-lambda-assignment
    total = int(total_steps() if callable(total_steps) else total_steps)
    done = max(int(f.get("step", latest)) for f in finals)
    if changes or total != done:
      what = config_base.describe_changes(changes) if changes else f"{total} steps instead of {done}"
      raise config_base.ConfigChangeError(
          f"--workdir={workdir} holds a run that finished at step {done}; the config given differs ({what}) and "
          "would train over its final checkpoints: use a new --workdir")
  if changes and not allow_config_change:
    raise config_base.ConfigChangeError(
        f"--workdir={workdir} holds a run (step {latest}) started with another config: "
        f"{config_base.describe_changes(changes)}; resume with the run's own config ({path}), use a new --workdir, "
        "or pass --allow_config_change to resume with the new values")
  if changes:
    logging.warning("Resuming %s with a changed config (--allow_config_change): %s", workdir,
                    config_base.describe_changes(changes))
  return True, changes


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_run_config(config, workdir: str, *, new_run: bool, changes, step: int) -> None:
  """Writes <workdir>/config.json for a new run; after an allowed change, keeps the previous one
  as config.before_step_<step>.json and writes the new one."""
  path = os.path.join(workdir, "config.json")
  try:
    if new_run:
      _write_text(path, config.to_json_best_effort(indent=2))
    elif changes:
      kept = os.path.join(workdir, f"config.before_step_{step}.json")
      if os.path.exists(path):
        os.replace(path, kept)
      _write_text(path, config.to_json_best_effort(indent=2))
      logging.warning("%s now holds the changed config; the one the run used up to step %d is kept as %s.",
                      path, step, kept)
  except OSError as e:
    raise errors.RunEnvironmentError(f"cannot write {path}: {errors.os_reason(e)}") from None


def check_pretrained(config) -> None:
  """A new run's pretrained backbone must exist (ConfigError naming how to get one); "none"
  trains from random weights on purpose, with a warning."""
  path = config_base.pretrained_dir(config)
  if path is None:
    if str(config.model.pretrained).strip() or config.data.name != "synthetic":
      logging.warning("config.model.pretrained=%r: the backbone starts from random weights (the published "
                      "results start from an ImageNet-pretrained one).", config.model.pretrained)
    return
  if not os.path.isdir(path):
    what, source = config_base.pretrained_source(config)   # resnet101.pth, or a DINOv2 release for arch 'dpt'
    raise config_base.ConfigError(
        f"config.model.pretrained={path!r}: no such directory. Convert {what} once with "
        f"`python scripts/convert_torch_checkpoint.py --input {source} --output {path}` (README, Real data), "
        "or pass --config.model.pretrained=none to train from scratch on purpose")


def environment_failure(e: BaseException, workdir: str, where: str | None = None) -> BaseException:
  """RunEnvironmentError (one line) if `e` says the machine could not store what the run writes
  under `where` (default: the workdir); `e` itself otherwise."""
  cause = errors.environment_cause(e)
  if cause is None:
    return e
  steps = checkpoint_steps(workdir)
  kept = (f"the newest complete checkpoint, step {steps[-1]}, is kept" if steps
          else "no complete checkpoint exists yet")
  return errors.RunEnvironmentError(
      f"cannot write to {os.path.abspath(where or workdir)}: {cause}; {kept}. "
      "Free space (or fix the workdir) and rerun the same command to resume")


def saved_note(directory: str, step: int) -> str:
  if step == 0:
    return "no step was trained yet"
  return f"the state after step {step} was saved in {directory}: fix the data and rerun the same command to resume"
