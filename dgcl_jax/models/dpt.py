"""UniMatch V2's segmentation network: a DINOv2 ViT (vit.py) with its DPT head, plus DGCL's
representation head, as one Flax module (DPTSegmenter) with DeepLabV3Plus's interface.

The head (UniMatch V2 model/semseg/dpt.py, use_bn=False): per intermediate layer a 1x1 projection to
out_channels[i], resized to 4x, 2x, 1x and 1/2 of the patch grid (ConvTranspose 4/4, ConvTranspose 2/2,
identity, 3x3 stride-2 conv), a 3x3 conv to `features` (no bias), then RefineNet fusion from the
coarsest level up (residual conv units, bilinear align_corners=True resize to the next level, the last
one 2x), and output_conv: 3x3 conv -> ReLU (= 'fts') -> 1x1 conv to the classes (= 'pred'). No
BatchNorm and no dropout in the head (UniMatch V2's feature dropout is its training method's
complementary `comp_drop`, not part of the network). 'pred' is at 8x the patch grid, H * 8 / 14.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dgcl_jax import ops
from dgcl_jax.models.layers import BatchNorm, Conv, Dense, dtype_of, remat_call, torch_uniform_init
from dgcl_jax.models.vit import ViT, vit_spec


class DPTSettings(NamedTuple):
  vit: str
  features: int
  out_channels: tuple


DPT_DEFAULTS = {   # UniMatch V2's per-size settings; "tiny" is ours (tests only)
    "tiny": (16, (8, 16, 32, 48)),
    "small": (64, (48, 96, 192, 384)),
    "base": (128, (96, 192, 384, 768)),
    "large": (256, (256, 512, 1024, 1024)),
}


def dpt_settings(model_config) -> DPTSettings:
  """(vit size, dpt_features, dpt_out_channels) of a model config, per-size defaults for the last two."""
  m = model_config
  name = m.get("vit", "small")
  vit_spec(name)
  features, channels = DPT_DEFAULTS[name]
  features = int(m.get("dpt_features", None) or features)
  channels = tuple(int(c) for c in (m.get("dpt_out_channels", None) or channels))
  if len(channels) != 4:
    raise ValueError(f"model.dpt_out_channels needs 4 values (one per intermediate layer), got {channels}")
  return DPTSettings(name, features, channels)


class ConvTransposeUp(nn.Module):
  """torch ConvTranspose2d(c_in, features, kernel=stride=factor, padding=0) on NHWC:
  [B, h, w, c_in] -> [B, factor * h, factor * w, features]. Each input pixel writes its own
  factor x factor block, so it is one einsum. 'kernel' [factor, factor, c_in, features], 'bias'."""
  features: int
  factor: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    f = self.factor
    init = torch_uniform_init(self.features * f * f)   # torch's fan_in for a transposed conv: weight.size(1) * k * k
    kernel = self.param("kernel", init, (f, f, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", init, (self.features,), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum("bhwi,pqio->bhpwqo", x.astype(dtype), kernel.astype(dtype))
    b, h, _, w, _, c = y.shape
    return y.reshape(b, h * f, w * f, c) + bias.astype(dtype)


class ResidualConvUnit(nn.Module):
  """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias (no BN: use_bn=False)."""
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):   # `train` unused: remat_call's signature
    y = Conv(self.features, 3, use_bias=True, dtype=self.dtype, name="conv1")(nn.relu(x))
    y = Conv(self.features, 3, use_bias=True, dtype=self.dtype, name="conv2")(nn.relu(y))
    return y + x.astype(y.dtype)


class FeatureFusion(nn.Module):
  """RefineNet fusion: (x [+ resConfUnit1(skip)]) -> resConfUnit2 -> bilinear align_corners=True
  resize to `size` (default 2x) -> 1x1 out_conv. [B, h, w, F] -> [B, size..., F]."""
  features: int
  remat: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, skip=None, size=None, train: bool = False):
    remat = self.remat and train and not self.is_initializing()
    if skip is not None:
      x = x + remat_call(ResidualConvUnit(self.features, self.dtype, name="resConfUnit1"), skip, train, remat)
    x = remat_call(ResidualConvUnit(self.features, self.dtype, name="resConfUnit2"), x, train, remat)
    size = tuple(size) if size is not None else (2 * x.shape[1], 2 * x.shape[2])
    x = ops.resize_bilinear_align_corners(x, size)
    return Conv(self.features, 1, use_bias=True, dtype=self.dtype, name="out_conv")(x)


class DPTHead(nn.Module):
  """Four [B, h, w, D] ViT features -> (pred [B, 8h, 8w, num_classes], fts [B, 8h, 8w, features],
  rep [B, 8h, 8w, rep_dim]); rep is DGCL's head on fts: rep_fc1 -> rep_bn -> ReLU -> rep_fc2."""
  num_classes: int
  features: int = 64
  out_channels: Sequence[int] = (48, 96, 192, 384)
  rep_dim: int = 256
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  remat: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, feats, train: bool = False):
    conv = lambda f, k, name, stride=1, bias=True: Conv(f, k, stride, 1, bias, dtype=self.dtype, name=name)
    levels = []
    for i, (x, c) in enumerate(zip(feats, self.out_channels)):
      x = conv(c, 1, f"projects_{i}")(x)
      if i in (0, 1):
        x = ConvTransposeUp(c, 4 if i == 0 else 2, self.dtype, name=f"resize_layers_{i}")(x)
      elif i == 3:
        x = conv(c, 3, "resize_layers_3", stride=2)(x)
      levels.append(conv(self.features, 3, f"layer{i + 1}_rn", bias=False)(x))
    fusion = lambda name: FeatureFusion(self.features, self.remat, self.dtype, name=name)
    # refinenet4 takes one input: UniMatch V2 builds its resConfUnit1 but never calls it.
    path = fusion("refinenet4")(levels[3], None, levels[2].shape[1:3], train)
    path = fusion("refinenet3")(path, levels[2], levels[1].shape[1:3], train)
    path = fusion("refinenet2")(path, levels[1], levels[0].shape[1:3], train)
    path = fusion("refinenet1")(path, levels[0], None, train)
    fts = nn.relu(conv(self.features, 3, "output_conv_0")(path))
    pred = conv(self.num_classes, 1, "output_conv_2")(fts)
    rep = Dense(self.rep_dim, dtype=self.dtype, name="rep_fc1")(fts)
    rep_bn = BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="rep_bn")
    rep = nn.relu(remat_call(rep_bn, rep, train, self.remat and not self.is_initializing()))
    rep = Dense(self.rep_dim, dtype=self.dtype, name="rep_fc2")(rep)
    return pred, fts, rep


class DPTSegmenter(nn.Module):
  """images [B, H, W, 3] (H, W multiples of 14) -> {'pred' [B, h, w, num_classes], 'fts' [B, h, w,
  features], 'rep' [B, h, w, rep_dim]} with h = 8 * H / 14 (not resized to the input: the losses do).
  Top-level submodules 'backbone' (vit.ViT) and 'head' (DPTHead).

  Reads model_config.vit, dpt_features, dpt_out_channels (dpt_settings), num_classes, rep_dim, dtype,
  remat (each ViT block, residual conv unit and rep_bn recomputed in the backward pass),
  bn_momentum and bn_epsilon (rep_bn). dropout_rate is not read: the DPT head has no dropout.
  """
  config: Any   # model_config() ConfigDict with arch = "dpt"

  @nn.compact
  def __call__(self, images, train: bool = False):
    m = self.config
    if m.get("aux", False):
      raise ValueError("model.aux (DeepLab's auxiliary head on ResNet stage 3) has no DPT counterpart: "
                       "set it False for arch='dpt'")
    settings = dpt_settings(m)
    spec = vit_spec(settings.vit)
    dtype = dtype_of(m.get("dtype", "float32"))
    remat = bool(m.get("remat", False))
    feats = ViT(spec.dim, spec.depth, spec.heads, spec.layers, remat=remat, dtype=dtype, name="backbone")(
        images.astype(dtype), train)
    pred, fts, rep = DPTHead(m.num_classes, settings.features, settings.out_channels, m.rep_dim,
                             m.bn_momentum, m.bn_epsilon, remat=remat, dtype=dtype, name="head")(feats, train)
    return {"pred": pred, "fts": fts, "rep": rep}
