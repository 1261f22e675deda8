"""End to end: `python -m dgcl_jax.main` on tiny synthetic runs, evaluate.py, resumption, and
the command line's failures (one line each; nothing lost; tests/fault_main.py injects disk and data errors).

Each run is a subprocess on the CPU, sharing a persistent compilation cache to save time.
"""

import hashlib
import json
import os
import re
import shutil
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


def _assert_same_final_params(reference, workdir, total_steps):
  """Both runs ended at `total_steps` with bit-identical train states."""
  step_a, params_a = _final_params(reference)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == total_steps
  assert params_a.keys() == params_b.keys()
  for key in params_a:
    np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


def _kill_at_checkpoint(cmd, env, workdir, step):
  """Starts `cmd` and kills it (SIGKILL) once a checkpoint of at least `step` exists -> the process."""
  proc = subprocess.Popen(cmd, env=env, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  killed = False
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
    steps = [int(n) for n in names if n.isdigit()]
    if steps and max(steps) >= step:
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.05)
  proc.wait()
  assert killed, "the run finished before it could be killed"
  return proc


def _write_images(directory, sizes, seed=0):
  """Random RGB images {name: (width, height)} in `directory` (created)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  rng = np.random.default_rng(seed)
  for name, (w, h) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(directory / name)


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
  proc = _run(_main_cmd(workdir, method, RUN), dict(env, JAX_LOG_COMPILES="1"))
  _check_run(workdir, proc.stdout + proc.stderr, method)
  # One program per distinct step (supervised: the supervised step only), evaluation traced once
  # for its three rounds (and the summary images' predictions once); the last two rounds and their
  # epochs compile nothing at all.
  log = proc.stderr
  programs = 1 if method == "supervised" else 2
  for name, count in (("_train_step", programs), ("_eval_step", 1), ("_predict", 1)):
    assert log.count(f"Finished tracing {name} for jit") == log.count(f"Compiling jit({name})") == count, name
  assert ("first semi-supervised step" in log) == (method != "supervised")
  assert "Compiling" not in log[log.index(f"step 6/{TOTAL_STEPS}"):]
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


def _write_custom_dataset(root, ignore_label):
  """A custom-layout dataset (PNG images and masks, 4 labeled, 8 unlabeled, 2 val): 8-px blocks of
  classes 0-4 and of `ignore_label`, the same pixels whatever its value. -> its --config.data flags."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(root / "img")
  os.makedirs(root / "mask")
  rng = np.random.default_rng(0)
  ids = [f"im{i:02d}" for i in range(14)]
  for name in ids:
    h, w = (int(v) for v in rng.integers(36, 49, 2))
    blocks = np.kron(rng.integers(0, 6, ((h + 7) // 8, (w + 7) // 8)), np.ones((8, 8), np.int64))[:h, :w]
    value = np.where(blocks == 5, 250, blocks * 45)
    image = np.stack([value, 255 - value, (value * 3) % 256], -1) + rng.integers(-20, 21, (h, w, 3))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "img" / f"{name}.png")
    Image.fromarray(np.where(blocks == 5, ignore_label, blocks).astype(np.uint8), mode="L").save(
        root / "mask" / f"{name}.png")
  for split, names in (("labeled", ids[:4]), ("unlabeled", ids[4:12]), ("val", ids[12:])):
    (root / f"{split}.txt").write_text("\n".join(names))
  return ["--config.data.name=custom", f"--config.data.root={root}", "--config.data.image_dir=img",
          "--config.data.mask_dir=mask", "--config.data.image_ext=.png", "--config.data.mask_ext=.png",
          *(f"--config.data.{split}_list={root / split}.txt" for split in ("labeled", "unlabeled", "val")),
          f"--config.data.ignore_label={ignore_label}", "--config.model.pretrained=none"]


def test_custom_dataset_with_ignore_label_254_trains_exactly_as_with_255(dgcl_run, tmp_path, env):
  """Masks using 254 with --config.data.ignore_label=254: the same run, bit for bit, as with 255 (the
  losses, pseudo and contrastive labels, memory bank and evaluation all take the configured value).
  dgcl_run first: the 255 run loads its programs from the module's compilation cache."""
  finals, params, logs = {}, {}, {}
  for ignore_label in (255, 254):
    workdir = tmp_path / f"run{ignore_label}"
    flags = _write_custom_dataset(tmp_path / f"data{ignore_label}", ignore_label)
    proc = _run(_main_cmd(workdir, "dgcl", [*RUN, *flags]), env)
    logs[ignore_label] = proc.stderr
    step, params[ignore_label] = _final_params(workdir)
    assert step == TOTAL_STEPS
    finals[ignore_label] = json.load(open(workdir / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"))["final"]
  contrastive = [float(v) for v in re.findall(r"contrastive ([0-9.]+)", logs[254])]
  assert len(contrastive) == TOTAL_STEPS and max(contrastive) > 0   # the memory bank filled, the loss ran
  assert finals[254] == finals[255]
  assert params[254].keys() == params[255].keys()
  for key in params[255]:
    np.testing.assert_array_equal(params[254][key], params[255][key], err_msg=key)


def test_kill_9_then_resume_is_bitwise_identical(dgcl_run, tmp_path, env):
  reference, _ = dgcl_run
  workdir = tmp_path / "interrupted"
  proc = _kill_at_checkpoint(_main_cmd(workdir, "dgcl", RUN), env, workdir, 4)
  # The killed run's lock record is still there, naming it; its lock died with it: the rerun starts.
  assert json.loads((workdir / ".lock").read_text())["pid"] == proc.pid
  _run(_main_cmd(workdir, "dgcl", RUN), env)
  assert (workdir / ".lock").read_text() == ""

  _assert_same_final_params(reference, workdir, TOTAL_STEPS)


def test_a_second_run_on_a_live_workdir_is_refused_and_the_first_is_unaffected(dgcl_run, tmp_path, env):
  """The first run is paused (SIGSTOP, still alive and holding its lock) mid-training while the
  second one tries: nothing in the workdir may change; resumed, it ends as the run alone did."""
  reference, _ = dgcl_run
  workdir = tmp_path / "live"
  first = subprocess.Popen(_main_cmd(workdir, "dgcl", RUN), env=env, cwd=_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
      names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
      if any(n.isdigit() for n in names):
        first.send_signal(signal.SIGSTOP)
        break
      time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    record = json.loads((workdir / ".lock").read_text())
    assert record["pid"] == first.pid
    before = {os.path.join(base, name): os.stat(os.path.join(base, name)).st_mtime_ns
              for base, dirs, files in os.walk(workdir) for name in dirs + files}
    second = subprocess.run(_main_cmd(workdir, "dgcl", RUN), env=env, capture_output=True, text=True, timeout=30,
                            cwd=_ROOT)
    assert second.returncode == 1
    line = _one_error_line(second)
    assert f"--workdir={workdir} is in use by another training run" in line
    assert f"pid {first.pid} on host {record['host']}, started {record['started']}" in line
    after = {os.path.join(base, name): os.stat(os.path.join(base, name)).st_mtime_ns
             for base, dirs, files in os.walk(workdir) for name in dirs + files}
    assert after == before
  finally:
    first.send_signal(signal.SIGCONT)
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out[-5000:]
  assert len(os.listdir(workdir / "tensorboard")) == 1
  _assert_same_final_params(reference, workdir, TOTAL_STEPS)
  final = lambda w: json.load(open(w / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"))["final"]
  assert final(workdir) == final(reference)


def _one_error_line(proc):
  """The single `error: ...` line of a failed run; no traceback, no other error output."""
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out[-5000:]
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out[-5000:]
  # Nothing else at error level (absl's E lines), no library cascade after it.
  assert not [line for line in out.splitlines() if line.startswith("E1")], out[-5000:]
  assert "Event loop is closed" not in out and "Exception ignored" not in out
  return errors[0]


def test_bad_config_gives_one_clear_line(tmp_path, env):
  proc = subprocess.run(_main_cmd(tmp_path / "bad", "dgcl", ["--config.batch_size=3"]), env=env,
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)
  assert proc.returncode != 0
  assert "batch_size=3" in _one_error_line(proc)
  assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("flag,expected", [
    ("--config.batchsize=4", "unknown config field --config.batchsize: did you mean --config.batch_size?"),
    ("--config.model.deph=3", "did you mean --config.model.depth?"),
    ("--config.batch_size=abc", "--config.batch_size=abc"),
])
def test_flag_errors_give_one_line(flag, expected, tmp_path, env):
  proc = subprocess.run(_main_cmd(tmp_path / "w", "dgcl", [flag]), env=env, capture_output=True, text=True,
                        timeout=120, cwd=_ROOT)
  assert proc.returncode == 2
  assert expected in _one_error_line(proc)
  assert not (tmp_path / "w").exists()


def test_unusable_workdir_gives_one_line(tmp_path, env):
  (tmp_path / "a_file").write_text("x")
  proc = subprocess.run(_main_cmd(tmp_path / "a_file" / "run", "dgcl"), env=env, capture_output=True, text=True,
                        timeout=120, cwd=_ROOT)
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert "--workdir=" in line and "Not a directory" in line


def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, env):
  workdir = tmp_path / "nan"
  # A learning rate this large overflows the parameters within a few steps.
  proc = subprocess.run(_main_cmd(workdir, "supervised", ["--config.optim.base_lr=1e30", *RUN]), env=env,
                        capture_output=True, text=True, timeout=600, cwd=_ROOT)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_error_line(proc)
  assert "non-finite loss at step" in line
  names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
  # The message says whether a checkpoint exists to resume from.
  if any(n.isdigit() for n in names):
    assert "the last good checkpoint (step" in line
  else:
    assert "no checkpoint was saved" in line
  if any(n.isdigit() for n in names):
    _, params = _final_params(workdir)
    for key, value in params.items():
      if value.dtype.kind == "f":
        assert np.all(np.isfinite(value)), key


def test_ctrl_c_and_sigterm_save_and_exit_cleanly_then_resume(tmp_path, env):
  workdir = tmp_path / "term"
  stopped = 1
  for signum in (signal.SIGINT, signal.SIGTERM):  # the second one on the resumed run
    proc = subprocess.Popen(_main_cmd(workdir, "supervised", RUN), env=env, cwd=_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
      if any(n.isdigit() and int(n) > stopped for n in names):
        proc.send_signal(signum)
        break
      time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Stopped at step" in err and signal.Signals(signum).name in err, err[-3000:]
    assert "Traceback" not in out + err
    previous, stopped = stopped, int(err.split("Stopped at step ")[1].split()[0])
    assert previous < stopped < TOTAL_STEPS
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
  again = _run(_main_cmd(workdir, "supervised", RUN), env)
  assert f"Resumed from step {stopped}" in again.stderr
  assert "final: student mIoU" in again.stdout + again.stderr
  assert (workdir / "checkpoints" / str(TOTAL_STEPS)).is_dir()


def test_predict_writes_masks_and_overlays(dgcl_run, tmp_path, env):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = dgcl_run
  images = tmp_path / "images"
  _write_images(images, {"a.png": (40, 30), "b.jpg": (50, 50)})
  out = tmp_path / "out"
  _run([sys.executable, "scripts/predict.py", f"--config={_ROOT}/configs/synthetic.py:dgcl", f"--workdir={workdir}",
        "--checkpoint=latest", f"--input={images}", f"--output={out}", *TINY, *RUN], env)
  for stem, size in (("a", (40, 30)), ("b", (50, 50))):
    mask = Image.open(out / f"{stem}_mask.png")
    assert mask.size == size and mask.mode == "RGB"
    assert Image.open(out / f"{stem}_overlay.png").size == size


# ----------------------------------------------------------------------------- run identity, failures


def _tree_digest(workdir):
  """{relative path: sha256} of every file under checkpoints/ and config.json."""
  digest = {}
  for base, _, files in os.walk(workdir / "checkpoints"):
    for name in files:
      path = os.path.join(base, name)
      digest[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  digest["config.json"] = hashlib.sha256((workdir / "config.json").read_bytes()).hexdigest()
  return digest


def _run_fails(cmd, env, status=1, cwd=_ROOT):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
  assert proc.returncode == status, f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return _one_error_line(proc)


def test_changed_config_is_refused_and_nothing_is_touched(dgcl_run, tmp_path, env):
  finished, _ = dgcl_run
  before = _tree_digest(finished)
  # A finished run: a change is refused, --allow_config_change too (it would train over the result).
  line = _run_fails(_main_cmd(finished, "dgcl", [*RUN, "--config.seed=1", "--config.loss.unsup_weight=0.3"]), env)
  assert "finished at step 9" in line and "seed 0 -> 1" in line and "loss.unsup_weight 0.5 -> 0.3" in line
  line = _run_fails(_main_cmd(finished, "dgcl", [*RUN, "--config.batch_size=8", "--allow_config_change"]), env)
  assert "batch_size 4 -> 8" in line and "new --workdir" in line
  # Logging and checkpoint frequencies may change freely: nothing to train.
  again = _run(_main_cmd(finished, "dgcl", [*RUN, "--config.log_every_steps=5", "--config.checkpoint_every_steps=7"]),
               env)
  assert "nothing to train" in again.stdout + again.stderr
  assert _tree_digest(finished) == before

  # An unfinished run (the finished one without its last checkpoint).
  workdir = tmp_path / "unfinished"
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(TOTAL_STEPS))
  before = _tree_digest(workdir)
  line = _run_fails(_main_cmd(workdir, "dgcl", [*RUN, "--config.model.num_classes=6"]),
                    env)
  assert "started with another config" in line and "model.num_classes 5 -> 6" in line
  assert "--allow_config_change" in line
  assert _tree_digest(workdir) == before
  # The user who means it: the run resumes with the new value, the old config is kept beside it.
  # (A new seed needs no new compilation.)
  proc = _run(_main_cmd(workdir, "dgcl", [*RUN, "--config.seed=1", "--allow_config_change"]), env)
  assert "Resumed from step 8" in proc.stderr and "final: student mIoU" in proc.stdout
  assert json.load(open(workdir / "config.json"))["seed"] == 1
  assert json.load(open(workdir / "config.before_step_8.json"))["seed"] == 0


def test_disk_full_during_a_background_save_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, env):
  workdir = tmp_path / "full"
  cmd = [sys.executable, "tests/fault_main.py", "disk_full", "3", *_main_cmd(workdir, "supervised", RUN)[3:]]
  line = _run_fails(cmd, env)
  assert "no space left on the device" in line and "step 2, is kept" in line
  step, params = _final_params(workdir)
  assert step == 2 and params


def test_data_errors_mid_run_save_first_then_resume(tmp_path, env):
  workdir = tmp_path / "data"
  run = [*RUN, "--config.checkpoint_every_steps=100"]   # saves only at the evaluations (steps 3, 6, 9)
  flags = _main_cmd(workdir, "supervised", run)[3:]
  # A validation file fails at the first evaluation: the epoch's state is saved, its evaluation pending.
  line = _run_fails([sys.executable, "tests/fault_main.py", "val_error", "3", *flags], env)
  assert "val.png" in line and "during the evaluation at step 3" in line and "after step 3 was saved" in line
  # The rerun evaluates first; then a training file fails at step 5: step 4 is saved.
  line = _run_fails([sys.executable, "tests/fault_main.py", "data_error", "4", *flags], env)
  assert "broken.jpg" in line and "at step 5" in line and "the state after step 4 was saved" in line
  assert (workdir / "checkpoints" / "4").is_dir()
  proc = _run(_main_cmd(workdir, "supervised", run), env)
  assert "Resumed from step 4" in proc.stderr and "final: student mIoU" in proc.stdout
  meta = json.load(open(workdir / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"))
  assert [r["step"] for r in meta["history"]] == [3, 6, 9]


def test_second_ctrl_c_exits_at_once(env):
  code = ("import os, signal, time; from dgcl_jax import runtime; p = runtime.Preempted(); "
          "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); assert p.requested; "
          "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not reached')")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=_ROOT)
  assert proc.returncode == 130
  assert "not reached" not in proc.stdout and "interrupted again" in proc.stderr


def _write_tiny_pascal(root, ids):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (root / "JPEGImages").mkdir(parents=True)
  (root / "SegmentationClassAug").mkdir()
  for name in ids:
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    Image.fromarray(rng.integers(0, 4, (40, 40), dtype=np.uint8), mode="L").save(
        root / "SegmentationClassAug" / f"{name}.png")


def test_pascal_needs_a_pretrained_backbone_or_none(tmp_path, env):
  ids = [f"im{i}" for i in range(6)]
  _write_tiny_pascal(tmp_path / "voc", ids)
  lists = {}
  for name, part in (("labeled", ids[:2]), ("unlabeled", ids[2:4]), ("val", ids[4:])):
    (tmp_path / f"{name}.txt").write_text("\n".join(part) + "\n")
    lists[name] = str(tmp_path / f"{name}.txt")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "dgcl_jax.main", f"--config={_ROOT}/configs/pascal.py", f"--workdir={workdir}",
         f"--config.data.root={tmp_path / 'voc'}"]
  # cwd=tmp_path: the default pretrained/resnet101 is relative to the working directory.
  line = _run_fails(cmd, env, cwd=tmp_path)
  assert "config.model.pretrained='pretrained/resnet101'" in line
  assert "python scripts/convert_torch_checkpoint.py --input resnet101.pth --output pretrained/resnet101" in line
  assert "--config.model.pretrained=none" in line
  assert not (workdir / "checkpoints").exists()

  tiny = ["--config.model.pretrained=none", f"--config.data.labeled_list={lists['labeled']}",
          f"--config.data.unlabeled_list={lists['unlabeled']}", f"--config.data.val_list={lists['val']}",
          "--config.model.depth=14", "--config.model.base_width=8", "--config.model.decoder_channels=16",
          "--config.model.low_level_channels=8", "--config.model.rep_dim=16", "--config.model.dtype=float32",
          "--config.data.crop_size=32", "--config.data.val_crop_size=32", "--config.data.num_workers=0",
          "--config.batch_size=2", "--config.num_slices=2", "--config.num_epochs=1", "--config.steps_per_epoch=1",
          "--config.num_eval_images_logged=0"]
  proc = subprocess.run(cmd + tiny, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "final: student mIoU" in proc.stdout
  assert "backbone starts from random weights" in proc.stderr
