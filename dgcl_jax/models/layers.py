"""Building blocks with PyTorch semantics: BatchNorm, explicit-padding convs, PyTorch init."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _after(x, g):
  """x, made to depend on the cotangent g without changing its value (x + 0 * one element of g)."""
  zero = jax.tree_util.tree_leaves(g)[0].reshape(-1)[0] * 0
  return x + zero.astype(x.dtype)


def remat_call(module: nn.Module, x, train: bool, enabled: bool = True):
  """module(x, train), rematerialized: the backward pass keeps only x (and the module's variables)
  and recomputes the module's forward from them.

  Unlike jax.checkpoint, the recomputation reads x through a data dependency on the incoming
  cotangent, so XLA cannot schedule it right after the forward pass: XLA:CPU drops jax.checkpoint's
  optimization barriers and hoisted the recomputed blocks there, which kept every block's
  temporaries alive together (as much memory as no remat). The module must not draw random numbers
  (its recomputation could not replay them); its variables keep their names and values.
  `enabled=False` calls the module plainly (callers pass it while initializing).
  """
  if not enabled:
    return module(x, train)

  def fn(mdl, x):
    return mdl(x, train)

  def forward(mdl, x):
    return mdl(x, train), (mdl.variables, x)

  def backward(residuals, g):
    variables, x = residuals
    unbound = module.clone(parent=None)

    def apply(params, x):
      # BatchNorm in training mode normalizes with batch statistics: the running ones do not matter.
      return unbound.apply({**variables, "params": params}, x, train, mutable=True)[0]

    _, vjp = jax.vjp(apply, variables["params"], _after(x, g))
    params_t, x_t = vjp(g)
    return {"params": params_t}, x_t

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(module, x)


def torch_uniform_init(fan_in: int) -> Callable:
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    # Drawn flat: partitionable threefry compiles several times faster for 1-D shapes on CPU.
    return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

  return init


def kaiming_fan_out(key, shape, dtype=jnp.float32):
  """Kaiming normal, fan_out, ReLU gain (the reference ResNet's init) for an HWIO kernel."""
  std = math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
  return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


class Conv(nn.Module):
  """2-D conv on NHWC with symmetric explicit padding = dilation * (k - 1) / 2 (never 'SAME').

  Params 'kernel' [k, k, in, out] (HWIO) and optionally 'bias' [out], both float32.
  init_mode: 'torch' (PyTorch default uniform, weights and bias) or 'kaiming' (fan_out normal, bias 0).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  init_mode: str = "torch"
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    k, d = self.kernel_size, self.dilation
    pad = d * (k - 1) // 2
    fan_in = x.shape[-1] * k * k
    kernel_init = torch_uniform_init(fan_in) if self.init_mode == "torch" else kaiming_fan_out
    kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (self.stride, self.stride), [(pad, pad), (pad, pad)],
        rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias_init = torch_uniform_init(fan_in) if self.init_mode == "torch" else nn.initializers.zeros
      bias = self.param("bias", bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class Dense(nn.Module):
  """Linear layer on the last axis with PyTorch's default init: 'kernel' [in, out], 'bias' [out]."""
  features: int
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    init = torch_uniform_init(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", init, (self.features,), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-variance rule.

  Train mode normalizes with the batch mean and biased variance (float32) and updates
  running stats with momentum (Flax convention, 0.9 = PyTorch 0.1), the variance term
  being the unbiased n/(n-1) one as PyTorch does (REFERENCE.md s.1, BN).
  `axis_name`: pmean the statistics over that mapped axis (n then counts all members).
  Params 'scale', 'bias'; batch_stats 'mean', 'var'.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    out_dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      axis_name = None if self.is_initializing() else self.axis_name
      n = math.prod(x.shape[:-1])
      mean = jnp.mean(xf, axes)
      if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
        n = n * jax.lax.psum(1, axis_name)
      if not self.is_initializing():
        # PyTorch refuses n == 1 in training; we keep the biased value there instead of dividing by 0.
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * mul + bias).astype(out_dtype)


class ConvBNReLU(nn.Module):
  """Conv -> BatchNorm -> ReLU (ReLU optional), names 'conv' and 'bn'."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  relu: bool = True
  init_mode: str = "torch"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.features, self.kernel_size, self.stride, self.dilation, self.use_bias, self.init_mode,
             self.dtype, name="conv")(x)
    x = BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x) if self.relu else x


def channel_dropout(rate: float, name: str) -> nn.Dropout:
  """Dropout2d: one keep/drop decision per (sample, channel), shared over H and W (NHWC)."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), rng_collection="dropout", name=name)


def max_pool_ceil(x, window: int = 3, stride: int = 2, padding: int = 1):
  """PyTorch MaxPool2d(window, stride, padding, ceil_mode=True) on NHWC, -inf padding.

  Ceil mode adds padding after so the last window starts inside the (left-padded) input:
  400 -> 201 (pads (1, 2)), 257 -> 129 (pads (1, 1)).
  """
  pads = []
  for size in x.shape[1:3]:
    out = -(-(size + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= size + padding:   # PyTorch drops a window that starts in the right pad
      out -= 1
    extra = max((out - 1) * stride + window - size - padding, 0)
    pads.append((padding, extra))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
