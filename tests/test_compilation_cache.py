"""The trainer's persistent compilation cache (runtime.setup_compilation_cache)."""
import os
import subprocess
import sys

import jax
import pytest

from dgcl_jax import config_base
from dgcl_jax import runtime

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sets the cache up as train_and_evaluate does, compiles one small program and reports the
# persistent-cache hits the trainer counted.
_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
from dgcl_jax import config_base, runtime
config = config_base.base_config()
config.compilation_cache_dir = sys.argv[1]
print("cache dir", runtime.setup_compilation_cache(config))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in ms
jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
print("cache hits", runtime.compilation_cache_hits())
"""


@pytest.fixture
def no_jax_cache_dir():
  """jax's own cache setting unset during the test (a trainer test may have set it in this process)."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_cache_directory_default_override_and_off(monkeypatch, tmp_path, no_jax_cache_dir):
  config = config_base.base_config()
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert runtime.compilation_cache_dir(config) == str(tmp_path / "xdg" / "dgcl_jax" / "jax_cache")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert runtime.compilation_cache_dir(config) == str(tmp_path / "home" / ".cache" / "dgcl_jax" / "jax_cache")
  config.compilation_cache_dir = "~/elsewhere"
  assert runtime.compilation_cache_dir(config) == str(tmp_path / "home" / "elsewhere")
  config.compilation_cache_dir = "None"
  assert runtime.compilation_cache_dir(config) is None
  assert runtime.setup_compilation_cache(config) is None
  # By default jax's own setting (JAX_COMPILATION_CACHE_DIR) wins over the trainer's location.
  config.compilation_cache_dir = ""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_env"))
  assert runtime.compilation_cache_dir(config) == str(tmp_path / "jax_env")


def test_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run():
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return out.splitlines()

  first = run()
  assert first == [f"cache dir {cache}", "cache hits 0"]
  assert any(cache.iterdir())   # the executables were written
  second = run()
  assert second[0] == f"cache dir {cache}"
  assert int(second[1].split()[-1]) >= 1   # the jitted program (and jnp.ones') loaded, not compiled
