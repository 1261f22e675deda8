"""DeepLabV3+ on a deep-stem ResNet (REFERENCE.md s.1)."""

import ml_collections

from dgcl_jax.models.deeplab import ASPP, AuxHead, Decoder, DeepLabV3Plus
from dgcl_jax.models.layers import BatchNorm, Conv, ConvBNReLU, Dense
from dgcl_jax.models.resnet import ResNet, stage_plan


def build(model_config) -> DeepLabV3Plus:
  """The model for `model_config` (config_base.model_config()); see DeepLabV3Plus for outputs."""
  return DeepLabV3Plus(ml_collections.FrozenConfigDict(model_config))


def init_variables(module, rng, image_size: int = 64):
  """{'params', 'batch_stats'} of `module` from `rng`, jitted (shapes do not depend on image_size)."""
  import jax
  import jax.numpy as jnp
  return jax.jit(module.init, static_argnames="train")(
      rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


__all__ = ["ASPP", "AuxHead", "BatchNorm", "Conv", "ConvBNReLU", "Decoder", "DeepLabV3Plus", "Dense",
           "ResNet", "build", "init_variables", "stage_plan"]
