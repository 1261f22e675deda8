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
      flags.DEFINE_enum("model", "teacher", ["teacher", "student"], model_help),
  )
  flags.mark_flags_as_required(["config"])
  return holders


def load_model_variables(config, fns, *, workdir: str | None = None, variables_dir: str | None = None,
                         checkpoint: str = "best", model: str = "teacher"):
  """({'params', 'batch_stats'} of `model`, description) from `workdir` or `variables_dir`.

  checkpoint: 'best', 'latest' or a step number (only with workdir).
  """
  from dgcl_jax import checkpointing, convert, train  # pylint: disable=g-import-not-at-top
  if bool(workdir) == bool(variables_dir):
    raise ValueError("give exactly one of --workdir and --variables")
  if variables_dir:
    return convert.load_variables(variables_dir), {"source": os.path.abspath(variables_dir)}
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
  state, _, _ = restored
  if model == "teacher":
    variables = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
  else:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
  return variables, {"step": int(state.step), "checkpoint": which}
