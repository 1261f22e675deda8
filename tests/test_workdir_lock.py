"""One writer per run directory (dgcl_jax/rundir.py: WorkdirLock, lock_workdir): a second run is
refused naming the holder and writes nothing; kill -9 leaves nothing stale; readers (evaluate.py,
predict.py) take no lock and read past a save in progress. The end-to-end case (two
`python -m dgcl_jax.main` on one workdir) is in tests/test_e2e.py."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from dgcl_jax import checkpointing
from dgcl_jax import config_base
from dgcl_jax import errors
from dgcl_jax import rundir
from dgcl_jax import train
from tests.tiny import tiny_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLD = ("import sys, time; from dgcl_jax import rundir; lock = rundir.WorkdirLock.acquire(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)")


def _snapshot(workdir):
  """{relative path: (size, mtime_ns, bytes)} of everything under workdir."""
  found = {}
  for base, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(base, name)
      st = os.stat(path)
      content = open(path, "rb").read() if os.path.isfile(path) else None
      found[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns, content)
  return found


@pytest.fixture
def holder(tmp_path):
  """A child process that holds tmp_path/run's lock until killed."""
  workdir = tmp_path / "run"
  child = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=_ROOT, stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert child.stdout.readline().strip() == "locked"
    yield workdir, child
  finally:
    if child.poll() is None:
      child.kill()
    child.wait()


def test_a_held_workdir_is_refused_naming_the_holder_and_nothing_is_written(holder):
  workdir, child = holder
  record = json.loads((workdir / rundir.LOCK_NAME).read_text())
  assert record["pid"] == child.pid and record["host"] == socket.gethostname() and record["started"]
  before = _snapshot(workdir)
  with pytest.raises(errors.WorkdirLockedError) as info:
    rundir.WorkdirLock.acquire(str(workdir))
  message = str(info.value)
  assert "\n" not in message
  assert f"--workdir={workdir}" in message
  assert f"pid {child.pid} on host {socket.gethostname()}, started {record['started']}" in message
  assert _snapshot(workdir) == before  # the lock file is opened without truncation and left as it was


def test_the_lock_is_released_when_the_holder_is_killed_with_sigkill(holder):
  workdir, child = holder
  child.send_signal(signal.SIGKILL)
  child.wait()
  lock = rundir.WorkdirLock.acquire(str(workdir))
  try:
    assert lock.held
    assert json.loads((workdir / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
  finally:
    lock.release()
  assert (workdir / rundir.LOCK_NAME).read_text() == ""  # a clean end leaves no holder named
  rundir.WorkdirLock.acquire(str(workdir)).release()


def test_a_second_lock_in_the_same_process_is_refused_until_released(tmp_path):
  first = rundir.WorkdirLock.acquire(str(tmp_path / "run"))
  with pytest.raises(errors.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    rundir.WorkdirLock.acquire(str(tmp_path / "run"))
  first.release()
  first.release()  # idempotent
  rundir.WorkdirLock.acquire(str(tmp_path / "run")).release()


def test_an_unusable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.RunEnvironmentError, match=r"^--workdir=.*/file/run cannot be used: Not a directory"):
    rundir.WorkdirLock.acquire(str(tmp_path / "file" / "run"))


def test_a_full_disk_when_recording_the_holder_is_one_line_and_leaves_the_lock_free(tmp_path, monkeypatch):
  def pwrite(fd, data, offset):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(rundir.os, "pwrite", pwrite)
  with pytest.raises(errors.RunEnvironmentError) as info:
    rundir.WorkdirLock.acquire(str(tmp_path / "run"))
  assert str(info.value) == (f"--workdir={tmp_path / 'run'} cannot be used: cannot write "
                             f"{tmp_path / 'run' / rundir.LOCK_NAME}: No space left on device")
  monkeypatch.undo()
  rundir.WorkdirLock.acquire(str(tmp_path / "run")).release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_no_lock_support_warns_once_and_continues(tmp_path, monkeypatch, caplog, code):
  def flock(fd, operation):
    raise OSError(code, os.strerror(code))
  monkeypatch.setattr(rundir.fcntl, "flock", flock)
  with caplog.at_level("WARNING"):
    lock = rundir.WorkdirLock.acquire(str(tmp_path / "run"))
  assert not lock.held
  lock.release()
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "WITHOUT protection" in warnings[0] and "\n" not in warnings[0]
  # Another error of flock is not taken for missing support.
  monkeypatch.setattr(rundir.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EBADF, "bad")))
  with pytest.raises(errors.RunEnvironmentError, match="cannot be locked"):
    rundir.WorkdirLock.acquire(str(tmp_path / "run2"))


def test_only_process_0_locks_and_every_process_stops_when_it_could_not(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setattr(rundir.jax, "process_index", lambda: 1)
  assert rundir.lock_workdir(str(workdir)) is None
  assert not workdir.exists()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  told = []
  monkeypatch.setattr(rundir.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or np.int32(1))
  with pytest.raises(errors.RunEnvironmentError, match="process 0 of this run could not lock it"):
    rundir.lock_workdir(str(workdir))
  # Process 0 shares its refusal before raising it, so the others do not wait for it forever.
  monkeypatch.setattr(rundir.jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or x)
  held = rundir.WorkdirLock.acquire(str(workdir))
  try:
    with pytest.raises(errors.WorkdirLockedError):
      rundir.lock_workdir(str(workdir))
  finally:
    held.release()
  assert told == [0, 1]


def _tiny(tmp_path):
  config = tiny_config("supervised")
  config.compilation_cache_dir = "none"
  return config


def test_training_on_a_locked_workdir_stops_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  held = rundir.WorkdirLock.acquire(str(workdir))
  try:
    before = _snapshot(workdir)
    with pytest.raises(errors.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(_tiny(tmp_path), str(workdir))
    assert _snapshot(workdir) == before
  finally:
    held.release()


def test_a_run_that_fails_releases_its_lock(tmp_path):
  workdir = tmp_path / "run"
  config = _tiny(tmp_path)
  config.model.pretrained = str(tmp_path / "missing")   # refused after the lock is taken
  with pytest.raises(config_base.ConfigError, match="no such directory"):
    train.train_and_evaluate(config, str(workdir))
  assert (workdir / rundir.LOCK_NAME).read_text() == ""
  rundir.WorkdirLock.acquire(str(workdir)).release()


# ----------------------------------------------------------------------------- readers during a save


def _state(step):
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)),
                                        jax.sharding.PartitionSpec())
  return {"w": jax.device_put(np.full((64, 64), step, np.float32), sharding)}


def test_a_reader_restores_the_newest_complete_step_while_a_save_is_in_progress(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  writer = checkpointing.Checkpointer(str(tmp_path), keep=3)
  writer.save(1, _state(1), {"step": 1}, {"step": 1})
  writer.wait()
  # Step 2's files are written into orbax's temporary folder, and held there before the rename.
  release, reached = threading.Event(), threading.Event()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    reached.set()
    release.wait(120)
    return await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  try:
    writer.save(2, _state(2), {"step": 2}, {"step": 2})
    assert reached.wait(120)
    directory = tmp_path / "checkpoints"
    in_progress = [n for n in os.listdir(directory) if n.startswith("2.") and "orbax-checkpoint-tmp" in n]
    assert in_progress and os.listdir(directory / in_progress[0]), os.listdir(directory)
    before = sorted(os.listdir(directory))
    reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    assert reader.steps() == [1]
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      _state(0))
    state, meta, _ = reader.restore(abstract)
    assert meta == {"step": 1} and float(np.asarray(state["w"])[0, 0]) == 1.0
    step, meta, fields = reader.restore_fields(lambda s, m: abstract)
    assert step == 1 and float(np.asarray(fields["w"])[0, 0]) == 1.0
    reader.close()
    assert sorted(os.listdir(directory)) == before   # the reader moved and removed nothing
  finally:
    release.set()
  writer.wait()
  assert writer.steps() == [1, 2]
  writer.close()
