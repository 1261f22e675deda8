"""Loading a network's variables for inference from a run directory or a converted checkpoint."""

from __future__ import annotations

import os

import jax
from absl import logging


def define_checkpoint_flags(model_help: str):
  """The flags scripts/evaluate.py and scripts/predict.py share, as absl flag holders:
  (config, workdir, variables, checkpoint, model)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holders = (
      config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True),
      flags.DEFINE_string("workdir", None, "The run directory holding checkpoints/."),
      flags.DEFINE_string("variables", None, "A converted variables checkpoint (instead of --workdir)."),
      flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number."),
      flags.DEFINE_enum("model", "auto", ["auto", "teacher", "student"],
                        model_help + " auto: the one that scored higher in the run's own evaluation at that "
                        "checkpoint (the student where no teacher is trained yet)."),
  )
  flags.mark_flags_as_required(["config"])
  return holders


def load_model_variables(config, fns, *, workdir: str | None = None, variables_dir: str | None = None,
                         checkpoint: str = "best", model: str = "auto"):
  """({'params', 'batch_stats'}, description) from `workdir` or `variables_dir`.

  checkpoint: 'best', 'latest' or a step number (only with workdir).
  model: 'teacher', 'student' or 'auto'; description['model'] names the network returned.
  A `supervised` run, or a semi-supervised one still in its supervised-only epochs, has an
  untrained teacher: asking for it is an error, and 'auto' picks the student there.
  """
  from dgcl_jax import checkpointing, convert, train  # pylint: disable=g-import-not-at-top
  if bool(workdir) == bool(variables_dir):
    raise ValueError("give exactly one of --workdir and --variables")
  if model not in ("auto", "teacher", "student"):
    raise ValueError(f"--model={model!r}: expected auto, teacher or student")
  if variables_dir:
    return convert.load_variables(variables_dir), {"source": os.path.abspath(variables_dir),
                                                   "model": "teacher" if model == "auto" else model}
  abstract = jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0), load_pretrained=False))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.replicated),
                                    abstract)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  which, step = checkpoint, None
  if which not in ("best", "latest"):
    if not str(which).isdigit():
      raise ValueError(f"--checkpoint={which!r}: expected best, latest or a step number")
    which, step = "latest", int(which)
  if which == "best" and not ckpt.steps("best"):
    logging.warning("no best checkpoint in %s: using the latest", workdir)
    which = "latest"
  restored = ckpt.restore(abstract, which, step)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no {which} checkpoint in {ckpt.directory}")
  state, meta, _ = restored
  model = _resolve_model(config, fns, int(state.step), meta, model)
  if model == "teacher":
    variables = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
  else:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
  return variables, {"step": int(state.step), "checkpoint": which, "model": model}


def _resolve_model(config, fns, step: int, meta: dict, model: str) -> str:
  """'teacher' or 'student' for the checkpoint at `step` (see load_model_variables)."""
  teacher_trained = config.method != "supervised" and step > config.sup_only_epochs * fns.steps_per_epoch
  if model == "teacher" and not teacher_trained:
    why = ("config.method='supervised' trains no teacher" if config.method == "supervised"
           else f"step {step} is within the {config.sup_only_epochs} supervised-only epochs")
    raise ValueError(f"--model=teacher: the checkpoint's teacher is untrained ({why}); use --model=student")
  if model != "auto":
    return model
  if not teacher_trained:
    return "student"
  record = next((r for r in meta.get("history", []) if r.get("step") == step), None)
  if record is not None and record.get("teacher_miou") is not None:
    return "teacher" if record["teacher_miou"] >= record["student_miou"] else "student"
  return "teacher"
