"""ResNet v1c (deep stem) backbone with dilation and multi-grid (REFERENCE.md s.1, backbone)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn

from dgcl_jax.models.layers import BatchNorm, Conv, ConvBNReLU, max_pool_ceil, remat_call

STAGE_BLOCKS = {14: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
MULTI_GRID = (2, 2, 4)
EXPANSION = 4


def stage_plan(depth: int, replace_stride_with_dilation: Sequence[bool], multi_grid: bool):
  """Per stage: (num_blocks, stride, [dilation of each block]) as the reference's _make_layer.

  A dilated stage multiplies the running dilation by its stride and uses stride 1; its first block
  keeps the previous dilation. Multi-grid on stage 4: first block previous x 2, others current x grid.
  """
  blocks = STAGE_BLOCKS[depth]
  plan, dilation = [], 1
  for i, n in enumerate(blocks):
    stride = 1 if i == 0 else 2
    previous = dilation
    if i > 0 and replace_stride_with_dilation[i - 1]:
      dilation *= stride
      stride = 1
    grids = [1] * n
    if multi_grid and i == 3:
      grids = [MULTI_GRID[min(j, len(MULTI_GRID) - 1)] for j in range(n)]
    dilations = [previous * grids[0]] + [dilation * grids[j] for j in range(1, n)]
    plan.append((n, stride, dilations))
  return plan


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), projection shortcut when shapes change."""
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name, **kw: BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=name, **kw)
    conv = lambda f, k, name, s=1, d=1: Conv(f, k, s, d, False, "kaiming", self.dtype, name=name)
    out = nn.relu(bn("bn1")(conv(self.width, 1, "conv1")(x), train))
    out = nn.relu(bn("bn2")(conv(self.width, 3, "conv2", self.stride, self.dilation)(out), train))
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out = bn("bn3", scale_init=last_init)(conv(self.width * EXPANSION, 1, "conv3")(out), train)
    identity = x
    if self.downsample:
      identity = conv(self.width * EXPANSION, 1, "downsample_conv", self.stride)(x)
      identity = bn("downsample_bn")(identity, train)
    return nn.relu(out + identity.astype(out.dtype))


class ResNet(nn.Module):
  """Deep-stem ResNet returning the four stage outputs [B, H/4..H/os, W/4.., 4*base*(1,2,4,8)].

  Names: stem1, stem2, stem3 (ConvBNReLU), layer{1..4}_{j} (Bottleneck).
  remat: the backward pass recomputes each stem layer and each block from its input
  (layers.remat_call) instead of keeping their insides from the forward pass.
  """
  depth: int = 101
  base_width: int = 64
  replace_stride_with_dilation: Sequence[bool] = (False, False, True)
  multi_grid: bool = True
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Any] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    b = self.base_width
    kw = dict(init_mode="kaiming", bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    remat = self.remat and not self.is_initializing()
    x = remat_call(ConvBNReLU(b, 3, stride=2, name="stem1", **kw), x, train, remat)
    x = remat_call(ConvBNReLU(b, 3, name="stem2", **kw), x, train, remat)
    x = remat_call(ConvBNReLU(2 * b, 3, name="stem3", **kw), x, train, remat)
    x = max_pool_ceil(x, 3, 2, 1)
    in_ch = 2 * b
    outs = []
    plan = stage_plan(self.depth, tuple(self.replace_stride_with_dilation), self.multi_grid)
    for i, (n, stride, dilations) in enumerate(plan):
      width = b * 2 ** i
      for j in range(n):
        s = stride if j == 0 else 1
        block = Bottleneck(
            width, s, dilations[j], downsample=(j == 0 and (s != 1 or in_ch != width * EXPANSION)),
            zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, dtype=self.dtype, name=f"layer{i + 1}_{j}")
        x = remat_call(block, x, train, remat)
        in_ch = width * EXPANSION
      outs.append(x)
    return outs
