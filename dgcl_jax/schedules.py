"""Learning-rate, optimizer, EMA and epoch-progress schedules (REFERENCE.md section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def poly_lr(base_lr, max_iter, power=0.9):
  """optax schedule base_lr x (1 - i / max_iter)^power, i counted from 0 (0 past max_iter)."""
  def schedule(step):
    frac = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max_iter, 0.0, 1.0)
    return base_lr * frac ** power
  return schedule


def _group(path) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  # Tolerate a tree still wrapped in its Flax 'params' collection.
  if len(keys) > 1 and keys[0] == "params":
    keys = keys[1:]
  return "backbone" if keys and keys[0] == "backbone" else "head"


def param_labels(params):
  """'backbone' for leaves under the top-level key 'backbone', 'head' for the rest."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _group(path), params)


def _sgd(lr_schedule, momentum, weight_decay):
  # PyTorch SGD: g + wd x p, then buf = momentum x buf + g (no dampening), p -= lr x buf.
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(lr_schedule),
  )


def _adamw(lr_schedule, betas, eps, weight_decay):
  # PyTorch AdamW: p *= 1 - lr x wd, then p -= lr x m_hat / (sqrt(v_hat) + eps), with m, v the
  # bias-corrected moments of the raw gradient; optax's adamw is the same update (decay on the old p).
  b1, b2 = (float(b) for b in betas)
  return optax.adamw(lr_schedule, b1=b1, b2=b2, eps=float(eps), eps_root=0.0, weight_decay=float(weight_decay))


def make_optimizer(config, max_iter):
  """Poly lr, the backbone at optim.base_lr and every other top-level module (decoder, DPT head, rep
  head, aux) at base_lr x optim.decoder_lr_mult. optim.name 'sgd': SGD with momentum and weight decay
  on every parameter (DGCL, REFERENCE.md s.3); 'adamw': AdamW with optim.betas, eps and decoupled
  weight decay on every parameter (UniMatch V2's optimizer for the DINOv2 DPT)."""
  o = config.optim
  backbone_lr = poly_lr(o.base_lr, max_iter, o.poly_power)
  head_lr = poly_lr(o.base_lr * o.decoder_lr_mult, max_iter, o.poly_power)
  name = o.get("name", "sgd")
  if name == "adamw":
    make = lambda lr: _adamw(lr, o.betas, o.eps, o.weight_decay)
  elif name == "sgd":
    make = lambda lr: _sgd(lr, o.momentum, o.weight_decay)
  else:
    raise ValueError(f"config.optim.name={name!r}: expected sgd or adamw")
  return optax.multi_transform({"backbone": make(backbone_lr), "head": make(head_lr)}, param_labels)


def learning_rates(config, max_iter, step):
  """(backbone_lr, head_lr) at `step`, for logging."""
  o = config.optim
  lr = poly_lr(o.base_lr, max_iter, o.poly_power)(step)
  return lr, lr * o.decoder_lr_mult


def ema_decay(step, iters_per_epoch, sup_only_epochs, base_decay=0.999):
  """min(1 - 1 / (i - L x S + 1), base_decay); 0 before the first semi-supervised step."""
  i = jnp.asarray(step, jnp.float32) - iters_per_epoch * sup_only_epochs + 1.0
  return jnp.minimum(1.0 - 1.0 / jnp.maximum(i, 1.0), base_decay)


def ema_update(teacher_params, student_params, decay):
  """decay x teacher + (1 - decay) x student, leaf by leaf (keeps the teacher's dtypes)."""
  def one(t, s):
    return (decay * t + (1.0 - decay) * s).astype(t.dtype)
  return jax.tree_util.tree_map(one, teacher_params, student_params)


def teacher_reset_active(step, iters_per_epoch, sup_only_epochs, enabled=True):
  """True throughout the first semi-supervised epoch, where the reference sets the teacher's
  parameters to the student's at the start of every step (quirk s.3 step 11)."""
  start = iters_per_epoch * sup_only_epochs
  step = jnp.asarray(step)
  return jnp.logical_and(jnp.asarray(enabled), (step >= start) & (step < start + iters_per_epoch))


def epoch_progress(epoch, num_epochs, sup_only_epochs):
  """p = (epoch - sup_only) / (num_epochs - sup_only)."""
  return (epoch - sup_only_epochs) / max(num_epochs - sup_only_epochs, 1)


def drop_percent(p, r=20.0):
  """Pseudo-label drop share r x (1 - p), no floor (s.3 step 2)."""
  return r * (1.0 - p)


def contrastive_percent(p, a=80.0, floor=10.0):
  """Contrastive-label share max(a x (1 - p), floor) (s.3 step 7)."""
  return jnp.maximum(a * (1.0 - p), floor)
