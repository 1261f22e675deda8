"""One-line errors, the log filter and the exception hooks the entry points share."""

import errno
import logging
import os
import sys
import threading
import types

import pytest

from dgcl_jax import cli

# What ml_collections raises for --config.batchsize=4 (an AttributeError around a KeyError).
UNKNOWN = AttributeError(KeyError('\'batchsize\'\nDid you mean "batch_size" instead of "batchsize"?'))
RAISED = ValueError('flag --config=c.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n'
                    '  File "c.py", line 2, in get_config\n    raise ValueError("bad")\nValueError: bad\n')


@pytest.fixture(autouse=True)
def _not_reported():
  cli._REPORTED[0] = False  # pylint: disable=protected-access
  yield
  cli._REPORTED[0] = False  # pylint: disable=protected-access


def test_unknown_field_in_each_wording():
  argv = ["x", "--workdir=w", "--config.batchsize=4"]
  assert cli.flag_error_line(UNKNOWN, argv) == (
      "unknown config field --config.batchsize: did you mean --config.batch_size?")
  assert cli.flag_error_line(UNKNOWN, argv, library_wording=True) == (
      "--config.batchsize: unknown config field 'batchsize' (Did you mean \"batch_size\" instead of \"batchsize\"?)")
  # The same text as str() gives it (repr'd, escaped quotes and newline).
  assert cli.flag_error_line(AttributeError(str(UNKNOWN)), argv) == (
      "unknown config field --config.batchsize: did you mean --config.batch_size?")
  nested = AttributeError(KeyError('\'modle\'\nDid you mean "model" instead of "modle"?'))
  assert cli.flag_error_line(nested, ["x", "--config.modle.depth=3"]) == (
      "unknown config field --config.modle.depth: did you mean --config.model.depth?")
  assert cli.flag_error_line(KeyError("'qqq'"), ["x", "--config.qqq.x=1"]) == "unknown config field --config.qqq.x"
  assert cli.flag_error_line(KeyError("'qqq'"), ["x", "--config.qqq.x=1"], library_wording=True) == (
      "--config.qqq.x: unknown config field 'qqq'")


def test_config_file_errors_are_one_line():
  assert cli.flag_error_line(RAISED, []) == "flag --config=c.py: Error whilst parsing config file: ValueError: bad"
  assert cli.flag_error_line(RAISED, [], library_wording=True) == "flag --config=c.py: ValueError: bad"
  missing = OSError("Configuration is not available because of an earlier failure to load: Failed loading config "
                    "file config_config\n  Attempted [Relative path]:\n    configs/x.py\n      [Errno 2] No such file")
  assert cli.flag_error_line(missing, []) == "cannot load the --config file: [Errno 2] No such file"
  assert cli.flag_error_line(ValueError("flag --x=y: bad value"), []) == "flag --x=y: bad value"


def test_fail_prints_one_line_and_exits(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.fail("two\n  lines", 2)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: two lines\n"
  assert cli._REPORTED[0]  # pylint: disable=protected-access


def _record(pathname, level=logging.INFO, msg="m", exc=None):
  return logging.LogRecord("x", level, pathname, 1, msg, None, (type(exc), exc, None) if exc else None)


def test_quiet_libraries_filter():
  keep = cli.QuietLibraries().filter
  library = f"{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint.py"
  ours = f"{os.sep}dgcl_jax{os.sep}train.py"
  assert keep(_record(ours)) and keep(_record(library, logging.WARNING))
  assert not keep(_record(library))                                                   # library INFO
  assert not keep(_record(library, logging.WARNING, "Given directory is read only: /w"))  # asked for
  assert not keep(_record(library, logging.ERROR, exc=ValueError("x")))                # reaches the entry point
  assert not keep(_record(ours, logging.ERROR, exc=OSError(errno.ENOSPC, "full")))     # reported on its own
  assert not keep(_record(ours, logging.ERROR, "Task exception: Event loop is closed"))
  assert keep(_record(ours, logging.ERROR, exc=ValueError("x")))
  cli._REPORTED[0] = True  # pylint: disable=protected-access
  assert not keep(_record(ours, logging.ERROR, exc=ValueError("x")))                   # after the one line


def _raised_in(filename):
  """An exception raised in code whose file is `filename`, chained from nothing, and one raised from it."""
  namespace = {}
  exec(compile("def read():\n  raise ValueError('OUT_OF_RANGE: byte range not valid')\n", filename, "exec"), namespace)
  try:
    namespace["read"]()
  except ValueError as inner:
    try:
      raise RuntimeError("Encountered error while reading array index") from inner
    except RuntimeError as outer:
      return inner, outer


def test_asyncio_never_retrieved_library_errors_are_dropped(monkeypatch):
  """Orbax's sibling read tasks of a damaged checkpoint end in asyncio's 'Task exception was never
  retrieved' records; the restore reports the damage itself."""
  monkeypatch.setattr(cli, "_REPORTED", [False])
  keep = cli.QuietLibraries().filter
  base_events = f"{os.sep}usr{os.sep}lib{os.sep}asyncio{os.sep}base_events.py"
  library = f"{os.sep}venv{os.sep}site-packages{os.sep}orbax{os.sep}serialization.py"

  def record(exc, name="asyncio"):
    rec = logging.LogRecord(name, logging.ERROR, base_events, 1, "Task exception was never retrieved", None,
                            (type(exc), exc, exc.__traceback__))
    return rec

  inner, outer = _raised_in(library)
  assert not keep(record(inner)) and not keep(record(outer))     # raised in orbax, or raised from it
  ours_inner, ours_outer = _raised_in(f"{os.sep}dgcl_jax{os.sep}train.py")
  assert keep(record(ours_outer))                                # ours: kept
  assert keep(record(outer, name="dgcl"))                        # not asyncio's: the other rules apply


def test_drop_exceptions_wraps_the_hooks_once_per_name():
  saved = sys.excepthook, threading.excepthook, sys.unraisablehook
  seen = []
  try:
    sys.excepthook = lambda kind, value, tb: seen.append(("except", str(value)))
    threading.excepthook = lambda args: seen.append(("thread", str(args.exc_value)))
    sys.unraisablehook = lambda args: seen.append(("unraisable", str(args.exc_value)))
    drop = lambda error, obj: str(error) == "noise" or obj == "leftover"  # pylint: disable=unnecessary-lambda-assignment
    cli.drop_exceptions("test", drop)
    hooks = sys.excepthook
    cli.drop_exceptions("test", drop)
    assert sys.excepthook is hooks
    for value in (ValueError("noise"), ValueError("real")):
      sys.excepthook(ValueError, value, None)
      threading.excepthook(threading.ExceptHookArgs((ValueError, value, None, None)))
      sys.unraisablehook(types.SimpleNamespace(exc_value=value, object=None))
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("x"), object="leftover"))
    assert seen == [("except", "real"), ("thread", "real"), ("unraisable", "real")]
  finally:
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved


def test_importing_the_package_installs_no_process_wide_hook():
  """Hooks, signal handlers and log filters are the entry points' to install (main.py, the scripts):
  importing every module of the package leaves the process as it was."""
  import subprocess  # pylint: disable=g-import-not-at-top
  code = (
      "import importlib, logging, pkgutil, signal, sys, threading\n"
      "import dgcl_jax, absl.logging, jax, orbax.checkpoint   # the libraries' own import-time set-up first\n"
      "def snapshot():\n"
      "  root = logging.getLogger()\n"
      "  return (sys.excepthook, threading.excepthook, sys.unraisablehook, signal.getsignal(signal.SIGINT),\n"
      "          signal.getsignal(signal.SIGTERM), list(root.filters), [list(h.filters) for h in root.handlers])\n"
      "before = snapshot()\n"
      "names = [m.name for m in pkgutil.walk_packages(dgcl_jax.__path__, 'dgcl_jax.')\n"
      "         if m.name != 'dgcl_jax.main']   # main.py defines the absl flags: an entry point itself\n"
      "for name in names:\n"
      "  importlib.import_module(name)\n"
      "assert 'dgcl_jax.checkpointing' in sys.modules and 'dgcl_jax.train' in sys.modules\n"
      "assert snapshot() == before, [n for n, (a, b) in zip('except thread unraisable int term filters handlers'"
      ".split(), zip(snapshot(), before)) if a != b]\n"
      "print('ok', len(names))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_the_entry_points_and_the_loop_recognise_the_same_environment_errors(tmp_path):
  """One table (errors.py): what the loop reports as an environment failure in one line is what the
  entry points' hooks treat as already reported, and nothing else."""
  from dgcl_jax import errors, rundir  # pylint: disable=g-import-not-at-top
  numbers = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR,
             errno.ENOENT)
  for number in numbers + (errno.EINVAL, errno.EEXIST):
    e = OSError(number, os.strerror(number), "/data/x")
    known = number in numbers
    assert cli._reported_once(e) == known, number  # pylint: disable=protected-access
    assert isinstance(rundir.environment_failure(e, str(tmp_path)), errors.RunEnvironmentError) == known, number
  text = RuntimeError('writing "ocdbt/d/x": RESOURCE_EXHAUSTED: No space left on device')
  assert cli._reported_once(text)  # pylint: disable=protected-access
  assert isinstance(rundir.environment_failure(text, str(tmp_path)), errors.RunEnvironmentError)
