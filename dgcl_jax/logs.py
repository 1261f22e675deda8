"""Log filtering shared by the entry points (dgcl_jax/main.py, scripts/evaluate.py, scripts/predict.py)."""

from __future__ import annotations

import logging as std_logging
import os


class QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (orbax logs every save step by step) out of the progress output."""

  _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}absl{os.sep}")

  # Warnings about what this project asks for on purpose (opening checkpoints read-only to evaluate).
  _EXPECTED = ("Given directory is read only",)

  def filter(self, record):
    if any(p in record.pathname for p in self._PATHS):
      if record.levelno < std_logging.WARNING:
        return False
      return not any(str(record.msg).startswith(m) for m in self._EXPECTED)
    return True


def quiet_libraries() -> None:
  """INFO logging for this project, WARNING and above for jax, orbax, grain and absl."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(QuietLibraries())
