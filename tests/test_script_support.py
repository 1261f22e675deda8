"""scripts/evaluate.py and predict.py (dgcl_jax/script_support.py): which network they load, the run's
own config by default, one line for every setup error, damaged checkpoints."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from dgcl_jax import script_support

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(method="dgcl", sup_only_epochs=2):
  return types.SimpleNamespace(method=method, sup_only_epochs=sup_only_epochs)


def _meta(step, student, teacher):
  return {"history": [{"step": step, "student_miou": student, "teacher_miou": teacher}]}


def test_auto_picks_the_network_that_scored_higher_at_that_step():
  assert script_support._resolve_model(_config(), 10, 30, _meta(30, 0.50, 0.55), "auto") == "teacher"
  assert script_support._resolve_model(_config(), 10, 30, _meta(30, 0.56, 0.55), "auto") == "student"


def test_auto_falls_back_to_teacher_after_the_supervised_epochs_without_a_record():
  assert script_support._resolve_model(_config(), 10, 25, _meta(20, 0.5, None), "auto") == "teacher"
  assert script_support._resolve_model(_config(), lambda: 10, 25, {}, "auto") == "teacher"


@pytest.mark.parametrize("config,step", [(_config("supervised"), 100), (_config("dgcl", 2), 20)])
def test_untrained_teacher_auto_is_student_and_teacher_is_an_error(config, step):
  assert script_support._resolve_model(config, 10, step, _meta(step, 0.4, None), "auto") == "student"
  with pytest.raises(ValueError, match="--model=teacher: the checkpoint's teacher is untrained"):
    script_support._resolve_model(config, 10, step, {}, "teacher")
  # The config's default protocol (evaluation.model='teacher') falls back to the student instead.
  assert script_support._resolve_model(config, 10, step, {}, "teacher", explicit=False) == "student"


def test_the_runs_own_evaluation_says_whether_the_teacher_is_trained():
  # A record at the step decides, whatever the config given says.
  assert script_support._resolve_model(_config("supervised"), 10, 30, _meta(30, 0.5, 0.6), "auto") == "teacher"


def test_explicit_choice_is_kept_when_the_teacher_is_trained():
  assert script_support._resolve_model(_config(), 10, 21, _meta(21, 0.9, 0.1), "teacher") == "teacher"
  assert script_support._resolve_model(_config(), 10, 21, _meta(21, 0.1, 0.9), "student") == "student"


def test_run_config_json_loads_with_tuples_and_evaluation_defaults(tmp_path):
  from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top
  config = config_base.base_config()
  config.data.name = "cityscapes"
  stored = json.loads(config.to_json_best_effort())
  del stored["evaluation"]  # a run from before the field existed
  (tmp_path / "config.json").write_text(json.dumps(stored))
  loaded = script_support.load_run_config(str(tmp_path))
  assert loaded.model.aspp_dilations == (6, 12, 18) and loaded.dgcl.ks == (8, 16, 32)
  assert (loaded.evaluation.mode, loaded.evaluation.model) == ("sliding", "teacher")
  with pytest.raises(script_support.SetupError, match="config.json not found"):
    script_support.load_run_config(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- the scripts on finished runs


TINY = [
    "--config.batch_size=4", "--config.num_slices=2", "--config.num_epochs=2", "--config.sup_only_epochs=1",
    "--config.steps_per_epoch=2", "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
    "--config.data.crop_size=32", "--config.data.val_crop_size=32", "--config.data.synthetic_image_size=32",
    "--config.data.synthetic_num_labeled=8", "--config.data.synthetic_num_unlabeled=16",
    "--config.data.synthetic_num_val=6", "--config.model.base_width=8", "--config.model.decoder_channels=16",
    "--config.model.low_level_channels=8", "--config.model.rep_dim=16", "--config.dgcl.bank_capacity=24",
    "--config.dgcl.max_new_per_class=24", "--config.dgcl.density_min_entries=24", "--config.dgcl.max_pixels=200",
    "--config.dgcl.num_anchors=20", "--config.dgcl.num_positives=10", "--config.dgcl.num_negatives=32",
    "--config.dgcl.ks=(2,4,8)", "--config.num_eval_images_logged=1",
]
FINAL = 4
# The dgcl run trains a bfloat16 student: evaluate.py scores it in float32, as the training loop.
EXTRA = {"supervised": [], "self_training": [], "dgcl": ["--config.model.dtype=bfloat16"]}


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  """{method: workdir} of finished tiny synthetic runs."""
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for method, extra in EXTRA.items():
    workdir = root / method
    cmd = [sys.executable, "-m", "dgcl_jax.main", f"--config={_ROOT}/configs/synthetic.py:{method}",
           f"--workdir={workdir}", *TINY, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out[method] = workdir
  return out


def _script(name, args, env):
  return subprocess.run([sys.executable, f"scripts/{name}.py", *args], env=env, capture_output=True, text=True,
                        timeout=300, cwd=_ROOT)


def _one_error_line(proc, status=1):
  """The process failed with `status` and said why in exactly one line, no traceback."""
  assert proc.returncode == status, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


def _record(workdir, step):
  meta = json.load(open(workdir / "checkpoints" / str(step) / "meta" / "metadata"))
  return next(r for r in meta["history"] if r["step"] == step)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXTRA))
def test_evaluate_with_workdir_alone_reproduces_the_in_training_evaluation(method, runs, env, tmp_path):
  workdir = runs[method]
  out_json = tmp_path / "result.json"
  proc = _script("evaluate", [f"--workdir={workdir}", "--checkpoint=latest", f"--output_json={out_json}"], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not [l for l in proc.stderr.splitlines() if "orbax" in l or "Traceback" in l], proc.stderr[-3000:]
  result = json.load(open(out_json))
  record = _record(workdir, FINAL)
  assert result["step"] == FINAL and result["checkpoint"] == "latest"
  if method == "supervised":
    assert result["model"] == "student"
  assert result["protocol"] == "centre crops of 32, float32" and result["mode"] == "center"
  assert f"mIoU: {100 * result['miou']:.2f} ({result['model']} of the latest checkpoint (step {FINAL}); " \
         f"centre crops of 32, float32)" in proc.stdout
  assert result["miou"] == pytest.approx(record[f"{result['model']}_miou"], abs=1e-9)
  if method == "dgcl":
    # The bfloat16 student, scored in float32 as the training loop does.
    proc = _script("evaluate", [f"--workdir={workdir}", "--checkpoint=latest", "--model=student",
                                f"--output_json={out_json}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out_json))["miou"] == pytest.approx(record["student_miou"], abs=1e-9)


@pytest.mark.slow
def test_a_config_with_another_method_still_evaluates(runs, env, tmp_path):
  # The supervised config has no memory bank: only the network is read from the dgcl run.
  out_json = tmp_path / "result.json"
  proc = _script("evaluate", [f"--workdir={runs['dgcl']}", f"--config={_ROOT}/configs/synthetic.py:supervised",
                              "--checkpoint=latest", "--model=student", f"--output_json={out_json}", *TINY], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(out_json))["miou"] == pytest.approx(_record(runs["dgcl"], FINAL)["student_miou"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate", "predict"])
@pytest.mark.parametrize("args,message", [
    (["--config.model.num_classes=7"],
     r"params.decoder.cls_out.bias has shape \(5,\), the config gives \(7,\): the config does not match the run"),
    ([f"--config={_ROOT}/configs/synthetic.py:dgcl"], r"has shape \(8,\), the config gives \(16,\)"),
])
def test_a_config_whose_network_differs_is_one_line(script, args, message, runs, env, tmp_path):
  extra = []
  if script == "predict":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    extra = [f"--input={tmp_path}", f"--output={tmp_path / 'out'}"]
  line = _one_error_line(_script(script, [f"--workdir={runs['dgcl']}", *args, *extra], env))
  assert re.search(message, line), line


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--config.batchsize=4"], "--config.batchsize: unknown config field 'batchsize' (Did you mean \"batch_size\""),
    (["--config.model.num_classes=abc"], "--config.model.num_classes=abc"),
    (["--config=configs/nowhere.py"], "--config=configs/nowhere.py cannot be loaded"),
    (["--checkpoint=3x"], "--checkpoint='3x': expected best, latest or a step number"),
])
def test_override_and_flag_errors_are_one_line(args, message, runs, env):
  proc = _script("evaluate", [f"--workdir={runs['supervised']}", *args], env)
  line = _one_error_line(proc, proc.returncode)
  assert proc.returncode in (1, 2)
  assert message in line, line


@pytest.mark.slow
def test_damaged_checkpoints(runs, env, tmp_path):
  from test_checkpointing import damage  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(runs["self_training"], workdir)
  before = sorted(os.listdir(workdir / "checkpoints"))
  # meta/metadata, which every restore reads (a truncated array file stops only the restores that read it).
  damage(str(workdir / "checkpoints" / str(FINAL)), "meta")
  out_json = tmp_path / "result.json"
  # latest: one warning naming the folder, then the previous step.
  proc = _script("evaluate", [f"--workdir={workdir}", "--checkpoint=latest", "--model=student",
                              f"--output_json={out_json}"], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(warnings) == 1 and f"checkpoints/{FINAL} cannot be restored" in warnings[0], proc.stderr[-3000:]
  assert json.load(open(out_json))["step"] == FINAL - 1
  # The step by name: one line, exit status 1.
  line = _one_error_line(_script("evaluate", [f"--workdir={workdir}", f"--checkpoint={FINAL}", "--model=student"],
                                 env))
  assert f"checkpoints/{FINAL} cannot be restored: " in line
  # A reader never moves anything.
  assert sorted(os.listdir(workdir / "checkpoints")) == before
