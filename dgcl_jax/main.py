"""Entry point: python -m dgcl_jax.main --config=configs/pascal.py:732 --workdir=DIR [--config.x=y].

Multi-host: start one process per host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or set them up through your cluster's environment, which jax.distributed reads).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file under configs/, e.g. configs/pascal.py:732.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with the cluster's environment (SLURM, ...).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", None,
                                       "CPU collectives for multi-process CPU runs (e.g. gloo).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top
  from dgcl_jax import train  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_base.ConfigError, pipeline.DataError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


class _QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (orbax logs every save step by step) out of the progress output."""

  _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}absl{os.sep}")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._PATHS)


def run():
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main)


if __name__ == "__main__":
  run()
