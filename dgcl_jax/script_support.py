"""What scripts/evaluate.py and scripts/predict.py share: their flags, the run's config, and
loading one network's variables from a run directory or a converted checkpoint.

`--workdir` alone is enough: the run's own `<workdir>/config.json` is the config, and
`--config.x=y` overrides its fields; `--config=FILE` replaces it. Only the evaluated network's
parameters and BN statistics are read, so a config whose method or memory bank differs from
the run's still evaluates, while one whose network differs is named in one line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import logging

from dgcl_jax import cli


class SetupError(ValueError):
  """A problem with the scripts' flags, config or checkpoint: one line for the user."""


# ----------------------------------------------------------------------------- flags and config


def _argv_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one), without parsing the flags."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _tuples(value):
  """JSON lists back to the tuples the config holds everywhere (model.aspp_dilations, dgcl.ks, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_run_config(workdir: str):
  """The ConfigDict a run stored in <workdir>/config.json (evaluation defaults added if absent)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise SetupError(f"{path} not found: give the run's config with --config=FILE") from None
  except (OSError, ValueError) as e:
    raise SetupError(f"{path} cannot be read ({e}): give the run's config with --config=FILE") from None
  if not isinstance(stored, dict):
    raise SetupError(f"{path} does not hold a config: give the run's config with --config=FILE")
  stored.get("data", {}).pop("num_classes", None)  # a run from before model.num_classes was the only one
  config = ml_collections.ConfigDict(_tuples(stored))
  if "evaluation" not in config:  # a run started before the field existed
    config.evaluation = config_base.base_config().evaluation
    if config.data.get("name") == "cityscapes":
      config.evaluation.mode, config.evaluation.model = "sliding", "teacher"
  return config


class _ConfigUnavailable:
  """Stands for the --config flag where neither --config nor <workdir>/config.json gives one."""

  def __init__(self, error: str):
    self.error = error

  @property
  def value(self):
    raise SetupError(self.error)


def define_checkpoint_flags(model_help: str, argv: list[str] | None = None):
  """The flags scripts/evaluate.py and scripts/predict.py share, as absl flag holders:
  (config, workdir, variables, checkpoint, model).

  The config flag is a config file with --config=FILE; otherwise, where --workdir holds a
  config.json, that config (overridable with --config.x=y). --model defaults to None (the
  config's evaluation.model).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv
  workdir = _argv_value(argv, "workdir")
  if _argv_value(argv, "config") is None and workdir:
    try:
      run_config = load_run_config(workdir)
    except SetupError as e:
      config = _ConfigUnavailable(str(e))
    else:
      try:  # config_flags reads the --config.x=y overrides from argv here, not at parse time
        config = config_flags.DEFINE_config_dict("config", run_config,
                                                 "The run's config (default: <workdir>/config.json).",
                                                 lock_config=True, sys_argv=argv)
      except (KeyError, AttributeError, TypeError, ValueError) as e:
        cli.fail(cli.flag_error_line(e, argv, library_wording=True), 2)
  elif _argv_value(argv, "config") is None:
    config = _ConfigUnavailable("give --workdir=RUN (its config.json is the config) or --config=FILE")
  else:
    config = config_flags.DEFINE_config_file("config", None, "The run's config file (default: "
                                             "<workdir>/config.json).", lock_config=True)
  holders = (
      config,
      flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/ and config.json."),
      flags.DEFINE_string("variables", None, "A converted variables checkpoint (instead of --workdir)."),
      flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number."),
      flags.DEFINE_enum("model", None, ["auto", "teacher", "student"],
                        model_help + " auto: the one that scored higher in the run's own evaluation at that "
                        "checkpoint (the student where no teacher is trained yet). Default: the config's "
                        "evaluation.model."),
  )
  return holders


def config_value(holder):
  """The parsed --config (or the run's config.json); SetupError, one line, where it cannot load."""
  try:
    config = holder.value
    if config is not None:
      config.keys()  # a config file that failed to load raises only when used
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise SetupError(f"--config={_argv_value(sys.argv, 'config')} cannot be loaded "
                     f"({lines[-1] if lines else e})") from None
  if config is None:
    raise SetupError("--config names no config")
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with any error (unknown config field with its suggestion, wrong type,
  missing config file) as one line on stderr and exit status 2; for app.run(flags_parser=...)."""
  return cli.parse_flags(argv, library_wording=True)


# ----------------------------------------------------------------------------- variables


def abstract_variables(config, sharding):
  """{'params', 'batch_stats'} ShapeDtypeStructs of config.model's network."""
  import jax  # pylint: disable=g-import-not-at-top
  from dgcl_jax import models, state  # pylint: disable=g-import-not-at-top
  module = models.build(state.teacher_model_config(config.model))
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0)))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), variables)


def load_model_variables(config, sharding, *, workdir: str | None = None, variables_dir: str | None = None,
                         checkpoint: str = "best", model: str | None = None):
  """({'params', 'batch_stats'}, description) from `workdir` or `variables_dir`.

  checkpoint: 'best', 'latest' or a step number (only with workdir); a damaged 'latest' falls
  back to the newest step that restores, a damaged 'best' to the latest (one warning each).
  model: 'teacher', 'student', 'auto' or None (config.evaluation.model); description['model']
  names the network returned. A `supervised` run, or a semi-supervised one still in its
  supervised-only epochs, has an untrained teacher: asking for it is an error, and 'auto' (or
  the config's default) picks the student there.
  Raises SetupError or checkpointing.CheckpointError with one line.
  """
  from dgcl_jax import checkpointing, convert  # pylint: disable=g-import-not-at-top
  if bool(workdir) == bool(variables_dir):
    raise SetupError("give exactly one of --workdir and --variables")
  explicit = model is not None
  model = model if explicit else config.evaluation.model
  if model not in ("auto", "teacher", "student"):
    raise SetupError(f"model={model!r}: expected auto, teacher or student")
  if variables_dir:
    variables = convert.load_variables(variables_dir)
    checkpointing.check_shapes(
        checkpointing.leaf_shapes(variables), checkpointing.leaf_shapes(abstract_variables(config, sharding)),
        f"variables {variables_dir}", "the config", allow_extra=True)
    return variables, {"source": os.path.abspath(variables_dir), "model": "teacher" if model == "auto" else model}
  which, step = str(checkpoint), None
  if which not in ("best", "latest"):
    if not which.isdigit():
      raise SetupError(f"--checkpoint={which!r}: expected best, latest or a step number")
    which, step = "latest", int(which)
  abstract = abstract_variables(config, sharding)
  try:
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  except FileNotFoundError as e:
    raise SetupError(str(e)) from None
  chosen = {}

  def select(s, meta):
    chosen["model"] = _resolve_model(config, lambda: _steps_per_epoch(config), s, meta, model, explicit)
    prefix = "teacher_" if chosen["model"] == "teacher" else ""
    return {f"{prefix}params": abstract["params"], f"{prefix}batch_stats": abstract["batch_stats"]}

  try:
    restored = None
    if which == "best":
      if not ckpt.steps("best"):
        logging.warning("no best checkpoint in %s: using the latest", workdir)
        which = "latest"
      else:
        try:
          restored = ckpt.restore_fields(select, "best")
        except checkpointing.DamagedCheckpointError as e:
          logging.warning("%s: using the latest checkpoint", e)
          which = "latest"
    if restored is None:
      restored = ckpt.restore_fields(select, which, step)
  except checkpointing.ConfigMismatchError as e:
    raise checkpointing.ConfigMismatchError(
        f"{e}: the config does not match the run (evaluate with the run's own config.json: drop --config "
        f"and the --config.model overrides)") from None
  finally:
    ckpt.close()
  if restored is None:
    raise SetupError(f"no {which} checkpoint in {ckpt.directory}")
  step, _, fields = restored
  prefix = "teacher_" if chosen["model"] == "teacher" else ""
  variables = {"params": fields[f"{prefix}params"], "batch_stats": fields[f"{prefix}batch_stats"]}
  return variables, {"step": int(step), "checkpoint": which, "model": chosen["model"]}


def _steps_per_epoch(config) -> int:
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.steps_per_epoch(config)


def _resolve_model(config, steps_per_epoch, step: int, meta: dict, model: str, explicit: bool = True) -> str:
  """'teacher' or 'student' for the checkpoint at `step` (see load_model_variables).

  Whether the teacher is trained comes from the run's own evaluation at `step` where it has one
  (it scored a teacher or not), else from config.method and the supervised-only epochs;
  steps_per_epoch: an int or a function giving it (read only when needed).
  """
  record = next((r for r in meta.get("history", []) if r.get("step") == step), None)
  if record is not None:
    teacher_trained = record.get("teacher_miou") is not None
  else:
    spe = steps_per_epoch() if callable(steps_per_epoch) else steps_per_epoch
    teacher_trained = config.method != "supervised" and step > config.sup_only_epochs * spe
  if model == "teacher" and not teacher_trained:
    if explicit:
      why = ("config.method='supervised' trains no teacher" if config.method == "supervised"
             else f"step {step} is within the {config.sup_only_epochs} supervised-only epochs")
      raise SetupError(f"--model=teacher: the checkpoint's teacher is untrained ({why}); use --model=student")
    logging.warning("the checkpoint at step %d has no trained teacher: evaluating the student", step)
    return "student"
  if model != "auto":
    return model
  if not teacher_trained:
    return "student"
  if record is not None and record.get("teacher_miou") is not None:
    return "teacher" if record["teacher_miou"] >= record["student_miou"] else "student"
  return "teacher"


def describe(source: dict[str, Any]) -> str:
  """'teacher of the best checkpoint (step 9)' / 'student of converted variables DIR'."""
  if "source" in source:
    return f"{source['model']} of the converted variables {source['source']}"
  return f"{source['model']} of the {source['checkpoint']} checkpoint (step {source['step']})"
