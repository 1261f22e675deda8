"""Test set-up: JAX on CPU with 4 forced host devices (set before jax is imported)."""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The trainer's persistent compilation cache defaults to $XDG_CACHE_HOME/dgcl_jax/jax_cache: tests
# (and the subprocesses they start) write theirs to a directory removed at exit, never the user's.
_cache_home = tempfile.mkdtemp(prefix="dgcl_test_cache_")
os.environ["XDG_CACHE_HOME"] = _cache_home
atexit.register(shutil.rmtree, _cache_home, ignore_errors=True)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of the trainer and scripts run as subprocesses: CPU, 2 devices, cheap XLA
  optimization, and a compilation cache shared by the module's runs."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env
