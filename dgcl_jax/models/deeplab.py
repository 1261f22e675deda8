"""DeepLabV3+ decoder, representation head and auxiliary head (REFERENCE.md s.1, decoder)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dgcl_jax import ops
from dgcl_jax.models.layers import BatchNorm, Conv, ConvBNReLU, Dense, channel_dropout, dtype_of, remat_call
from dgcl_jax.models.resnet import ResNet


class ASPP(nn.Module):
  """Image pooling, 1x1 and three atrous 3x3 branches, concatenated: [B, h, w, 5 * channels]."""
  channels: int = 256
  dilations: Sequence[int] = (6, 12, 18)
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Any] = None
  remat: bool = False   # recompute the 1x1 and atrous branches in the backward pass (layers.remat_call)

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    remat = self.remat and not self.is_initializing()
    h, w = x.shape[1:3]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    # BN over a 1x1 map: its statistics come from the batch axis alone (n = batch size).
    pooled = ConvBNReLU(self.channels, 1, name="pool", **kw)(pooled, train)
    branches = [ops.resize_bilinear_align_corners(pooled, (h, w)),
                remat_call(ConvBNReLU(self.channels, 1, name="conv1x1", **kw), x, train, remat)]
    for i, d in enumerate(self.dilations):
      branch = ConvBNReLU(self.channels, 3, dilation=d, name=f"atrous{i + 1}", **kw)
      branches.append(remat_call(branch, x, train, remat))
    return jnp.concatenate(branches, axis=-1)


class Decoder(nn.Module):
  """DeepLabV3+ decoder on (stage-1, stage-4) features -> pred, fts, rep at stride 4."""
  num_classes: int
  channels: int = 256
  low_level_channels: int = 48
  rep_dim: int = 256
  dilations: Sequence[int] = (6, 12, 18)
  dropout_rate: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Any] = None
  remat: bool = False   # recompute conv-BN-ReLU layers and rep_bn in the backward pass (dropout stays outside)

  @nn.compact
  def __call__(self, low, high, train: bool = False):
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    remat = self.remat and not self.is_initializing()
    x = ASPP(self.channels, tuple(self.dilations), name="aspp", remat=self.remat, **kw)(high, train)
    x = remat_call(ConvBNReLU(self.channels, 3, name="head", **kw), x, train, remat)
    x = channel_dropout(self.dropout_rate, "head_drop")(x, deterministic=not train)
    low = remat_call(ConvBNReLU(self.low_level_channels, 1, use_bias=True, name="low", **kw), low, train, remat)
    x = ops.resize_bilinear_align_corners(x, low.shape[1:3])
    x = jnp.concatenate([low, x.astype(low.dtype)], axis=-1)
    x = remat_call(ConvBNReLU(self.channels, 3, use_bias=True, name="cls1", **kw), x, train, remat)
    x = channel_dropout(self.dropout_rate, "cls1_drop")(x, deterministic=not train)
    x = remat_call(ConvBNReLU(self.channels, 3, use_bias=True, name="cls2", **kw), x, train, remat)
    # The last op before fts: pred and rep see the same dropout mask (REFERENCE.md s.1).
    fts = channel_dropout(self.dropout_rate, "cls2_drop")(x, deterministic=not train)
    pred = Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="cls_out")(fts)
    rep = Dense(self.rep_dim, dtype=self.dtype, name="rep_fc1")(fts)
    rep_bn = BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="rep_bn")
    rep = nn.relu(remat_call(rep_bn, rep, train, remat))
    rep = Dense(self.rep_dim, dtype=self.dtype, name="rep_fc2")(rep)
    return pred, fts, rep


class AuxHead(nn.Module):
  """3x3 conv (bias) BN ReLU channel dropout, 1x1 conv -> num_classes, on stage 3."""
  num_classes: int
  channels: int = 256
  dropout_rate: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Any] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = ConvBNReLU(self.channels, 3, use_bias=True, bn_momentum=self.bn_momentum,
                       bn_epsilon=self.bn_epsilon, dtype=self.dtype, name="block")
    x = remat_call(block, x, train, self.remat and not self.is_initializing())
    x = channel_dropout(self.dropout_rate, "drop")(x, deterministic=not train)
    return Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="out")(x)


class DeepLabV3Plus(nn.Module):
  """The segmentation model: images [B, H, W, 3] -> dict of pred/fts/rep (stride 4) and aux.

  'pred' [B, h, w, num_classes], 'fts' [B, h, w, decoder_channels], 'rep' [B, h, w, rep_dim]
  with h = ceil(ceil(H / 2) / 2); 'aux' [B, h8, w8, num_classes] at the backbone output stride
  when model_config.aux. Top-level submodules: 'backbone', 'decoder', 'aux'.
  model_config.remat: the backward pass recomputes the stem layers, the bottleneck blocks and the
  heads' conv-BN-ReLU layers from their inputs (layers.remat_call); same parameters, same numbers
  (to rounding: a bfloat16 recomputation may round differently).
  """
  config: Any   # model_config() ConfigDict

  @nn.compact
  def __call__(self, images, train: bool = False):
    m = self.config
    dtype = dtype_of(m.dtype)
    bn = dict(bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon, dtype=dtype)
    remat = bool(m.get("remat", False))
    feats = ResNet(m.depth, m.base_width, tuple(m.replace_stride_with_dilation), m.multi_grid,
                   m.zero_init_residual, name="backbone", remat=remat, **bn)(images.astype(dtype), train)
    pred, fts, rep = Decoder(m.num_classes, m.decoder_channels, m.low_level_channels, m.rep_dim,
                             tuple(m.aspp_dilations), m.dropout_rate, name="decoder", remat=remat, **bn)(
                                 feats[0], feats[3], train)
    out = {"pred": pred, "fts": fts, "rep": rep}
    if m.aux:
      out["aux"] = AuxHead(m.num_classes, m.decoder_channels, m.dropout_rate, name="aux", remat=remat, **bn)(
          feats[2], train)
    return out
