"""DINOv2 ViT/14 backbone (as UniMatch V2 builds it: LayerScale, no registers, MLP FFN) in flax.linen.

Images are NHWC [B, H, W, 3] with H and W multiples of 14. The positional embedding is stored for
518 / 14 = 37 x 37 patches plus the class token and resized to the input's patch grid the way DINOv2's
`interpolate_pos_encoding` does it: torch bicubic (a = -0.75, align_corners=False) called with the scale
factor (grid + 0.1) / 37, whose source coordinates come from that factor, not from the sizes.

Parameter names (convert_vit.py maps them to the torch keys): cls_token [1, 1, D], pos_embed
[1, 1370, D], patch_embed/{kernel [14, 14, 3, D], bias}, blocks_{i}/{norm1, attn/{qkv, proj}, ls1/gamma,
norm2, mlp/{fc1, fc2}, ls2/gamma}, norm. DINOv2's mask_token is not a parameter here (only its
masked-image pretraining reads it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgcl_jax.models.layers import remat_call, torch_uniform_init

PATCH = 14
POS_GRID = 37          # DINOv2 trains at 518 x 518: 37 x 37 patches
POS_OFFSET = 0.1       # DINOv2's interpolate_offset (0.0 in the register variants, not used here)
LN_EPS = 1e-6
CUBIC_A = -0.75        # torch's bicubic (antialias=False)


class ViTSpec(NamedTuple):
  dim: int
  depth: int
  heads: int
  layers: tuple          # blocks whose outputs feed the DPT head (get_intermediate_layers)


VIT_SPECS = {
    # Ours, not a DINOv2 release: a 4-block, 48-wide ViT for fast tests.
    "tiny": ViTSpec(48, 4, 2, (0, 1, 2, 3)),
    "small": ViTSpec(384, 12, 6, (2, 5, 8, 11)),
    "base": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "large": ViTSpec(1024, 24, 16, (4, 11, 17, 23)),
}


def vit_spec(name: str) -> ViTSpec:
  if name not in VIT_SPECS:
    raise ValueError(f"unknown ViT size {name!r}: expected one of {', '.join(VIT_SPECS)}")
  return VIT_SPECS[name]


def check_image_size(height: int, width: int) -> None:
  """Raises a one-line ValueError unless both sides are positive multiples of the 14-pixel patch."""
  if height % PATCH or width % PATCH or height <= 0 or width <= 0:
    raise ValueError(f"the DINOv2 ViT needs image sides that are multiples of {PATCH}: got {height}x{width} "
                     f"(e.g. crop to {max(PATCH, height // PATCH * PATCH)}x{max(PATCH, width // PATCH * PATCH)})")


def _cubic_coefficients(t: np.ndarray) -> list:
  """torch's get_cubic_upsample_coefficients (float32) for taps at offsets -1, 0, 1, 2 of floor(src)."""
  a = np.float32(CUBIC_A)
  one = np.float32(1.0)

  def near(x):    # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def far(x):     # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return [far(t + one), near(t), near(one - t), far(one - t + one)]


@functools.lru_cache(maxsize=256)
def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: Optional[float] = None) -> np.ndarray:
  """[out_size, in_size] float32 weights of torch bicubic (a=-0.75, align_corners=False) along one axis.

  With `scale_factor` (as F.interpolate(scale_factor=...) passes it on) the source coordinate of
  output j is (j + 0.5) / scale_factor - 0.5, else (j + 0.5) * in / out - 0.5; float32 as torch's
  CPU kernel; taps outside the input are clamped to the border.
  """
  if scale_factor is not None and scale_factor > 0:
    scale = np.float32(1.0 / scale_factor)
  else:
    scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - index.astype(np.float32), np.float32(0), np.float32(1))
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  for j, w in enumerate(_cubic_coefficients(t)):
    np.add.at(weights, (rows, np.clip(index + j - 1, 0, in_size - 1)), w)
  return weights


def pos_embed_factors(grid: int, h: int, w: int, offset: float = POS_OFFSET) -> tuple[float, float]:
  """DINOv2's scale factors for a grid x grid embedding on an h x w patch grid (python floats)."""
  sy, sx = float(h + offset) / math.sqrt(grid * grid), float(w + offset) / math.sqrt(grid * grid)
  for side, factor in ((h, sy), (w, sx)):
    # F.interpolate's output size floor(in * factor); DINOv2 asserts it is the patch grid.
    if math.floor(grid * factor) != side:
      raise ValueError(f"positional embedding {grid}x{grid} cannot be resized to {h}x{w} with offset {offset}")
  return sy, sx


def interpolate_pos_embed(pos_embed, h: int, w: int, offset: float = POS_OFFSET):
  """[1, 1 + n * n, D] (class token first) -> [1, 1 + h * w, D] float32, as DINOv2 (n x n unchanged)."""
  n = math.isqrt(pos_embed.shape[1] - 1)
  if n * n != pos_embed.shape[1] - 1:
    raise ValueError(f"pos_embed has {pos_embed.shape[1] - 1} patch tokens: not a square grid")
  pos = pos_embed.astype(jnp.float32)
  if h == n and w == n:
    return pos
  sy, sx = pos_embed_factors(n, h, w, offset)
  wy = jnp.asarray(torch_bicubic_matrix(n, h, sy))
  wx = jnp.asarray(torch_bicubic_matrix(n, w, sx))
  grid = pos[0, 1:].reshape(n, n, -1)
  hp = jax.lax.Precision.HIGHEST
  grid = jnp.einsum("ij,jlc->ilc", wy, grid, precision=hp)
  grid = jnp.einsum("kl,ilc->ikc", wx, grid, precision=hp)
  return jnp.concatenate([pos[:, :1], grid.reshape(1, h * w, -1)], axis=1)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  # DINOv2's init (timm's): weights N(0, 0.02) (its trunc_normal_ cuts at +-2, i.e. 100 std), biases 0.
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class PatchEmbed(nn.Module):
  """14x14 stride-14 conv as a matmul: [B, H, W, 3] -> [B, H/14 * W/14, dim] (row-major patches)."""
  dim: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h, w = hh // PATCH, ww // PATCH
    fan_in = PATCH * PATCH * c
    kernel = self.param("kernel", torch_uniform_init(fan_in), (PATCH, PATCH, c, self.dim), jnp.float32)
    bias = self.param("bias", torch_uniform_init(fan_in), (self.dim,), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    patches = x.reshape(b, h, PATCH, w, PATCH, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, fan_in)
    return jnp.dot(patches.astype(dtype), kernel.reshape(fan_in, self.dim).astype(dtype)) + bias.astype(dtype)


class LayerScale(nn.Module):
  """x * gamma, gamma [dim] initialized to 1 (UniMatch V2's DINOv2 init_values=1.0)."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention, fused qkv [D, 3D] (q, k, v then heads), softmax in float32."""
  dim: int
  heads: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    head_dim = self.dim // self.heads
    qkv = _dense(3 * self.dim, self.dtype, "qkv")(x).reshape(b, n, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0] * (head_dim ** -0.5), qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.dim)
    return _dense(self.dim, self.dtype, "proj")(out)


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x))."""
  dim: int
  heads: int
  mlp_ratio: int = 4
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):   # `train` unused (no drop path): remat_call's signature
    y = Attention(self.dim, self.heads, self.dtype, name="attn")(_layer_norm(self.dtype, "norm1")(x))
    x = x + LayerScale(name="ls1")(y).astype(x.dtype)
    y = Mlp(self.dim * self.mlp_ratio, self.dim, self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))
    return x + LayerScale(name="ls2")(y).astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""
  hidden: int
  dim: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)
    return _dense(self.dim, self.dtype, "fc2")(x)


class ViT(nn.Module):
  """DINOv2 ViT/14: images [B, H, W, 3] -> outputs of blocks `layers` after the final LayerNorm,
  class token dropped, each [B, H/14, W/14, dim] (get_intermediate_layers(x, layers) reshaped NHWC).

  remat: in training the backward pass recomputes each block from its input (layers.remat_call).
  """
  dim: int = 384
  depth: int = 12
  heads: int = 6
  layers: Sequence[int] = (2, 5, 8, 11)
  mlp_ratio: int = 4
  remat: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    b, hh, ww, _ = images.shape
    check_image_size(hh, ww)
    h, w = hh // PATCH, ww // PATCH
    dtype = self.dtype or jnp.float32
    x = PatchEmbed(self.dim, self.dtype, name="patch_embed")(images)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim), jnp.float32)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, POS_GRID * POS_GRID + 1, self.dim),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.dim)), x], axis=1)
    x = (x + interpolate_pos_embed(pos, h, w).astype(x.dtype)).astype(dtype)
    remat = self.remat and train and not self.is_initializing()
    norm = _layer_norm(self.dtype, "norm")
    outs = []
    for i in range(self.depth):
      x = remat_call(Block(self.dim, self.heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}"), x, train, remat)
      if i in self.layers:
        outs.append(norm(x)[:, 1:].reshape(b, h, w, self.dim))
    if len(outs) != len(self.layers):
      raise ValueError(f"intermediate layers {tuple(self.layers)} not all below depth {self.depth}")
    return outs
