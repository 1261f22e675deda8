"""The run directory: is it usable, whose run it holds (config.json), what a new run needs
before it starts, and how a failure to write there is reported."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax

from dgcl_jax import config_base
from dgcl_jax import errors


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written there; RunEnvironmentError if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.RunEnvironmentError(f"--workdir={workdir} cannot be used: {errors.os_reason(e)}") from None


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints under workdir/checkpoints, from the folder names."""
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _stored_meta(workdir: str, step: int) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
      meta = json.load(f)
    return meta if isinstance(meta, dict) else {}
  except (OSError, ValueError):
    return {}


def check_run_identity(config, workdir: str, allow_config_change: bool = False, total_steps=None):
  """(resuming, changes) for `config` in `workdir`, reading files only.

  total_steps: the steps `config` trains for (an int, or a function giving it: read only for a
  finished run); default: computed from the config.

  resuming: the workdir holds checkpoints. changes: [(field, stored, requested)] where `config`
  differs from <workdir>/config.json in a field that changes the computation (all but
  config_base.FREE_FIELDS). Raises ConfigChangeError, nothing touched, if there are changes and
  not allow_config_change, or if the run has finished and `config` would train it further
  (its checkpoints are never trained over). A workdir from before config.json was kept per run
  is resumed unchecked, with a warning.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    return False, []
  latest = steps[-1]
  finals = [m["final"] for m in (_stored_meta(workdir, s) for s in steps) if isinstance(m.get("final"), dict)]
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      changes = config_base.config_changes(stored, config_base.as_json_dict(config))
    except (OSError, ValueError, AttributeError) as e:
      reason = errors.os_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
      if not allow_config_change:
        raise config_base.ConfigChangeError(
            f"{path}: cannot read the run's config ({reason}); pass --allow_config_change to resume "
            "with the config given") from None
      changes = [("config.json", "unreadable", "rewritten")]
  else:
    logging.warning("%s has checkpoints but no config.json (a run from an older version): resuming without "
                    "comparing configs.", workdir)
    changes = []
  if finals:
    if total_steps is None:
      from dgcl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
      total_steps = lambda: state_lib.total_steps(config)  # pylint: disable=unnecessary-lambda-assignment
    total = int(total_steps() if callable(total_steps) else total_steps)
    done = max(int(f.get("step", latest)) for f in finals)
    if changes or total != done:
      what = config_base.describe_changes(changes) if changes else f"{total} steps instead of {done}"
      raise config_base.ConfigChangeError(
          f"--workdir={workdir} holds a run that finished at step {done}; the config given differs ({what}) and "
          "would train over its final checkpoints: use a new --workdir")
  if changes and not allow_config_change:
    raise config_base.ConfigChangeError(
        f"--workdir={workdir} holds a run (step {latest}) started with another config: "
        f"{config_base.describe_changes(changes)}; resume with the run's own config ({path}), use a new --workdir, "
        "or pass --allow_config_change to resume with the new values")
  if changes:
    logging.warning("Resuming %s with a changed config (--allow_config_change): %s", workdir,
                    config_base.describe_changes(changes))
  return True, changes


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_run_config(config, workdir: str, *, new_run: bool, changes, step: int) -> None:
  """Writes <workdir>/config.json for a new run; after an allowed change, keeps the previous one
  as config.before_step_<step>.json and writes the new one."""
  path = os.path.join(workdir, "config.json")
  try:
    if new_run:
      _write_text(path, config.to_json_best_effort(indent=2))
    elif changes:
      kept = os.path.join(workdir, f"config.before_step_{step}.json")
      if os.path.exists(path):
        os.replace(path, kept)
      _write_text(path, config.to_json_best_effort(indent=2))
      logging.warning("%s now holds the changed config; the one the run used up to step %d is kept as %s.",
                      path, step, kept)
  except OSError as e:
    raise errors.RunEnvironmentError(f"cannot write {path}: {errors.os_reason(e)}") from None


def check_pretrained(config) -> None:
  """A new run's pretrained backbone must exist (ConfigError naming how to get one); "none"
  trains from random weights on purpose, with a warning."""
  path = config_base.pretrained_dir(config)
  if path is None:
    if str(config.model.pretrained).strip() or config.data.name != "synthetic":
      logging.warning("config.model.pretrained=%r: the backbone starts from random weights (the published "
                      "results start from an ImageNet-pretrained one).", config.model.pretrained)
    return
  if not os.path.isdir(path):
    raise config_base.ConfigError(
        f"config.model.pretrained={path!r}: no such directory. Convert the ImageNet backbone once with "
        f"`python scripts/convert_torch_checkpoint.py --input resnet101.pth --output {path}` (README, Real data), "
        "or pass --config.model.pretrained=none to train from scratch on purpose")


def environment_failure(e: BaseException, workdir: str, where: str | None = None) -> BaseException:
  """RunEnvironmentError (one line) if `e` says the machine could not store what the run writes
  under `where` (default: the workdir); `e` itself otherwise."""
  cause = errors.environment_cause(e)
  if cause is None:
    return e
  steps = checkpoint_steps(workdir)
  kept = (f"the newest complete checkpoint, step {steps[-1]}, is kept" if steps
          else "no complete checkpoint exists yet")
  return errors.RunEnvironmentError(
      f"cannot write to {os.path.abspath(where or workdir)}: {cause}; {kept}. "
      "Free space (or fix the workdir) and rerun the same command to resume")


def saved_note(directory: str, step: int) -> str:
  if step == 0:
    return "no step was trained yet"
  return f"the state after step {step} was saved in {directory}: fix the data and rerun the same command to resume"
