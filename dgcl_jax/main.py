"""Entry point: python -m dgcl_jax.main --config=configs/pascal.py:732 --workdir=DIR [--config.x=y].

Multi-host: start one process per host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or set them up through your cluster's environment, which jax.distributed reads).

Every expected failure (a bad flag or config value, a config that differs from the run's own,
bad data, a non-finite loss, a full disk or unusable workdir) ends with one line
`error: ...` on stderr and exit status 1 (2 for flags); Ctrl-C and SIGTERM save and exit 0.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file under configs/, e.g. configs/pascal.py:732.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, config.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a run whose workdir/config.json differs from the config given in fields that change the computation "
    "(by default that is refused). The previous config.json is kept as config.before_step_<N>.json. A finished "
    "run is never trained further.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with the cluster's environment (SLURM, ...).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", None,
                                       "CPU collectives for multi-process CPU runs (e.g. gloo).")

flags.mark_flags_as_required(["config", "workdir"])


_REPORTED = [False]  # set once the failure's one line is out: what follows is shutdown noise


def _fail(message: str, status: int = 1):
  """One line on stderr, then exit."""
  message = " ".join(str(message).split())
  _REPORTED[0] = True
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
  _quiet_after_failures()
  try:
    _main()
  except KeyboardInterrupt:
    _fail("interrupted before training started; nothing was saved", 130)


def _main():
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  from dgcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top
  from dgcl_jax import convert  # pylint: disable=g-import-not-at-top
  from dgcl_jax import train  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  expected = (config_base.ConfigError, pipeline.DataError, train.NonFiniteLossError, train.RunEnvironmentError,
              checkpointing.CheckpointError, convert.ConversionError, OSError)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except expected as e:
    if isinstance(e, OSError):  # e.g. TensorBoard's event file on a full disk
      e = train.environment_failure(e, _WORKDIR.value)
    _fail(e)


def _flag_error_line(e: BaseException, argv) -> str:
  """One line from a flag/config parsing error (ml_collections' messages span several lines)."""
  text = str(e)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    wrong, right = suggestion.group(2), suggestion.group(1)
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + wrong)]
    name = given[0] if given else wrong
    return f"unknown config field {name}: did you mean {name[:len(name) - len(wrong)]}{right}?"
  text = text.replace("\\n", "\n")
  if "Failed loading config file" in text:
    return f"cannot load the --config file: {[l for l in text.splitlines() if l.strip()][-1].strip()}"
  lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith(("File ", "^"))]
  if not lines:
    return type(e).__name__
  head, tail = lines[0], lines[-1]
  if "Traceback" in text or len(lines) > 2:  # a config file that raised: its own message is the last line
    return f"{head} {tail}" if head != tail and not head.startswith("Traceback") else tail
  return " ".join(lines)


def _parse_flags(argv):
  """absl's flag parsing, with every error (unknown or mistyped --config.x, a config file that
  does not load) as one line instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises only when first used
    return rest
  except Exception as e:  # pylint: disable=broad-except
    _fail(_flag_error_line(e, argv), 2)


class _QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (orbax logs every save step by step) out of the progress output,
  and drops library errors that carry a traceback: the exception reaches the training loop,
  which reports it in one line."""

  _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}absl{os.sep}")

  def filter(self, record):
    library = any(p in record.pathname for p in self._PATHS)
    if record.exc_info and record.exc_info[1] is not None and (
        library or _REPORTED[0] or _reported_once(record.exc_info[1])):
      return False
    if "Event loop is closed" in record.getMessage():
      return False
    return record.levelno >= std_logging.WARNING or not library


# What a failed write says (OSError numbers, TensorStore's texts); checked here without importing
# dgcl_jax.train, because asyncio logs its unretrieved tasks while the interpreter shuts down.
_ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO})
_ENV_TEXTS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded", "Read-only file system")


def _reported_once(error: BaseException) -> bool:
  """Whether the training loop reports `error` in its own line: a failed checkpoint write, which
  orbax's unretrieved asyncio tasks log again by the dozen at exit."""
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  if isinstance(error, OSError) and error.errno in _ENV_ERRNOS:
    return True
  text = str(error)
  return any(marker in text for marker in _ENV_TEXTS)


def _quiet_after_failures():
  """After a failed write the libraries' shutdown repeats it: TensorStore's callbacks into orbax's
  closed event loops print a RuntimeError('Event loop is closed') traceback each (PyErr_Print,
  hundreds of them), tensorboardX's exit hook and writer thread fail again. The failure itself
  is reported once, so these hooks drop what follows it."""
  def quiet(value):
    return _REPORTED[0] or _reported_once(value)

  previous_except, previous_thread, previous_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

  def except_hook(kind, value, tb):
    if not quiet(value):
      previous_except(kind, value, tb)

  def thread_hook(args):
    if not quiet(args.exc_value):
      previous_thread(args)

  def unraisable_hook(args):
    if not quiet(args.exc_value):
      previous_unraisable(args)

  sys.excepthook, threading.excepthook, sys.unraisablehook = except_hook, thread_hook, unraisable_hook


def run():
  # grain's worker processes hand batches over in shared memory; the ones still prefetched when a
  # run stops on an error are unlinked at exit by multiprocessing's resource tracker (a process of
  # its own, hence the environment), which would warn about each as "leaked".
  os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (
      os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:multiprocessing.resource_tracker")))
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
