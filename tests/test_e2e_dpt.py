"""End to end on the DINOv2 ViT + DPT network (configs/synthetic.py:dpt, shrunk to 42-pixel crops: 3 x 3
patches): `python -m dgcl_jax.main` for each method, resumption after kill -9, evaluate.py and predict.py
on the run, and the Pascal DINOv2 recipe's pretrained-backbone check. Subprocesses on the CPU sharing one
compilation cache, as tests/test_e2e.py does for the DeepLabV3+ network."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_e2e import (_assert_same_final_params, _check_run, _final_params, _kill_at_checkpoint, _one_error_line,
                            _run, _write_images)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow   # about 3 minutes of subprocesses on 2 cores (run by default; -m "not slow" skips)

TINY_DPT = [
    "--config.batch_size=4", "--config.num_slices=2", "--config.sup_only_epochs=1", "--config.steps_per_epoch=3",
    "--config.log_every_steps=1", "--config.data.crop_size=42", "--config.data.val_crop_size=42",
    "--config.data.synthetic_image_size=42", "--config.data.synthetic_num_labeled=8",
    "--config.data.synthetic_num_unlabeled=24", "--config.data.synthetic_num_val=6", "--config.model.rep_dim=16",
    "--config.dgcl.bank_capacity=24", "--config.dgcl.max_new_per_class=24", "--config.dgcl.density_min_entries=24",
    "--config.dgcl.max_pixels=200", "--config.dgcl.num_anchors=20", "--config.dgcl.num_positives=10",
    "--config.dgcl.num_negatives=32", "--config.dgcl.ks=(2,4,8)", "--config.num_eval_images_logged=1",
]
# Three epochs of three steps (the first supervised only), a checkpoint every step.
RUN = ["--config.num_epochs=3", "--config.checkpoint_every_steps=1"]
TOTAL_STEPS = 9


def _main_cmd(workdir, method, extra=()):
  return [sys.executable, "-m", "dgcl_jax.main", f"--config={_ROOT}/configs/synthetic.py:dpt,{method}",
          f"--workdir={workdir}", *TINY_DPT, *RUN, *extra]


@pytest.fixture(scope="module")
def dgcl_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("e2e_dpt") / "dgcl"
  proc = _run(_main_cmd(workdir, "dgcl"), env)
  return workdir, proc.stdout + proc.stderr


def test_dgcl_on_dpt_trains_and_evaluate_py_reproduces_it(dgcl_run, tmp_path, env):
  workdir, out = dgcl_run
  model, in_training = _check_run(workdir, out, "dgcl")
  stored = json.load(open(workdir / "config.json"))
  assert stored["model"]["arch"] == "dpt" and stored["optim"]["name"] == "adamw"
  # The contrastive term ran: the bank filled and the loss was non-zero in some step.
  contrastive = [float(line.split("contrastive ")[1].split()[0]) for line in out.splitlines()
                 if "contrastive " in line and "| lr" in line]
  assert contrastive and max(contrastive) > 0.0, out[-3000:]
  # The bank's entries are as wide as the DPT's fts (tiny: 16) and rep (16).
  _, params = _final_params(workdir)
  bank = {k: v for k, v in params.items() if "memory_bank" in k}
  assert bank["['memory_bank']['fts']"].shape == (5, 24, 16) and bank["['memory_bank']['rep']"].shape == (5, 24, 16)
  assert params["['params']['backbone']['pos_embed']"].shape == (1, 1370, 48)
  assert "['opt_state']['inner_states']['head']['inner_state'][0]['nu']['head']['rep_fc1']['kernel']" in params  # AdamW

  out_json = tmp_path / "dgcl.json"
  _run([sys.executable, "scripts/evaluate.py", f"--workdir={workdir}", "--checkpoint=latest", f"--model={model}",
        f"--output_json={out_json}"], env)
  result = json.load(open(out_json))
  assert result["miou"] == pytest.approx(in_training, abs=1e-6)
  assert result["crop"] == 42 and result["model"] == model


@pytest.mark.parametrize("method", ["supervised", "self_training"])
def test_baseline_methods_on_dpt_run_end_to_end(method, tmp_path, env):
  workdir = tmp_path / method
  proc = _run(_main_cmd(workdir, method), env)
  _check_run(workdir, proc.stdout + proc.stderr, method)


def test_dpt_kill_9_then_resume_is_bitwise_identical(dgcl_run, tmp_path, env):
  reference, _ = dgcl_run
  workdir = tmp_path / "interrupted"
  # killed inside the semi-supervised epochs, the contrastive term on
  _kill_at_checkpoint(_main_cmd(workdir, "dgcl"), env, workdir, 5)
  _run(_main_cmd(workdir, "dgcl"), env)
  _assert_same_final_params(reference, workdir, TOTAL_STEPS)


@pytest.mark.parametrize("mode", ["sliding", "center"])
def test_predict_on_a_dpt_run_any_image_size(mode, dgcl_run, tmp_path, env):
  """Images whose sides are not multiples of 14: sliding windows of the 42 crop, or (center) the whole
  image resized to whole patches and the logits resized back (UniMatch V2's rule)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = dgcl_run
  images = tmp_path / "images"
  _write_images(images, {"a.png": (40, 30), "b.jpg": (61, 50)})
  out = tmp_path / "out"
  _run([sys.executable, "scripts/predict.py", f"--workdir={workdir}", "--checkpoint=latest", f"--mode={mode}",
        f"--input={images}", f"--output={out}"], env)
  for stem, size in (("a", (40, 30)), ("b", (61, 50))):
    assert Image.open(out / f"{stem}_mask.png").size == size
    assert Image.open(out / f"{stem}_overlay.png").size == size


def test_pascal_dinov2_needs_its_pretrained_backbone_or_none(tmp_path, env):
  cmd = [sys.executable, "-m", "dgcl_jax.main", f"--config={_ROOT}/configs/pascal.py:732,dinov2_small",
         f"--workdir={tmp_path / 'run'}", f"--config.data.root={tmp_path / 'voc'}"]
  # cwd=tmp_path: the default pretrained/dinov2_small is relative to the working directory.
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_error_line(proc)
  assert "config.model.pretrained='pretrained/dinov2_small': no such directory" in line
  assert ("python scripts/convert_torch_checkpoint.py --input dinov2_vits14_pretrain.pth "
          "--output pretrained/dinov2_small") in line
  assert "--config.model.pretrained=none" in line
  assert not (tmp_path / "run" / "checkpoints").exists()
