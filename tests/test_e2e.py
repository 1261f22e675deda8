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


# Three epochs of three steps, a checkpoint every step: the dgcl run is also the uninterrupted
# reference of the kill -9 test.
RUN = ["--config.num_epochs=3", "--config.checkpoint_every_steps=1"]
TOTAL_STEPS = 9


@pytest.fixture(scope="module")
def dgcl_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("e2e") / "dgcl"
  proc = _run(_main_cmd(workdir, "dgcl", RUN), env)
  return workdir, proc.stdout + proc.stderr


def _check_run(workdir, out, method):
  assert "final: student mIoU" in out
  assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in out and "img/s" in out and "ETA" in out
  assert os.path.isdir(workdir / "checkpoints" / str(TOTAL_STEPS))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  meta = json.load(open(workdir / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"))
  model = "student" if method == "supervised" else "teacher"
  in_training = meta["final"][f"{model}_miou"]
  assert 0.0 <= in_training <= 1.0
  return model, in_training


@pytest.mark.parametrize("method", ["supervised", "self_training"])
def test_baseline_methods_run_end_to_end(method, tmp_path, env):
  workdir = tmp_path / method
  proc = _run(_main_cmd(workdir, method, RUN), env)
  _check_run(workdir, proc.stdout + proc.stderr, method)
  if method == "supervised":
    # evaluate.py's default (--model=auto) evaluates the student: a supervised run trains no teacher.
    out_json = tmp_path / "supervised.json"
    proc = _run([sys.executable, "scripts/evaluate.py", f"--config={_ROOT}/configs/synthetic.py:supervised",
                 f"--workdir={workdir}", "--checkpoint=latest", f"--output_json={out_json}", *TINY, *RUN], env)
    result = json.load(open(out_json))
    assert result["model"] == "student"
    in_training = json.load(open(workdir / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"))["final"]
    assert result["miou"] == pytest.approx(in_training["student_miou"], abs=1e-6)


def test_dgcl_runs_end_to_end_evaluates_and_does_not_retrain(dgcl_run, tmp_path, env):
  workdir, out = dgcl_run
  model, in_training = _check_run(workdir, out, "dgcl")
  assert "contrastive" in out

  # evaluate.py on the final checkpoint reproduces the in-training evaluation.
  out_json = tmp_path / "dgcl.json"
  _run([sys.executable, "scripts/evaluate.py", f"--config={_ROOT}/configs/synthetic.py:dgcl",
        f"--workdir={workdir}", "--checkpoint=latest", f"--model={model}", "--mode=center",
        f"--output_json={out_json}", *TINY, *RUN], env)
  result = json.load(open(out_json))
  assert result["miou"] == pytest.approx(in_training, abs=1e-6)
  assert set(result["per_class_iou"]) == {"background", "disc", "square", "triangle", "stripes"}

  # Rerunning a finished run does not retrain.
  again = _run(_main_cmd(workdir, "dgcl", RUN), env)
  assert "nothing to train" in again.stdout + again.stderr
  assert f"step 1/{TOTAL_STEPS}" not in again.stdout + again.stderr


def test_kill_9_then_resume_is_bitwise_identical(dgcl_run, tmp_path, env):
  reference, _ = dgcl_run
  workdir = tmp_path / "interrupted"
  proc = subprocess.Popen(_main_cmd(workdir, "dgcl", RUN), env=env, cwd=_ROOT,
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
  _run(_main_cmd(workdir, "dgcl", RUN), env)

  step_a, params_a = _final_params(reference)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == TOTAL_STEPS
  assert params_a.keys() == params_b.keys()
  for key in params_a:
    np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


def test_bad_config_gives_one_clear_line(tmp_path, env):
  proc = subprocess.run(_main_cmd(tmp_path / "bad", "dgcl", ["--config.batch_size=3"]), env=env,
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)
  assert proc.returncode != 0
  assert "batch_size=3" in proc.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, env):
  workdir = tmp_path / "nan"
  # A learning rate this large overflows the parameters within a few steps.
  proc = subprocess.run(_main_cmd(workdir, "supervised", ["--config.optim.base_lr=1e30", *RUN]), env=env,
                        capture_output=True, text=True, timeout=600, cwd=_ROOT)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "non-finite loss at step" in proc.stderr
  names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
  if any(n.isdigit() for n in names):
    _, params = _final_params(workdir)
    for key, value in params.items():
      if value.dtype.kind == "f":
        assert np.all(np.isfinite(value)), key


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, env):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(_main_cmd(workdir, "supervised", RUN), env=env, cwd=_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
    if any(n.isdigit() and int(n) >= 2 for n in names):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Stopped at step" in err, err[-3000:]
  stopped = int(err.split("Stopped at step ")[1].split()[0])
  assert stopped < TOTAL_STEPS
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  again = _run(_main_cmd(workdir, "supervised", RUN), env)
  assert "final: student mIoU" in again.stdout + again.stderr
  assert (workdir / "checkpoints" / str(TOTAL_STEPS)).is_dir()


def test_predict_writes_masks_and_overlays(dgcl_run, tmp_path, env):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = dgcl_run
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, size in (("a.png", (40, 30)), ("b.jpg", (50, 50))):
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
  out = tmp_path / "out"
  _run([sys.executable, "scripts/predict.py", f"--config={_ROOT}/configs/synthetic.py:dgcl", f"--workdir={workdir}",
        "--checkpoint=latest", f"--input={images}", f"--output={out}", *TINY, *RUN], env)
  for stem, size in (("a", (40, 30)), ("b", (50, 50))):
    mask = Image.open(out / f"{stem}_mask.png")
    assert mask.size == size and mask.mode == "RGB"
    assert Image.open(out / f"{stem}_overlay.png").size == size
