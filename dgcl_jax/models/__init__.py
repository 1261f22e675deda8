"""Segmentation models: DeepLabV3+ on a deep-stem ResNet (REFERENCE.md s.1) and UniMatch V2's DPT
on a DINOv2 ViT (model_config.arch = "dpt"; dpt.py, vit.py)."""

import ml_collections

from dgcl_jax.models.deeplab import ASPP, AuxHead, Decoder, DeepLabV3Plus
from dgcl_jax.models.dpt import DPTHead, DPTSegmenter, dpt_settings
from dgcl_jax.models.layers import BatchNorm, Conv, ConvBNReLU, Dense
from dgcl_jax.models.resnet import ResNet, stage_plan
from dgcl_jax.models.vit import ViT, vit_spec

ARCHS = ("deeplabv3plus", "dpt")


def build(model_config):
  """The model for `model_config` (config_base.model_config()): DeepLabV3Plus, or DPTSegmenter when
  model_config.arch == "dpt"; both return a dict of pred/fts/rep (see each for shapes)."""
  config = ml_collections.FrozenConfigDict(model_config)
  arch = config.get("arch", "deeplabv3plus")
  if arch == "dpt":
    return DPTSegmenter(config)
  if arch != "deeplabv3plus":
    raise ValueError(f"unknown model.arch {arch!r}: expected one of {', '.join(ARCHS)}")
  return DeepLabV3Plus(config)


def feature_dims(model_config) -> tuple[int, int]:
  """(fts channels, rep channels) of the network `model_config` builds: what the memory bank stores.
  DeepLabV3+: (decoder_channels, rep_dim); DPT: (the head's `features`, rep_dim)."""
  if model_config.get("arch", "deeplabv3plus") == "dpt":
    return dpt_settings(model_config).features, int(model_config.rep_dim)
  return int(model_config.decoder_channels), int(model_config.rep_dim)


def input_multiple(module) -> int:
  """What the module's input sides must be a multiple of: 14 (the ViT's patch) for the DPT, else 1."""
  return 14 if isinstance(module, DPTSegmenter) else 1


def init_image_size(module) -> int:
  """A small square side the module accepts: 70 (5 patches of 14) for the ViT, else 64."""
  return 70 if isinstance(module, DPTSegmenter) else 64


def init_variables(module, rng, image_size: int = None):
  """{'params', 'batch_stats'} of `module` from `rng`, jitted (shapes do not depend on image_size;
  default init_image_size(module))."""
  import jax
  import jax.numpy as jnp
  size = image_size or init_image_size(module)
  return jax.jit(module.init, static_argnames="train")(
      rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


__all__ = ["ARCHS", "ASPP", "AuxHead", "BatchNorm", "Conv", "ConvBNReLU", "DPTHead", "DPTSegmenter", "Decoder",
           "DeepLabV3Plus", "Dense", "ResNet", "ViT", "build", "dpt_settings", "feature_dims", "init_image_size", "input_multiple",
           "init_variables", "stage_plan", "vit_spec"]
