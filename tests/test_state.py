"""dgcl_jax/state.py: the float16 loss scale, the initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgcl_jax import state as state_lib
from tests.tiny import tiny_config


def test_loss_scale_follows_torch_grad_scaler():
  """make_loss_scale gives the scales of torch's GradScaler over finite and overflowing steps."""
  torch = pytest.importorskip("torch")
  config = tiny_config("dgcl")
  config.optim.loss_scale_init = 2.0 ** 4
  config.optim.loss_scale_growth_interval = 3
  overflow = [False, False, False, False, True, False, False, True, True, False, False, False, False, False,
              False, False]
  p = torch.ones(2, requires_grad=True)
  opt = torch.optim.SGD([p], lr=0.1)
  scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=3)
  ls = state_lib.make_loss_scale(config)
  step = jax.jit(lambda ls, x: ls.value_and_grad(lambda q: jnp.sum(q * x))(jnp.ones(2)))
  torch_scales, ours = [], []
  for bad in overflow:
    x = [float("inf") if bad else 1.0, 2.0]
    opt.zero_grad()
    scaler.scale(torch.sum(p * torch.tensor(x))).backward()
    scaler.step(opt)
    scaler.update()
    torch_scales.append(scaler.get_scale())
    ls, finite, _, _ = step(ls, jnp.asarray(x))
    assert bool(finite) == (not bad)
    ours.append(float(ls.scale))
  assert torch_scales == ours
  assert len(set(ours)) > 2   # the sequence both grew and shrank


