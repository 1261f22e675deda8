"""Entry point: python -m dgcl_jax.main --config=configs/pascal.py:732 --workdir=DIR [--config.x=y].

Multi-host: start one process per host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or set them up through your cluster's environment, which jax.distributed reads).

Every expected failure (a bad flag or config value, a config that differs from the run's own,
bad data, a non-finite loss, a full disk, an unusable workdir or one another run holds) ends
with one line `error: ...` on stderr and exit status 1 (2 for flags); Ctrl-C and SIGTERM save and exit 0.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dgcl_jax import cli

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


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
  cli.quiet_after_failures()
  cli.quiet_orbax_leftovers()
  try:
    _main()
  except KeyboardInterrupt:
    cli.fail("interrupted before training started; nothing was saved", 130)


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
  from dgcl_jax import errors  # pylint: disable=g-import-not-at-top
  from dgcl_jax import rundir  # pylint: disable=g-import-not-at-top
  from dgcl_jax import train  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  expected = (config_base.ConfigError, pipeline.DataError, errors.NonFiniteLossError, errors.RunEnvironmentError,
              checkpointing.CheckpointError, convert.ConversionError, OSError)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except expected as e:
    if isinstance(e, OSError):  # e.g. TensorBoard's event file on a full disk
      e = rundir.environment_failure(e, _WORKDIR.value)
    cli.fail(e)


def _check_config():
  if _CONFIG.value is not None:
    _CONFIG.value.keys()  # a config file that failed to load raises only when first used


def run():
  # grain's worker processes hand batches over in shared memory; the ones still prefetched when a
  # run stops on an error are unlinked at exit by multiprocessing's resource tracker (a process of
  # its own, hence the environment), which would warn about each as "leaked".
  os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (
      os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:multiprocessing.resource_tracker")))
  cli.quiet_libraries()
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, check=_check_config))


if __name__ == "__main__":
  run()
