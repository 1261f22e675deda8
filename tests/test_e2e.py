"""End to end: `python -m dgcl_jax.main` on tiny synthetic runs, evaluate.py, resumption.

Each run is a subprocess on the CPU, sharing a persistent compilation cache to save time.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.batch_size=4", "--config.num_slices=2", "--config.num_epochs=2", "--config.sup_only_epochs=1",
    "--config.steps_per_epoch=3", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
    "--config.data.crop_size=32", "--config.data.val_crop_size=32", "--config.data.synthetic_image_size=32",
    "--config.data.synthetic_num_labeled=8", "--config.data.synthetic_num_unlabeled=24",
    "--config.data.synthetic_num_val=6", "--config.model.base_width=8", "--config.model.decoder_channels=16",
    "--config.model.low_level_channels=8", "--config.model.rep_dim=16", "--config.dgcl.bank_capacity=24",
    "--config.dgcl.max_new_per_class=24", "--config.dgcl.density_min_entries=24", "--config.dgcl.max_pixels=200",
    "--config.dgcl.num_anchors=20", "--config.dgcl.num_positives=10", "--config.dgcl.num_negatives=32",
    "--config.dgcl.ks=(2,4,8)", "--config.num_eval_images_logged=1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main_cmd(workdir, method, extra=()):
  return [sys.executable, "-m", "dgcl_jax.main", f"--config={_ROOT}/configs/synthetic.py:{method}",
          f"--workdir={workdir}", *TINY, *extra]


def _run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=_ROOT)
  assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
  return proc


def _final_params(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta", "data"),
                                  options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  leaves = jax.tree_util.tree_leaves_with_path(restored["state"])
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


@pytest.mark.parametrize("method", ["supervised", "self_training", "dgcl"])
def test_method_runs_end_to_end_and_evaluates(method, tmp_path, env):
  workdir = tmp_path / method
  proc = _run(_main_cmd(workdir, method), env)
  out = proc.stdout + proc.stderr
  assert "final: student mIoU" in out
  assert "step 6/6" in out and "img/s" in out and "ETA" in out
  assert os.path.isdir(workdir / "checkpoints" / "6")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  meta = json.load(open(workdir / "checkpoints" / "6" / "meta" / "metadata"))
  final = meta["final"]
  model = "student" if method == "supervised" else "teacher"
  in_training = final[f"{model}_miou"]
  assert 0.0 <= in_training <= 1.0
  if method != "dgcl":
    return

  # evaluate.py on the final checkpoint reproduces the in-training evaluation.
  out_json = tmp_path / f"{method}.json"
  _run([sys.executable, "scripts/evaluate.py", f"--config={_ROOT}/configs/synthetic.py:{method}",
        f"--workdir={workdir}", "--checkpoint=latest", f"--model={model}", "--mode=center",
        f"--output_json={out_json}", *TINY], env)
  result = json.load(open(out_json))
  assert result["miou"] == pytest.approx(in_training, abs=1e-6)
  assert set(result["per_class_iou"]) == {"background", "disc", "square", "triangle", "stripes"}

  # Rerunning a finished run does not retrain.
  again = _run(_main_cmd(workdir, method), env)
  assert "nothing to train" in again.stdout + again.stderr
  assert "step 1/6" not in again.stdout + again.stderr


def test_kill_9_then_resume_is_bitwise_identical(tmp_path, env):
  extra = ["--config.num_epochs=3", "--config.checkpoint_every_steps=1"]
  reference = tmp_path / "uninterrupted"
  _run(_main_cmd(reference, "dgcl", extra), env)

  workdir = tmp_path / "interrupted"
  proc = subprocess.Popen(_main_cmd(workdir, "dgcl", extra), env=env, cwd=_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  killed = False
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
    steps = [int(n) for n in names if n.isdigit()]
    if steps and max(steps) >= 4:
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.05)
  proc.wait()
  assert killed, "the run finished before it could be killed"
  _run(_main_cmd(workdir, "dgcl", extra), env)

  step_a, params_a = _final_params(reference)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == 9
  assert params_a.keys() == params_b.keys()
  for key in params_a:
    np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


def test_bad_config_gives_one_clear_line(tmp_path, env):
  proc = subprocess.run(_main_cmd(tmp_path / "bad", "dgcl", ["--config.batch_size=3"]), env=env,
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)
  assert proc.returncode != 0
  assert "batch_size=3" in proc.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()
