"""Where the step runs: the device mesh and global batches, jax's persistent compilation cache,
preemption signals, and the first-step timing log."""

from __future__ import annotations

import os
import signal
import time

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np


def make_mesh() -> Mesh:
  """All devices of all processes on one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P("data"))


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over 'data'."""
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
          for k, v in local.items()}


# ----------------------------------------------------------------------------- compilation cache


def compilation_cache_dir(config) -> str | None:
  """Where jax's persistent compilation cache lives for this run; None when the trainer sets none.

  config.compilation_cache_dir: '' = jax's own setting if any (JAX_COMPILATION_CACHE_DIR), else
  $XDG_CACHE_HOME (else ~/.cache)/dgcl_jax/jax_cache; 'none' = the trainer sets no cache (jax's own
  setting still applies); else that directory.
  """
  value = str(config.get("compilation_cache_dir", "") or "").strip()
  if value.lower() == "none":
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dgcl_jax", "jax_cache")


class _CacheHits:
  """Persistent-cache hits in this process, counted through jax.monitoring."""
  count = 0
  listening = False

  @classmethod
  def listen(cls):
    if not cls.listening:
      jax.monitoring.register_event_listener(cls._event)
      cls.listening = True

  @classmethod
  def _event(cls, event: str, **kwargs):  # pylint: disable=unused-argument
    if event == "/jax/compilation_cache/cache_hits":
      cls.count += 1


def compilation_cache_hits() -> int:
  """Persistent compilation cache hits in this process since `setup_compilation_cache`."""
  return _CacheHits.count


def setup_compilation_cache(config) -> str | None:
  """Turns on jax's persistent compilation cache (compilation_cache_dir), so that a resumed
  or repeated run loads its compiled steps instead of compiling them again. Returns the directory."""
  path = compilation_cache_dir(config)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache %s unusable (%s): compiling without it", path, e)
    return None
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()   # jax keeps the first directory it opened otherwise
    jax.config.update("jax_compilation_cache_dir", path)
  # The steps take seconds to minutes to compile; below jax's 1 s default, mid-size programs count too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    min(0.5, jax.config.jax_persistent_cache_min_compile_time_secs))
  _CacheHits.listen()
  return path


class FirstStepLog:
  """Logs how long each step program (supervised / semi-supervised) took to compile and run the first time."""

  def __init__(self):
    self.seen = set()

  @staticmethod
  def now():
    return time.perf_counter(), _CacheHits.count

  def __call__(self, semi: bool, metrics, started):
    """After train_step(semi=semi) returned `metrics`; `started` = now() before the call."""
    if semi in self.seen:
      return
    self.seen.add(semi)
    jax.block_until_ready(metrics)
    source = "loaded from the compilation cache" if _CacheHits.count > started[1] else "compiled"
    logging.info("first %s step %s and ran in %.1f s", "semi-supervised" if semi else "supervised",
                 source, time.perf_counter() - started[0])


# ----------------------------------------------------------------------------- preemption


class Preempted:
  """SIGTERM and SIGINT (Ctrl-C) become a flag the loop checks: save, then exit cleanly.

  A second SIGINT exits at once without saving (the previous checkpoint stays intact).
  """

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread
        pass

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      os.write(2, b"error: interrupted again: exiting without saving; rerun the same command to resume "
                  b"from the last checkpoint\n")
      os._exit(130)  # pylint: disable=protected-access
    logging.warning("%s received: saving a checkpoint and stopping%s.", name,
                    " (Ctrl-C again exits at once)" if signum == signal.SIGINT else "")
    self.requested, self.signal_name = True, name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
