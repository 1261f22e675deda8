"""The jit-compiled train and eval steps over a device mesh.

Data parallelism is GSPMD: `train_step` is written for the GLOBAL batch and jit-compiled
with the batch sharded over the mesh's 'data' axis and the state replicated. So BatchNorm
statistics (student and teacher) are over the global batch, as the reference's SyncBN, and
the memory bank is updated from all devices' features and stays replicated.

The reference computes some statistics per device (REFERENCE.md section 3, "Per-device
statistics"): the entropy quantiles, CutMix pairing, OHEM, the unsupervised normalization
and the contrastive loss. Here the global batch is cut into `config.num_slices` slices
(default: the reference's device count) and those pieces are `vmap`ped over slices, so the
numbers do not depend on how many devices run.

The semi-supervised step follows REFERENCE.md s.3's list: teacher targets (steps 1-3, 7), the
student's losses (4-6, 8-9), the bank update (10), the optimizer update, the teacher's EMA (11).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgcl_jax import dgcl
from dgcl_jax import evaluation
from dgcl_jax import losses
from dgcl_jax import runtime
from dgcl_jax import schedules
from dgcl_jax.data import assemble
from dgcl_jax.state import Parts, TrainState


def _slices(x, num_slices: int):
  """[B, ...] -> [S, B / S, ...]: slice s holds the rows of reference device s."""
  return x.reshape((num_slices, x.shape[0] // num_slices) + x.shape[1:])


def _unslice(x):
  return x.reshape((-1,) + x.shape[2:])


def _scaled_gradient(value, scale):
  """`value` in the forward pass, `scale` x its gradient in the backward pass."""
  return jax.lax.stop_gradient(value) + scale * (value - jax.lax.stop_gradient(value))


def _where_tree(pred, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


class Targets(NamedTuple):
  """What the teacher gives the semi-supervised step (no gradient); [B, H, W] at crop size
  unless noted. contrast_labels [S, 2B / S, h, w] at feature size, None without DGCL."""
  teacher_batch_stats: Any
  pseudo: jax.Array            # [S, B / S, H, W] pseudo labels of the unmixed unlabeled images
  mixed_images: jax.Array      # [B, H, W, 3]
  mixed_pseudo: jax.Array
  mixed_ignore: jax.Array
  contrast_labels: Any


class StudentOut(NamedTuple):
  """The student's loss function's auxiliary outputs."""
  batch_stats: Any
  metrics: dict
  fts: Any          # [2B, h, w, Cf] f32 of [labeled; unlabeled], DGCL only
  rep: Any
  density: Any      # [S, 2B / S, h, w] f32 the loss computed (NaN elsewhere), DGCL only


class StepFunctions:
  """The jitted step functions of one run, over `mesh`, built from `parts` (state.Parts)."""

  def __init__(self, parts: Parts, mesh):
    self.parts = parts
    self.config = parts.config
    self.steps_per_epoch = parts.steps_per_epoch
    self.max_iter = parts.max_iter
    self.student, self.teacher, self.optimizer = parts.student, parts.teacher, parts.optimizer
    self.ignore_label = int(self.config.data.ignore_label)
    self.dgcl_settings = dgcl.LossSettings.from_config(self.config)
    self.normalization = assemble.normalization(self.config.data.mean, self.config.data.std)
    self.mesh = mesh
    self.replicated = runtime.replicated(mesh)
    self.batch_sharding = runtime.batch_sharding(mesh)
    self.train_step = jax.jit(self._train_step, static_argnames=("semi",), donate_argnums=(0,),
                              out_shardings=(self.replicated, self.replicated, self.replicated))
    # Student and teacher variables both go through the float32 teacher build: one program.
    self.eval_step = jax.jit(self._eval_step)
    self.predict = jax.jit(self._predict)

  # -- the training step ----------------------------------------------------

  def _train_step(self, state: TrainState, batch: dict[str, jax.Array], semi: bool):
    """One optimizer step on the global batch -> (state, metrics, summary).

    batch: the pipeline's compact batch (uint8 source windows, finished into float32 crops
    here: data/assemble.py), or the crops themselves: 'labeled_image' [B, H, W, 3],
    'labeled_label' [B, H, W], 'unlabeled_image' [B, H, W, 3], 'unlabeled_ignore' [B, H, W]
    (ignore_label = padding), 'unlabeled_label' [B, H, W] only with
    config.loss.pseudo_labels='ground_truth'. `semi` (static): the semi-supervised step, else
    the supervised-epoch one (the only one of method 'supervised').
    """
    batch = assemble.train_batch(batch, *self.normalization)
    keys = dict(zip(("teacher", "student", "cutmix", "contrast", "bank"),
                    jax.random.split(jax.random.fold_in(state.rng, state.step), 8)[:5]))
    reset = self._teacher_reset(state.step, semi)
    # Quirk (REFERENCE s.3 step 11): through the first semi-supervised epoch the teacher's
    # parameters are overwritten by the student's at the start of every step.
    teacher_params = _where_tree(reset, state.params, state.teacher_params)
    summary = {}
    if semi:
      targets = self.teacher_targets(state, teacher_params, batch, keys)                 # 1-3, 7
      loss_fn = functools.partial(self.semi_loss, state, batch, targets, keys)           # 4-6, 8-9
      summary = {"unlabeled_image": batch["unlabeled_image"][:1], "pseudo_label": targets.pseudo[0, :1]}
    else:
      # Supervised epochs: the teacher runs on the labeled batch only to update its BN stats.
      _, stats = self._teacher_forward(teacher_params, state.teacher_batch_stats, batch["labeled_image"],
                                       keys["teacher"])
      targets = Targets(stats, None, None, None, None, None)
      loss_fn = functools.partial(self.supervised_loss, state, batch, keys)
    total, out, grads, loss_scale, finite = self._value_and_grad(loss_fn, state)
    bank = state.memory_bank
    if semi and self.config.method == "dgcl":
      bank = self.bank_update(bank, out, targets, batch["labeled_image"].shape[0], keys["bank"])  # 10
    params, opt_state, metrics = self.optimizer_update(state, grads, finite)
    if semi:
      teacher_params = self.teacher_ema(teacher_params, params, state.step, reset)                # 11
    metrics.update(out.metrics, total=total, grad_norm=optax.tree.norm(grads))
    if semi:
      metrics["bank_full"] = state.memory_bank.is_full().astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=out.batch_stats, teacher_params=teacher_params,
        teacher_batch_stats=targets.teacher_batch_stats, opt_state=opt_state, memory_bank=bank,
        loss_scale=loss_scale)
    return new_state, metrics, summary

  # -- phases ---------------------------------------------------------------

  def teacher_targets(self, state: TrainState, teacher_params, batch, keys) -> Targets:
    """Teacher forward, pseudo labels, CutMix and contrastive labels (s.3 steps 1-3, 7)."""
    cfg, s = self.config, self.config.num_slices
    labeled, unlabeled, ignore = batch["labeled_image"], batch["unlabeled_image"], batch["unlabeled_ignore"]
    b = labeled.shape[0]
    p = self.progress(state.step)
    # 1. Teacher on [labeled; unlabeled], training mode, float32, no gradient.
    t_out, teacher_batch_stats = self._teacher_forward(
        teacher_params, state.teacher_batch_stats, jnp.concatenate([labeled, unlabeled]), keys["teacher"])
    t_logits_u = t_out["pred"][b:]
    # 2. Pseudo labels at crop size, entropy filtered per slice.
    if cfg.loss.pseudo_labels == "ground_truth":  # diagnostic upper bound (config_base)
      pseudo = _slices(batch["unlabeled_label"], s)
    else:
      fn = functools.partial(losses.pseudo_labels, method=cfg.loss.quantile_method, ignore_label=self.ignore_label)
      pseudo = jax.vmap(fn, in_axes=(0, 0, None))(_slices(t_logits_u, s), _slices(ignore, s),
                                                  schedules.drop_percent(p, cfg.loss.drop_percent))
    # 3. CutMix within each slice; one coin for the whole step by default (quirk, s.3 step 3).
    mixed = losses.cutmix_slices(keys["cutmix"], _slices(unlabeled, s), pseudo, _slices(ignore, s),
                                 prob=cfg.loss.cutmix_prob, shared_coin=cfg.loss.cutmix_coin == "step")
    contrast_labels = None
    if cfg.method == "dgcl":
      # 7. Contrastive labels at feature resolution (unmixed unlabeled images).
      percent = schedules.contrastive_percent(p, cfg.loss.contrastive_percent, cfg.loss.contrastive_percent_min)
      fn = functools.partial(losses.contrastive_labels, method=cfg.loss.quantile_method,
                             ignore_label=self.ignore_label)
      contrast_labels = jax.vmap(fn, in_axes=(0, 0, 0, None))(
          _slices(batch["labeled_label"], s), _slices(t_logits_u, s), _slices(ignore, s), percent)
    return Targets(teacher_batch_stats, pseudo, *map(_unslice, mixed), contrast_labels)

  def supervised_loss(self, state: TrainState, batch, keys, params):
    """(loss, StudentOut) of the supervised epochs: the student on the labeled batch only."""
    out, new_stats = self._student_forward(params, state.batch_stats, batch["labeled_image"], keys["student"])
    sup = self._sup_loss(out["pred"], out.get("aux"), batch["labeled_label"])
    zero = jnp.zeros(())
    return sup, StudentOut(new_stats, {"sup": sup, "unsup": zero, "contrastive": zero}, None, None, None)

  def semi_loss(self, state: TrainState, batch, targets: Targets, keys, params):
    """(loss, StudentOut): supervised + unsupervised (+ contrastive) losses (s.3 steps 4-6, 8-9)."""
    cfg, s = self.config, self.config.num_slices
    labeled, labels = batch["labeled_image"], batch["labeled_label"]
    b = labeled.shape[0]
    # 4. One student forward on [labeled; unlabeled; mixed unlabeled].
    images = jnp.concatenate([labeled, batch["unlabeled_image"], targets.mixed_images])
    out, new_stats = self._student_forward(params, state.batch_stats, images.astype(jnp.dtype(cfg.model.dtype)),
                                           keys["student"])
    pred, aux = out["pred"], out.get("aux")
    # 5. Supervised loss on the labeled part.
    sup = self._sup_loss(pred[:b], None if aux is None else aux[:b], labels)

    # 6. Unsupervised loss on the mixed part, per slice (quirky normalization).
    def unsup_one(logits, target, ign):
      logits = losses.resize_logits(logits, labels.shape[1:3])
      return losses.unsup_cross_entropy(logits, target, ign, scale_quirk=cfg.loss.unsup_scale_quirk,
                                        ignore_label=self.ignore_label)
    unsup = jnp.mean(jax.vmap(unsup_one)(_slices(pred[2 * b:], s), _slices(targets.mixed_pseudo, s),
                                         _slices(targets.mixed_ignore, s)))
    total = sup + cfg.loss.unsup_weight * unsup
    contrastive = jnp.zeros(())
    fts = rep = density = None
    if cfg.method == "dgcl":
      fts, rep = out["fts"][:2 * b].astype(jnp.float32), out["rep"][:2 * b].astype(jnp.float32)
      contrastive, density = self._contrastive(state.memory_bank, rep, fts, targets.contrast_labels, b,
                                               keys["contrast"])
      # 9. Quirk: the contrastive gradient weight is 0.5 / W of the slice mean (REFERENCE s.3).
      grad_scale = (1.0 / s) if cfg.loss.contrastive_grad_quirk else 1.0
      total = total + cfg.loss.contrastive_weight * _scaled_gradient(contrastive, grad_scale)
    metrics = {"sup": sup, "unsup": unsup, "contrastive": contrastive}
    return total, StudentOut(new_stats, metrics, fts, rep, density)

  def _contrastive(self, bank: dgcl.MemoryBank, rep, fts, labels, b: int, rng):
    """8. Density-guided contrastive loss per slice once the bank is full -> (slice mean, density)."""
    s = self.config.num_slices

    def per_slice(x):  # [2B, ...] -> [S, 2B / S, ...]: slice s holds its labeled then unlabeled rows
      return jnp.concatenate([_slices(x[:b], s), _slices(x[b:], s)], axis=1)

    def contrast(args):
      per, density = dgcl.dgcl_loss_slices(*args, labels, bank, jax.random.split(rng, s), self.dgcl_settings,
                                           return_density=True)
      return jnp.mean(per), jax.lax.stop_gradient(density)

    def no_contrast(_):
      return jnp.zeros(()), jnp.full(labels.shape, jnp.nan, jnp.float32)

    return jax.lax.cond(bank.is_full(), contrast, no_contrast, (per_slice(rep), per_slice(fts)))

  def bank_update(self, bank: dgcl.MemoryBank, out: StudentOut, targets: Targets, b: int, rng):
    """10. Memory bank update from the whole global batch's features and contrastive labels."""
    g, s = self.config.dgcl, self.config.num_slices

    # Rows in the order of the reference's all-gather: [labeled_0; unlabeled_0; labeled_1; ...].
    def per_slice_order(x):
      return _unslice(jnp.concatenate([_slices(x[:b], s), _slices(x[b:], s)], axis=1))
    # The loss has just computed, against this same bank and ks, the density of most pixels
    # the update draws: it reuses those (same values) and computes only the others.
    return bank.update(jax.lax.stop_gradient(per_slice_order(out.fts)),
                       jax.lax.stop_gradient(per_slice_order(out.rep)), _unslice(targets.contrast_labels),
                       rng, max_new_per_class=g.max_new_per_class, density_min_entries=g.density_min_entries,
                       ks=tuple(g.ks), density=_unslice(out.density) if g.share_density else None)

  def optimizer_update(self, state: TrainState, grads, finite):
    """(params, opt_state, metrics) after the optimizer step; a float16 student's non-finite
    gradient skips it (parameters and momentum stay), as the reference's GradScaler; the step
    counter, the schedules' counts, BN statistics, the EMA and the bank still advance (REFERENCE s.3)."""
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    backbone_lr, head_lr = schedules.learning_rates(self.config, self.max_iter, state.step)
    metrics = {"lr_backbone": backbone_lr, "lr_head": head_lr}
    if self.config.model.dtype == "float16":
      params = _where_tree(finite, params, state.params)
      opt_state = jax.tree_util.tree_map(
          lambda new, old: new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old),
          opt_state, state.opt_state)
      metrics["loss_scale"] = state.loss_scale.scale
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    # A non-finite update shows here before the parameters can reach a checkpoint.
    metrics["params_finite"] = jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])).astype(jnp.float32)
    return params, opt_state, metrics

  def teacher_ema(self, teacher_params, params, step, reset):
    """11. EMA of parameters only (BN statistics are not averaged)."""
    cfg = self.config
    decay = schedules.ema_decay(step, self.steps_per_epoch, cfg.sup_only_epochs, cfg.ema.decay)
    teacher_params = schedules.ema_update(teacher_params, params, decay)
    # In the reference the reset makes the teacher share the student's storage, so the
    # optimizer step moves both: the teacher ends the step equal to the updated student.
    return _where_tree(reset, params, teacher_params)

  # -- helpers --------------------------------------------------------------

  def progress(self, step):
    """Epoch progress p of the schedules (REFERENCE s.3), from the traced step."""
    cfg = self.config
    return schedules.epoch_progress(step // self.steps_per_epoch, cfg.num_epochs, cfg.sup_only_epochs)

  def _teacher_reset(self, step, semi: bool):
    if not (semi and self.config.ema.first_epoch_reset):
      return jnp.asarray(False)
    return schedules.teacher_reset_active(step, self.steps_per_epoch, self.config.sup_only_epochs)

  def _student_forward(self, params, batch_stats, images, rng):
    out, mutated = self.student.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return out, mutated["batch_stats"]

  def _teacher_forward(self, params, batch_stats, images, rng):
    out, mutated = self.teacher.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    out = jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), out)
    return out, mutated["batch_stats"]

  def _sup_loss(self, pred, aux, labels):
    """Per-slice supervised loss (OHEM is per device in the reference), averaged over slices."""
    cfg, s = self.config, self.config.num_slices
    fn = functools.partial(losses.supervised_loss, ohem=cfg.loss.ohem, aux_weight=cfg.loss.aux_weight,
                           thresh=cfg.loss.ohem_thresh, min_kept=cfg.loss.ohem_min_kept,
                           ignore_label=self.ignore_label)
    if aux is None:
      per_slice = jax.vmap(lambda p, l: fn(p, l, aux_logits=None))(_slices(pred, s), _slices(labels, s))
    else:
      per_slice = jax.vmap(lambda p, a, l: fn(p, l, aux_logits=a))(
          _slices(pred, s), _slices(aux, s), _slices(labels, s))
    return jnp.mean(per_slice)

  def _value_and_grad(self, loss_fn, state: TrainState):
    """(total, aux, grads, loss_scale, finite) of loss_fn(params) -> (total, aux).

    With a float16 student the loss is scaled by the dynamic loss scale and the gradients
    unscaled; `finite` tells whether they are usable (otherwise the update is skipped).
    """
    if self.config.model.dtype != "float16":
      (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return total, aux, grads, state.loss_scale, jnp.asarray(True)
    loss_scale, finite, (total, aux), grads = state.loss_scale.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return total, aux, grads, loss_scale, finite

  # -- evaluation -----------------------------------------------------------

  def _eval_step(self, variables, images, labels):
    """Confusion matrix [K, K] (rows: truth) of one batch, logits resized to the label size.
    variables: the student's or the teacher's {'params', 'batch_stats'}, scored in float32."""
    return evaluation.confusion_from_model(self.teacher, variables, images, labels,
                                           self.config.model.num_classes, ignore_label=self.ignore_label)

  def _predict(self, variables, images):
    """Eval-mode float32 logits [B, H, W, K] of either network's variables at the images' size."""
    logits = self.teacher.apply(variables, images, train=False)["pred"].astype(jnp.float32)
    return losses.resize_logits(logits, images.shape[1:3])


def variables_of(state: TrainState, teacher: bool) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the student or the teacher."""
  if teacher:
    return {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
  return {"params": state.params, "batch_stats": state.batch_stats}
