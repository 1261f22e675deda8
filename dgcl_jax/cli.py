"""What the entry points (dgcl_jax/main.py, scripts/evaluate.py, scripts/predict.py) share: a failure
is one line `error: ...` on stderr; library logs and the libraries' shutdown noise stay out of it.

Imports only the standard library (and dgcl_jax/errors.py) at module level, so the entry points
import it before jax; the scripts cannot import dgcl_jax/main.py (its absl flags would clash with theirs).
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import threading
from typing import Callable

from dgcl_jax import errors

_REPORTED = [False]  # set once a failure's one line is out: what follows is shutdown noise


def fail(message, status: int = 1):
  """One line `error: message` on stderr, then sys.exit(status)."""
  message = " ".join(str(message).split())
  _REPORTED[0] = True
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


# ----------------------------------------------------------------------------- flag and config errors


def _unknown_field(e: BaseException) -> tuple[str, list[str]] | None:
  """(field, the rest of the message's lines) from ml_collections' KeyError/AttributeError for an
  unknown --config.x field (an AttributeError around a KeyError, the text quoted in each)."""
  if not isinstance(e, (KeyError, AttributeError)):
    return None
  inner = e
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  text = str(inner.args[0]) if inner.args else str(inner)
  text = text.replace("\\n", "\n").replace("\\'", "'")  # the same text once repr'd (str of an AttributeError)
  lines = [l.strip().strip("'\"") for l in text.splitlines() if l.strip()]
  return (lines[0], lines[1:]) if lines else None


def _override(argv, field: str) -> str | None:
  """The --config.x override in argv that names `field`: the one ending with it, else one that
  contains it, else the first; None without overrides."""
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  return next((o for o in overrides if o.endswith("." + field)), None) or next(
      (o for o in overrides if field in o), None) or next(iter(overrides), None)


def flag_error_line(e: BaseException, argv, *, library_wording: bool = False) -> str:
  """One line from a flag or --config.x=y error (absl's and ml_collections' messages span several
  lines, a config file that raised carries its traceback).

  library_wording: ml_collections' own words, after the flag (scripts/evaluate.py and predict.py):
  `--config.batchsize: unknown config field 'batchsize' (Did you mean "batch_size" ...)`; otherwise
  (dgcl_jax/main.py) `unknown config field --config.batchsize: did you mean --config.batch_size?`.
  """
  unknown = _unknown_field(e)
  if unknown is not None:
    field, rest = unknown
    flag = _override(argv, field)
    if library_wording:
      line = f"unknown config field '{field}'" + (f" ({' '.join(rest)})" if rest else "")
      return f"{flag}: {line}" if flag else line
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', " ".join(rest))
    if suggestion is not None:
      name = flag if flag and field in flag.split(".") else field
      parts = name.split(".")
      parts[len(parts) - 1 - parts[::-1].index(field)] = suggestion.group(1)  # the misspelt part
      return f"unknown config field {name}: did you mean {'.'.join(parts)}?"
    if flag and field in flag.split("."):
      return f"unknown config field {flag}"
  text = str(e).replace("\\n", "\n")
  if "Failed loading config file" in text:
    return f"cannot load the --config file: {[l for l in text.splitlines() if l.strip()][-1].strip()}"
  lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith(("File ", "^"))]
  if not lines:
    return type(e).__name__
  head, tail = lines[0], lines[-1]
  if "Traceback" in text or len(lines) > 2:  # a config file that raised: its own message is the last line
    if library_wording:
      head = head.split(": Error", 1)[0] + ":"  # `flag --config=FILE: Error whilst parsing config file:`
    return f"{head} {tail}" if head != tail and not head.startswith("Traceback") else tail
  return " ".join(lines)


def parse_flags(argv, *, library_wording: bool = False, check: Callable[[], None] | None = None):
  """absl's flag parsing (for app.run(flags_parser=...)) with every error, `check()`'s included, as
  one line on stderr and exit status 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    if check is not None:
      check()
    return rest
  except Exception as e:  # pylint: disable=broad-except
    fail(flag_error_line(e, argv, library_wording=library_wording), 2)


# ----------------------------------------------------------------------------- library noise


def is_closed_loop_error(error) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _reported_once(error: BaseException) -> bool:
  """Whether the entry point reports `error` in its own line: a failed checkpoint write, which
  orbax's unretrieved asyncio tasks log again by the dozen at exit."""
  return is_closed_loop_error(error) or errors.environment_cause(error) is not None


class QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (orbax logs every save step by step) out of the progress output,
  drops library errors that carry a traceback (the exception reaches the entry point, which reports
  it in one line) and, once a failure is reported, any record of it; drops the warnings about what
  this project asks for on purpose (opening checkpoints read-only to evaluate)."""

  _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}absl{os.sep}")
  _EXPECTED = ("Given directory is read only",)

  def filter(self, record):
    library = any(p in record.pathname for p in self._PATHS)
    if record.exc_info and record.exc_info[1] is not None and (
        library or _REPORTED[0] or _reported_once(record.exc_info[1])
        or (record.name == "asyncio" and self._raised_in_library(record.exc_info[1]))):
      # asyncio: "Task exception was never retrieved" for orbax's sibling tasks of a failed read
      # or write, whose first error the caller already handles (e.g. a damaged checkpoint set aside).
      return False
    if "Event loop is closed" in record.getMessage():
      return False
    if library:
      return record.levelno >= std_logging.WARNING and not str(record.msg).startswith(self._EXPECTED)
    return True


  @classmethod
  def _raised_in_library(cls, error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) has a frame in jax, orbax, grain or absl."""
    seen = set()
    while error is not None and id(error) not in seen:
      seen.add(id(error))
      tb = error.__traceback__
      while tb is not None:
        if any(p in tb.tb_frame.f_code.co_filename for p in cls._PATHS):
          return True
        tb = tb.tb_next
      error = error.__cause__ or error.__context__
    return False


def quiet_libraries() -> None:
  """INFO logging for this project, WARNING and above for jax, orbax, grain and absl."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(QuietLibraries())


def drop_exceptions(name: str, drop: Callable[[BaseException, object], bool]) -> None:
  """Wraps sys.excepthook, threading.excepthook and sys.unraisablehook so that the exceptions for
  which drop(exception, unraisable object or None) holds are not printed. Once per `name` while
  the hooks stay installed."""
  installed = getattr(sys.excepthook, "_dgcl_drops", frozenset())
  if name in installed:
    return
  previous_except, previous_thread, previous_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

  def except_hook(kind, value, tb):
    if not drop(value, None):
      previous_except(kind, value, tb)

  def thread_hook(args):
    if not drop(args.exc_value, None):
      previous_thread(args)

  def unraisable_hook(args):
    if not drop(args.exc_value, args.object):
      previous_unraisable(args)

  except_hook._dgcl_drops = installed | {name}  # pylint: disable=protected-access
  sys.excepthook, threading.excepthook, sys.unraisablehook = except_hook, thread_hook, unraisable_hook


def quiet_after_failures() -> None:
  """After a failed write the libraries' shutdown repeats it: TensorStore's callbacks into orbax's
  closed event loops print a RuntimeError('Event loop is closed') traceback each (PyErr_Print,
  hundreds of them), tensorboardX's exit hook and writer thread fail again. The failure itself
  is reported once (fail), so the hooks drop what follows it."""
  drop_exceptions("after_failures", lambda error, _: _REPORTED[0] or _reported_once(error))


def exit_with_status(status: int):
  """sys.exit(status); a failure exits at once (os._exit, streams flushed): interpreter shutdown
  after a failed restore makes TensorStore hand its cancelled reads to orbax's closed event loop,
  dozens of "Event loop is closed" tracebacks after the one line that matters."""
  if status:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def _orbax_leftover(error, unraisable_object) -> bool:
  """Whether an error printed as uncaught or unraisable is an echo of a failed restore ("RuntimeError:
  Event loop is closed", an orbax coroutine never awaited): those are dropped.

  Orbax runs each restore in a fresh event loop and closes it as soon as one read fails;
  TensorStore then delivers the other reads' completions to that closed loop, and the other
  reads' coroutines are dropped with their errors: each is printed as unraisable, dozens of
  tracebacks after the one error the caller handles.
  """
  code = getattr(unraisable_object, "cr_code", None)  # orbax's sibling reads, never awaited
  return is_closed_loop_error(error) or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)


def quiet_orbax_leftovers() -> None:
  """Installs the hooks that drop `_orbax_leftover` echoes (process-wide: entry points only)."""
  drop_exceptions("orbax_closed_loop", _orbax_leftover)
