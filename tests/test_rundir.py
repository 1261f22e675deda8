"""dgcl_jax/rundir.py: run identity, environment failures, the workdir check, the pretrained backbone;
and runtime.Preempted (the signals the loop saves on)."""

import errno
import json
import os
import signal

import pytest

from dgcl_jax import config_base
from dgcl_jax import errors
from dgcl_jax import rundir
from dgcl_jax import runtime
from tests.tiny import tiny_config


def _stored(config):
  return config_base.as_json_dict(config)


def test_config_changes_lists_identity_fields_only(tmp_path):
  old = tiny_config()
  new = tiny_config()
  new.seed = 3
  new.dgcl.ks = (2, 4)
  new.log_every_steps, new.checkpoint_every_steps, new.keep_checkpoints = 7, 11, 5
  new.data.num_workers, new.data.root, new.model.pretrained = 3, "/elsewhere", "none"
  changes = config_base.config_changes(_stored(old), _stored(new))
  assert changes == [("seed", 0, 3), ("dgcl.ks", [2, 4, 8], [2, 4])]
  assert config_base.describe_changes(changes) == "seed 0 -> 3, dgcl.ks [2, 4, 8] -> [2, 4]"


def test_config_changes_compares_split_lists_by_content_and_new_fields_by_default(tmp_path):
  (tmp_path / "a.txt").write_text("x\ny\n")
  (tmp_path / "b.txt").write_text("x\r\ny")      # the same ids under another path
  (tmp_path / "c.txt").write_text("x\nz\n")
  old, new = tiny_config(), tiny_config()
  old.data.labeled_list, new.data.labeled_list = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
  stored = _stored(old)
  del stored["loss"]["cutmix_prob"]              # a field added to the code after the run started
  assert config_base.config_changes(stored, _stored(new)) == []
  new.data.labeled_list = str(tmp_path / "c.txt")
  new.loss.cutmix_prob = 0.25
  names = [c[0] for c in config_base.config_changes(stored, _stored(new))]
  assert names == ["data.labeled_list", "loss.cutmix_prob"]


def _fake_run(workdir, config, steps, final_step=None):
  """A workdir as a run leaves it, as far as check_run_identity reads it."""
  for step in steps:
    os.makedirs(workdir / "checkpoints" / str(step) / "meta")
    meta = {"best_miou": 0.5, "history": []}
    if final_step == step:
      meta["final"] = {"step": step}
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text(json.dumps(meta))
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def test_run_identity_new_run_resume_refuse_allow(tmp_path):
  config = tiny_config()
  config.steps_per_epoch = 3
  assert rundir.check_run_identity(config, str(tmp_path / "new")) == (False, [])
  workdir = tmp_path / "run"
  _fake_run(workdir, config, [2, 4])
  assert rundir.check_run_identity(config, str(workdir)) == (True, [])
  changed = tiny_config()
  changed.steps_per_epoch = 3
  changed.batch_size = 8
  with pytest.raises(config_base.ConfigChangeError, match=r"started with another config: batch_size 4 -> 8;"):
    rundir.check_run_identity(changed, str(workdir))
  assert rundir.check_run_identity(changed, str(workdir), allow_config_change=True) == (
      True, [("batch_size", 4, 8)])


def test_run_identity_never_trains_over_a_finished_run(tmp_path):
  config = tiny_config()
  config.steps_per_epoch = 3          # 2 epochs: 6 steps
  workdir = tmp_path / "run"
  _fake_run(workdir, config, [5, 6], final_step=6)
  assert rundir.check_run_identity(config, str(workdir)) == (True, [])
  longer = tiny_config()
  longer.steps_per_epoch = 3
  longer.num_epochs = 4
  for allow in (False, True):
    with pytest.raises(config_base.ConfigChangeError, match="finished at step 6.*num_epochs 2 -> 4"):
      rundir.check_run_identity(longer, str(workdir), allow_config_change=allow)
  # A run from before config.json was kept: the finished schedule is still protected.
  os.remove(workdir / "config.json")
  with pytest.raises(config_base.ConfigChangeError, match="12 steps instead of 6"):
    rundir.check_run_identity(longer, str(workdir), allow_config_change=True)
  assert rundir.check_run_identity(config, str(workdir)) == (True, [])


@pytest.mark.parametrize("text", ['{"batch_size": 4, "mod', "", "[]"])
def test_a_damaged_config_json_is_one_line_and_allow_config_change_resumes(tmp_path, text):
  config = tiny_config()
  config.steps_per_epoch = 3
  workdir = tmp_path / "run"
  _fake_run(workdir, config, [2, 4])
  (workdir / "config.json").write_text(text)
  with pytest.raises(config_base.ConfigChangeError) as info:
    rundir.check_run_identity(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"{workdir / 'config.json'}: cannot read the run's config (")
  assert "--allow_config_change" in message
  assert rundir.check_run_identity(config, str(workdir), allow_config_change=True) == (
      True, [("config.json", "unreadable", "rewritten")])
  assert (workdir / "config.json").read_text() == text   # nothing written by the check


def test_an_unwritable_config_json_is_one_line(tmp_path):
  with pytest.raises(errors.RunEnvironmentError, match=r"^cannot write .*/gone/config.json: No such file"):
    rundir.record_run_config(tiny_config(), str(tmp_path / "gone"), new_run=True, changes=[], step=0)


def test_record_run_config_keeps_the_previous_one(tmp_path):
  config = tiny_config()
  rundir.record_run_config(config, str(tmp_path), new_run=True, changes=[], step=0)
  assert json.load(open(tmp_path / "config.json"))["batch_size"] == 4
  config.batch_size = 8
  rundir.record_run_config(config, str(tmp_path), new_run=False, changes=[], step=5)
  assert json.load(open(tmp_path / "config.json"))["batch_size"] == 4
  rundir.record_run_config(config, str(tmp_path), new_run=False, changes=[("batch_size", 4, 8)], step=5)
  assert json.load(open(tmp_path / "config.json"))["batch_size"] == 8
  assert json.load(open(tmp_path / "config.before_step_5.json"))["batch_size"] == 4


def test_environment_failures_are_recognised():
  full = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/3")
  assert errors.environment_cause(full).startswith("no space left on the device")
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file '
                           '"/w/ckpt/": Failed to write 12 bytes to file 7: No space left on device')
  assert errors.environment_cause(tensorstore) == (
      "no space left on the device (Failed to write 12 bytes to file 7: No space left on device)")
  try:
    try:
      raise OSError(errno.EDQUOT, "Disk quota exceeded")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as wrapped:
    assert errors.environment_cause(wrapped).startswith("disk quota exceeded")
  assert errors.environment_cause(ValueError("shape mismatch")) is None
  error = rundir.environment_failure(full, "/nowhere")
  assert isinstance(error, errors.RunEnvironmentError) and "no complete checkpoint exists yet" in str(error)
  plain = ValueError("shape mismatch")
  assert rundir.environment_failure(plain, "/nowhere") is plain


def test_prepare_workdir_names_the_problem(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.RunEnvironmentError, match="Not a directory"):
    rundir.prepare_workdir(str(tmp_path / "file" / "run"))
  rundir.prepare_workdir(str(tmp_path / "ok"))
  assert os.listdir(tmp_path / "ok") == []


def test_pretrained_backbone_check(tmp_path):
  config = tiny_config()
  rundir.check_pretrained(config)                  # synthetic, "": random init without a word
  config.model.pretrained = "none"
  assert config_base.pretrained_dir(config) is None
  rundir.check_pretrained(config)
  config.model.pretrained = str(tmp_path / "missing")
  with pytest.raises(config_base.ConfigError, match="convert_torch_checkpoint.py --input resnet101.pth"):
    rundir.check_pretrained(config)
  (tmp_path / "missing").mkdir()
  rundir.check_pretrained(config)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_first_ctrl_c_ask_the_loop_to_save_and_stop(signum):
  previous = signal.getsignal(signum)
  preempted = runtime.Preempted()
  try:
    os.kill(os.getpid(), signum)
    assert preempted.requested and preempted.signal_name == signal.Signals(signum).name
  finally:
    preempted.restore()
  assert signal.getsignal(signum) is previous
