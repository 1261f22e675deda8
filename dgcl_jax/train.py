"""Training: the TrainState, one jit-compiled `train_step` over a device mesh, and the loop.

Data parallelism is GSPMD: `train_step` is written for the GLOBAL batch and jit-compiled
with the batch sharded over the mesh's 'data' axis and the state replicated. So BatchNorm
statistics (student and teacher) are over the global batch, as the reference's SyncBN, and
the memory bank is updated from all devices' features and stays replicated.

The reference computes some statistics per device (REFERENCE.md section 3, "Per-device
statistics"): the entropy quantiles, CutMix pairing, OHEM, the unsupervised normalization
and the contrastive loss. Here the global batch is cut into `config.num_slices` slices
(default: the reference's device count) and those pieces are `vmap`ped over slices, so the
numbers do not depend on how many devices run.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
from flax.training import dynamic_scale

from dgcl_jax import checkpointing
from dgcl_jax import config_base
from dgcl_jax import dgcl
from dgcl_jax import evaluation
from dgcl_jax import losses
from dgcl_jax import models
from dgcl_jax import schedules
from dgcl_jax import summaries
from dgcl_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpointed whole."""
  step: jax.Array                 # int32 [], optimizer steps taken
  params: Any                     # student parameters
  batch_stats: Any                # student BN running statistics
  teacher_params: Any             # EMA of the student's parameters
  teacher_batch_stats: Any        # the teacher's own BN statistics (never averaged)
  opt_state: Any
  memory_bank: dgcl.MemoryBank
  rng: jax.Array                  # raw uint32 [2] key; step keys are fold_in(rng, step)
  loss_scale: dynamic_scale.DynamicScale   # float16 student only (scale and finite-step count)


# ----------------------------------------------------------------------------- set-up


def teacher_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher runs in float32 whatever the student's compute dtype (REFERENCE s.3)."""
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.dtype = "float32"
  return cfg


def max_iterations(config, steps_per_epoch: int) -> int:
  return int(config.num_epochs) * int(steps_per_epoch)


def make_loss_scale(config) -> dynamic_scale.DynamicScale:
  """Dynamic loss scale as the reference's GradScaler (REFERENCE s.3 step 1): start
  optim.loss_scale_init, halve on a non-finite gradient (the step is skipped), double after
  optim.loss_scale_growth_interval finite steps in a row. Used with model.dtype='float16'."""
  o = config.optim
  # Flax grows on the step that finds `growth_interval` finite steps behind it, the
  # GradScaler after the `growth_interval`-th finite step: one less here gives the same scales.
  return dynamic_scale.DynamicScale(
      growth_factor=2.0, backoff_factor=0.5, growth_interval=int(o.loss_scale_growth_interval) - 1,
      fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(o.loss_scale_init, jnp.float32))


def _init_variables(module, rng, crop: int):
  variables = models.init_variables(module, rng, crop)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(config, rng: jax.Array, *, load_pretrained: bool = True) -> TrainState:
  """Initial state: student and teacher initialized separately, empty memory bank."""
  student = models.build(config.model)
  teacher = models.build(teacher_model_config(config.model))
  steps = pipeline.steps_per_epoch(config)
  optimizer = schedules.make_optimizer(config, max_iterations(config, steps))
  init_crop = 65  # any size works for init; small keeps it cheap
  student_rng, teacher_rng, state_rng = jax.random.split(rng, 3)
  student_vars = _init_variables(student, student_rng, init_crop)
  teacher_vars = _init_variables(teacher, teacher_rng, init_crop)
  pretrained = config_base.pretrained_dir(config) if load_pretrained else None
  if pretrained:
    from dgcl_jax import convert  # pylint: disable=g-import-not-at-top
    student_vars = convert.load_pretrained(pretrained, student_vars)
    teacher_vars = convert.load_pretrained(pretrained, teacher_vars)
  if config.method == "dgcl":
    bank = dgcl.MemoryBank.create(config.model.num_classes, config.dgcl.bank_capacity,
                                  config.model.decoder_channels, config.model.rep_dim)
  else:  # keeps the state's structure uniform at negligible cost
    bank = dgcl.MemoryBank.create(config.model.num_classes, 1, 1, 1)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=student_vars["params"], batch_stats=student_vars["batch_stats"],
      teacher_params=teacher_vars["params"], teacher_batch_stats=teacher_vars["batch_stats"],
      opt_state=optimizer.init(student_vars["params"]),
      memory_bank=bank, rng=state_rng, loss_scale=make_loss_scale(config))


def compilation_cache_dir(config) -> str | None:
  """Where jax's persistent compilation cache lives for this run; None when the trainer sets none.

  config.compilation_cache_dir: '' = jax's own setting if any (JAX_COMPILATION_CACHE_DIR), else
  $XDG_CACHE_HOME (else ~/.cache)/dgcl_jax/jax_cache; 'none' = the trainer sets no cache (jax's own
  setting still applies); else that directory.
  """
  value = str(config.get("compilation_cache_dir", "") or "").strip()
  if value.lower() == "none":
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dgcl_jax", "jax_cache")


_CACHE_HITS = [0, False]   # persistent-cache hits in this process (jax.monitoring), listener registered


def _count_cache_hit(event: str, **kwargs):  # pylint: disable=unused-argument
  if event == "/jax/compilation_cache/cache_hits":
    _CACHE_HITS[0] += 1


def compilation_cache_hits() -> int:
  """Persistent compilation cache hits in this process since `setup_compilation_cache`."""
  return _CACHE_HITS[0]


def setup_compilation_cache(config) -> str | None:
  """Turns on jax's persistent compilation cache (compilation_cache_dir), so that a resumed
  or repeated run loads its compiled steps instead of compiling them again. Returns the directory."""
  path = compilation_cache_dir(config)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache %s unusable (%s): compiling without it", path, e)
    return None
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()   # jax keeps the first directory it opened otherwise
    jax.config.update("jax_compilation_cache_dir", path)
  # The steps take seconds to minutes to compile; below jax's 1 s default, mid-size programs count too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    min(0.5, jax.config.jax_persistent_cache_min_compile_time_secs))
  if not _CACHE_HITS[1]:
    jax.monitoring.register_event_listener(_count_cache_hit)
    _CACHE_HITS[1] = True
  return path


class _FirstStepLog:
  """Logs how long each kind of train step (supervised / semi) took to compile and run the first time."""

  def __init__(self):
    self.seen = set()

  @staticmethod
  def now():
    return time.perf_counter(), _CACHE_HITS[0]

  def __call__(self, semi: bool, metrics, started):
    """After train_step(semi=semi) returned `metrics`; `started` = now() before the call."""
    if semi in self.seen:
      return
    self.seen.add(semi)
    jax.block_until_ready(metrics)
    source = "loaded from the compilation cache" if _CACHE_HITS[0] > started[1] else "compiled"
    logging.info("first %s step %s and ran in %.1f s", "semi-supervised" if semi else "supervised",
                 source, time.perf_counter() - started[0])


# ----------------------------------------------------------------------------- the step


def dgcl_loss_kwargs(config) -> dict[str, Any]:
  """Keyword arguments of `dgcl.dgcl_loss` from the config."""
  g = config.dgcl
  return dict(temperature=g.temperature, ks=tuple(g.ks), num_anchors=g.num_anchors,
              num_positives=g.num_positives, max_pixels=g.max_pixels, num_negatives=g.num_negatives,
              ignore_classes=tuple(g.ignore_classes), ignore_label=config.data.ignore_label)


def _slices(x, num_slices: int):
  """[B, ...] -> [S, B / S, ...]: slice s holds the rows of reference device s."""
  return x.reshape((num_slices, x.shape[0] // num_slices) + x.shape[1:])


def _unslice(x):
  return x.reshape((-1,) + x.shape[2:])


def _scaled_gradient(value, scale):
  """`value` in the forward pass, `scale` x its gradient in the backward pass."""
  return jax.lax.stop_gradient(value) + scale * (value - jax.lax.stop_gradient(value))


class StepFunctions:
  """Static parts of training (modules, optimizer, schedules) and the jitted step functions."""

  def __init__(self, config, mesh: Mesh, steps_per_epoch: int):
    self.config = config
    self.mesh = mesh
    self.steps_per_epoch = int(steps_per_epoch)
    self.max_iter = max_iterations(config, steps_per_epoch)
    self.student = models.build(config.model)
    self.teacher = models.build(teacher_model_config(config.model))
    self.optimizer = schedules.make_optimizer(config, self.max_iter)
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.train_step = jax.jit(self._train_step, static_argnames=("semi",), donate_argnums=(0,),
                              out_shardings=(self.replicated, self.replicated, self.replicated))
    self.eval_step = jax.jit(self._eval_step, static_argnames=("use_teacher",))

  # -- helpers --------------------------------------------------------------

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

  def _supervised_loss(self, pred, aux, labels):
    """Per-slice supervised loss (OHEM is per device in the reference), averaged over slices."""
    cfg, s = self.config, self.config.num_slices
    fn = functools.partial(losses.supervised_loss, ohem=cfg.loss.ohem, aux_weight=cfg.loss.aux_weight,
                           thresh=cfg.loss.ohem_thresh, min_kept=cfg.loss.ohem_min_kept)
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

  def progress(self, step):
    """Epoch progress p of the schedules (REFERENCE s.3), from the traced step."""
    cfg = self.config
    epoch = step // self.steps_per_epoch
    return schedules.epoch_progress(epoch, cfg.num_epochs, cfg.sup_only_epochs)

  # -- the training step ----------------------------------------------------

  def _train_step(self, state: TrainState, batch: dict[str, jax.Array], semi: bool):
    """One optimizer step on the global batch.

    batch: 'labeled_image' [B, H, W, 3], 'labeled_label' [B, H, W], 'unlabeled_image'
    [B, H, W, 3], 'unlabeled_ignore' [B, H, W] (255 = padding), 'unlabeled_label' [B, H, W] only with
    config.loss.pseudo_labels='ground_truth'. `semi` (static) selects the
    supervised-epoch step or the semi-supervised one.
    """
    cfg = self.config
    s = cfg.num_slices
    method = cfg.method
    semi = semi and method != "supervised"
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 8)
    k_teacher, k_student, k_cutmix, k_contrast, k_bank = keys[:5]
    labeled = batch["labeled_image"]
    labels = batch["labeled_label"]
    b = labeled.shape[0]
    step = state.step
    p = self.progress(step)

    teacher_params = state.teacher_params
    if semi and cfg.ema.first_epoch_reset:
      # Quirk (REFERENCE s.3 step 11): through the first semi-supervised epoch the teacher's
      # parameters are overwritten by the student's at the start of every step.
      reset = schedules.teacher_reset_active(step, self.steps_per_epoch, cfg.sup_only_epochs)
      teacher_params = jax.tree_util.tree_map(lambda t, st: jnp.where(reset, st, t),
                                              teacher_params, state.params)

    if not semi:
      # Supervised epochs: the teacher runs on the labeled batch only to update its BN stats.
      _, teacher_batch_stats = self._teacher_forward(teacher_params, state.teacher_batch_stats,
                                                     labeled, k_teacher)

      def loss_fn(params):
        out, new_stats = self._student_forward(params, state.batch_stats, labeled, k_student)
        sup = self._supervised_loss(out["pred"], out.get("aux"), labels)
        return sup, (new_stats, {"sup": sup})

      total, (new_stats, metrics), grads, loss_scale, finite = self._value_and_grad(loss_fn, state)
      metrics["unsup"] = jnp.zeros(())
      metrics["contrastive"] = jnp.zeros(())
      bank = state.memory_bank
      summary = {}
    else:
      unlabeled = batch["unlabeled_image"]
      ignore = batch["unlabeled_ignore"]
      crop_h, crop_w = labeled.shape[1:3]
      # 1. Teacher on [labeled; unlabeled], training mode, float32, no gradient.
      t_out, teacher_batch_stats = self._teacher_forward(
          teacher_params, state.teacher_batch_stats, jnp.concatenate([labeled, unlabeled]), k_teacher)
      t_logits_u = t_out["pred"][b:]
      # 2. Pseudo labels at crop size, entropy filtered per slice.
      if cfg.loss.pseudo_labels == "ground_truth":  # diagnostic upper bound (config_base)
        pseudo = _slices(batch["unlabeled_label"], s)
      else:
        drop = schedules.drop_percent(p, cfg.loss.drop_percent)
        pseudo = jax.vmap(functools.partial(losses.pseudo_labels, method=cfg.loss.quantile_method),
                          in_axes=(0, 0, None))(_slices(t_logits_u, s), _slices(ignore, s), drop)
      # 3. CutMix within each slice; one coin for the whole step by default (quirk, s.3 step 3).
      mixed_images, mixed_pseudo, mixed_ignore = losses.cutmix_slices(
          k_cutmix, _slices(unlabeled, s), pseudo, _slices(ignore, s), prob=cfg.loss.cutmix_prob,
          shared_coin=cfg.loss.cutmix_coin == "step")
      mixed_images, mixed_pseudo, mixed_ignore = map(_unslice, (mixed_images, mixed_pseudo, mixed_ignore))
      # 7. Contrastive labels at feature resolution (unmixed unlabeled images).
      use_dgcl = method == "dgcl"
      if use_dgcl:
        percent = schedules.contrastive_percent(p, cfg.loss.contrastive_percent,
                                                cfg.loss.contrastive_percent_min)
        contrast_labels = jax.vmap(
            functools.partial(losses.contrastive_labels, method=cfg.loss.quantile_method),
            in_axes=(0, 0, 0, None))(_slices(labels, s), _slices(t_logits_u, s), _slices(ignore, s), percent)
      bank_full = state.memory_bank.is_full()
      grad_scale = (1.0 / s) if cfg.loss.contrastive_grad_quirk else 1.0

      def loss_fn(params):
        # 4. One student forward on [labeled; unlabeled; mixed unlabeled].
        images = jnp.concatenate([labeled, unlabeled, mixed_images]).astype(
            jnp.dtype(cfg.model.dtype))
        out, new_stats = self._student_forward(params, state.batch_stats, images, k_student)
        pred = out["pred"]
        aux = out.get("aux")
        # 5. Supervised loss on the labeled part.
        sup = self._supervised_loss(pred[:b], None if aux is None else aux[:b], labels)
        # 6. Unsupervised loss on the mixed part, per slice (quirky normalization).
        def unsup_one(logits, target, ign):
          logits = losses.resize_logits(logits, (crop_h, crop_w))
          return losses.unsup_cross_entropy(logits, target, ign, scale_quirk=cfg.loss.unsup_scale_quirk)
        unsup = jnp.mean(jax.vmap(unsup_one)(_slices(pred[2 * b:], s), _slices(mixed_pseudo, s),
                                             _slices(mixed_ignore, s)))
        total = sup + cfg.loss.unsup_weight * unsup
        contrastive = jnp.zeros(())
        fts_lu = rep_lu = density = None
        if use_dgcl:
          # 8. Density-guided contrastive loss per slice, once the bank is full.
          fts_lu = out["fts"][:2 * b].astype(jnp.float32)
          rep_lu = out["rep"][:2 * b].astype(jnp.float32)
          rep_s = jnp.concatenate([_slices(rep_lu[:b], s), _slices(rep_lu[b:], s)], axis=1)
          fts_s = jnp.concatenate([_slices(fts_lu[:b], s), _slices(fts_lu[b:], s)], axis=1)
          loss_keys = jax.random.split(k_contrast, s)

          def contrast(args):
            rep_s, fts_s = args
            per_slice, density = dgcl.dgcl_loss_slices(
                rep_s, fts_s, contrast_labels, state.memory_bank, loss_keys, return_density=True,
                **dgcl_loss_kwargs(cfg))
            return jnp.mean(per_slice), jax.lax.stop_gradient(density)

          def no_contrast(_):
            return jnp.zeros(()), jnp.full(contrast_labels.shape, jnp.nan, jnp.float32)

          contrastive, density = jax.lax.cond(bank_full, contrast, no_contrast, (rep_s, fts_s))
          # 9. Quirk: the contrastive gradient weight is 0.5 / W of the slice mean (REFERENCE s.3).
          total = total + cfg.loss.contrastive_weight * _scaled_gradient(contrastive, grad_scale)
        metrics = {"sup": sup, "unsup": unsup, "contrastive": contrastive}
        return total, (new_stats, metrics, fts_lu, rep_lu, density)

      total, (new_stats, metrics, fts_lu, rep_lu, density), grads, loss_scale, finite = self._value_and_grad(
          loss_fn, state)
      bank = state.memory_bank
      if use_dgcl:
        # 10. Memory bank update from the whole global batch's features and contrastive labels.
        g = cfg.dgcl
        # Rows in the order of the reference's all-gather: [labeled_0; unlabeled_0; labeled_1; ...].
        def per_slice_order(x):
          return _unslice(jnp.concatenate([_slices(x[:b], s), _slices(x[b:], s)], axis=1))
        # The loss has just computed, against this same bank and ks, the density of most pixels
        # the update draws: it reuses those (same values) and computes only the others.
        bank = bank.update(jax.lax.stop_gradient(per_slice_order(fts_lu)),
                           jax.lax.stop_gradient(per_slice_order(rep_lu)), _unslice(contrast_labels),
                           k_bank, max_new_per_class=g.max_new_per_class,
                           density_min_entries=g.density_min_entries, ks=tuple(g.ks),
                           density=_unslice(density) if g.share_density else None)
      summary = {"unlabeled_image": unlabeled[:1], "pseudo_label": pseudo[0, :1]}
      metrics["bank_full"] = bank_full.astype(jnp.float32)

    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg.model.dtype == "float16":
      # A non-finite gradient skips the update (parameters and momentum stay), as the reference's
      # GradScaler; the step counter, the schedules' counts, BN statistics, the EMA and the bank
      # still advance (REFERENCE s.3).
      params = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), params, state.params)
      opt_state = jax.tree_util.tree_map(
          lambda new, old: new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old),
          opt_state, state.opt_state)
      metrics["loss_scale"] = state.loss_scale.scale
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    if semi:
      # 11. EMA of parameters only (BN statistics are not averaged).
      decay = schedules.ema_decay(step, self.steps_per_epoch, cfg.sup_only_epochs, cfg.ema.decay)
      teacher_params = schedules.ema_update(teacher_params, params, decay)
      if cfg.ema.first_epoch_reset:
        # In the reference the reset makes the teacher share the student's storage, so the
        # optimizer step moves both: the teacher ends the step equal to the updated student.
        teacher_params = jax.tree_util.tree_map(lambda t, st: jnp.where(reset, st, t), teacher_params, params)
    metrics["total"] = total
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A non-finite update shows here before the parameters can reach a checkpoint.
    metrics["params_finite"] = jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])).astype(jnp.float32)
    metrics["lr"] = schedules.poly_lr(cfg.optim.base_lr, self.max_iter, cfg.optim.poly_power)(step)
    new_state = state.replace(
        step=step + 1, params=params, batch_stats=new_stats, teacher_params=teacher_params,
        teacher_batch_stats=teacher_batch_stats, opt_state=opt_state, memory_bank=bank, loss_scale=loss_scale)
    return new_state, metrics, summary

  # -- evaluation -----------------------------------------------------------

  def _eval_step(self, state: TrainState, images, labels, use_teacher: bool):
    """Confusion matrix [K, K] (rows: truth) of one batch, logits resized to the label size."""
    if use_teacher:
      variables = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
    else:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    # Both are scored in float32 (self.teacher is the float32 build of the same network).
    return evaluation.confusion_from_model(self.teacher, variables, images, labels,
                                           self.config.model.num_classes)


# ----------------------------------------------------------------------------- the loop


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over 'data'."""
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
          for k, v in local.items()}


class _Preempted:
  """SIGTERM and SIGINT (Ctrl-C) become a flag the loop checks: save, then exit cleanly.

  A second SIGINT exits at once without saving (the previous checkpoint stays intact).
  """

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread
        pass

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      os.write(2, b"error: interrupted again: exiting without saving; rerun the same command to resume "
                  b"from the last checkpoint\n")
      os._exit(130)  # pylint: disable=protected-access
    logging.warning("%s received: saving a checkpoint and stopping%s.", name,
                    " (Ctrl-C again exits at once)" if signum == signal.SIGINT else "")
    self.requested, self.signal_name = True, name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class NonFiniteLossError(RuntimeError):
  pass


class RunEnvironmentError(RuntimeError):
  """The machine cannot do what the run needs (an unusable workdir, a full disk); one line."""


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def evaluate_state(fns: StepFunctions, state: TrainState, config, use_teacher: bool):
  """mIoU and per-class IoU of student or teacher on the validation set (center crops)."""
  conf = np.zeros((config.model.num_classes,) * 2, np.int64)
  batch_size = max(jax.device_count(), config.batch_size // max(1, config.num_slices))
  batch_size = int(math.ceil(batch_size / jax.device_count()) * jax.device_count())
  for item in pipeline.create_val_iterator(config, mode="center", batch_size=batch_size // jax.process_count(),
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    arrays = global_batch({"image": item["image"], "label": item["label"]}, fns.batch_sharding)
    conf += np.asarray(jax.device_get(fns.eval_step(state, arrays["image"], arrays["label"],
                                                    use_teacher=use_teacher)), np.int64)
  return evaluation.miou_from_confusion(conf)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the final metrics.

  A workdir with checkpoints resumes only with the config it was started with (its
  config.json; see `check_run_identity`); `allow_config_change` accepts a different one for
  a run that has not finished.
  """
  config_base.validate(config, num_devices=jax.device_count())
  if config.batch_size % jax.process_count():
    raise config_base.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the {jax.process_count()} processes")
  setup_compilation_cache(config)
  is_chief = jax.process_index() == 0
  prepare_workdir(workdir)
  resuming, changes = check_run_identity(config, workdir, allow_config_change)
  if not resuming:
    check_pretrained(config)
  pipeline.check_inputs(config)

  mesh = make_mesh()
  steps_per_epoch = pipeline.steps_per_epoch(config)
  fns = StepFunctions(config, mesh, steps_per_epoch)
  total_steps = fns.max_iter
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = summaries.Writer(workdir, enabled=is_chief)
  train_iter = None
  preempted = None
  failed = False

  def guarded_save(save_fn, step_now, *args):
    """A checkpoint save; a full disk or an unwritable workdir (also from orbax's background
    thread, which reports here at the next save or wait) becomes one RunEnvironmentError."""
    try:
      save_fn(step_now, *args)
    except Exception as e:  # pylint: disable=broad-except
      error = environment_failure(e, workdir, os.path.join(workdir, "checkpoints"))
      if error is e:
        raise
      raise error from None

  try:
    train_iter = pipeline.create_train_iterator(config, process_index=jax.process_index(),
                                                process_count=jax.process_count())
    abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(config.seed),
                                                          load_pretrained=False))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.replicated), abstract)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
      state, meta, data_state = restored
      if int(data_state.get("step", int(state.step))) != int(state.step):
        raise RuntimeError(f"checkpoint in {ckpt.directory} is inconsistent: train state at step "
                           f"{int(state.step)}, data iterator at step {data_state.get('step')}")
      train_iter.set_state(data_state)
      logging.info("Resumed from step %d in %s", int(state.step), ckpt.directory)
    else:
      if resuming:  # every checkpoint was set aside as damaged: this is a new run after all
        check_pretrained(config)
      state = jax.device_put(create_train_state(config, jax.random.PRNGKey(config.seed)), fns.replicated)
      meta = {"best_miou": -1.0, "best_step": -1, "history": []}
    start_step = int(state.step)
    if is_chief:
      record_run_config(config, workdir, new_run=restored is None, changes=changes, step=start_step)

    eval_every = max(1, int(config.eval_every_epochs)) if config.eval_every_epochs else 0
    last_saved = [start_step if restored is not None else -1]

    def save(state, meta):
      step_now = int(state.step)
      if step_now == last_saved[0]:
        return
      # Orbax serializes `meta` in a background thread: hand it a copy.
      guarded_save(ckpt.save, step_now, state, copy.deepcopy(meta), train_iter.get_state())
      last_saved[0] = step_now

    def save_and_wait(state, meta):
      if int(state.step) > 0:
        save(state, meta)
        guarded_save(lambda *_: ckpt.wait(), int(state.step))

    def evaluate(step, state, semi):
      """Evaluates student (and teacher), records it in meta, saves a new best checkpoint."""
      record = {"step": step, "epoch": step // steps_per_epoch}
      record["student_miou"], _ = evaluate_state(fns, state, config, use_teacher=False)
      if semi and config.method != "supervised":
        record["teacher_miou"], _ = evaluate_state(fns, state, config, use_teacher=True)
      else:
        record["teacher_miou"] = None
      best_now = max(record["student_miou"], record["teacher_miou"] or -1.0)
      logging.info("epoch %d evaluation: student mIoU %.4f%s", record["epoch"], record["student_miou"],
                   "" if record["teacher_miou"] is None else f", teacher mIoU {record['teacher_miou']:.4f}")
      writer.scalars(step, {"eval/student_miou": record["student_miou"]})
      if record["teacher_miou"] is not None:
        writer.scalars(step, {"eval/teacher_miou": record["teacher_miou"]})
      writer.eval_images(step, fns, state, config)
      meta["history"].append(record)
      meta.pop("eval_pending", None)
      if best_now > meta["best_miou"]:
        meta["best_miou"], meta["best_step"] = best_now, step
        if step == total_steps:
          meta["final"] = _final_result(meta, step)
        if step not in ckpt.steps("best"):
          guarded_save(ckpt.save_best, step, state, copy.deepcopy(meta), train_iter.get_state())
      if step == total_steps:
        meta["final"] = _final_result(meta, step)

    def evaluate_or_save_first(step, state, semi):
      """`evaluate`; a validation file that fails to load saves the train state first, the
      evaluation marked pending so that the rerun does it before training on."""
      try:
        evaluate(step, state, semi)
      except pipeline.DataError as e:
        meta["eval_pending"] = step
        save_and_wait(state, meta)
        raise pipeline.DataError(
            f"{e} (during the evaluation at step {step}; {_saved_note(ckpt.directory, step)})") from None

    if meta.get("eval_pending") == start_step and start_step > 0:
      # A data error interrupted this evaluation: run it before anything else.
      evaluate_or_save_first(start_step, state, (start_step - 1) // steps_per_epoch >= config.sup_only_epochs)

    if start_step >= total_steps:
      logging.info("Run already finished at step %d (of %d): nothing to train.", start_step, total_steps)
      result = meta.get("final") or {}
      _print_final(result)
      return result

    preempted = _Preempted()
    last_time, last_step = time.time(), start_step
    pending = None  # (step, metrics) of the previous step, fetched one step late

    def check_finite(step, metrics):
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      # A step the float16 loss scaler skipped may report non-finite losses; its parameters are kept.
      checked = {k: v for k, v in host.items() if not host.get("skipped") or k in ("params_finite", "loss_scale")}
      if not all(math.isfinite(v) for v in checked.values()) or host.get("params_finite", 1.0) != 1.0:
        if last_saved[0] >= 0:
          kept = (f"the last good checkpoint (step {last_saved[0]}) in {ckpt.directory} is kept; "
                  "rerunning the same command resumes from it")
        else:
          kept = "no checkpoint was saved before it (the run stopped before its first checkpoint)"
        raise NonFiniteLossError(f"non-finite loss at step {step}: {host}; {kept}")
      return host

    step = start_step
    first_step_log = _FirstStepLog()
    while step < total_steps:
      epoch = step // steps_per_epoch
      semi = epoch >= config.sup_only_epochs
      try:
        local = next(train_iter)
      except pipeline.DataError as e:
        # The state after `step` steps is good (its losses checked below): keep it.
        if pending is not None:
          check_finite(*pending)
        save_and_wait(state, meta)
        raise pipeline.DataError(f"{e} (at step {step + 1}; {_saved_note(ckpt.directory, step)})") from None
      batch = global_batch(local, fns.batch_sharding)
      started = first_step_log.now()
      state, metrics, summary = fns.train_step(state, batch, semi=semi)
      first_step_log(semi, metrics, started)
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      step += 1

      if step % config.log_every_steps == 0 or step == total_steps:
        host = check_finite(*pending)
        pending = None
        now = time.time()
        rate = (step - last_step) * config.batch_size * 2 / max(now - last_time, 1e-9)
        eta = (total_steps - step) * (now - last_time) / max(step - last_step, 1)
        last_time, last_step = now, step
        logging.info("epoch %d step %d/%d | sup %.4f unsup %.4f contrastive %.4f | lr %.2e | %.1f img/s | ETA %s",
                     epoch, step, total_steps, host["sup"], host["unsup"], host["contrastive"], host["lr"],
                     rate, _format_eta(eta))
        writer.scalars(step, {f"train/{k}": v for k, v in host.items()})
        writer.scalars(step, {"train/images_per_second": rate})
        if summary and config.image_summary_every_steps and step % config.image_summary_every_steps == 0:
          writer.train_images(step, summary, config)

      end_of_epoch = step % steps_per_epoch == 0
      if end_of_epoch and eval_every and ((step // steps_per_epoch) % eval_every == 0 or step == total_steps):
        if pending is not None:
          check_finite(*pending)
          pending = None
        evaluate_or_save_first(step, state, semi)
        save(state, meta)
      elif step % config.checkpoint_every_steps == 0 or step == total_steps:
        if pending is not None:
          check_finite(*pending)
          pending = None
        if step == total_steps:
          meta["final"] = _final_result(meta, step)
        save(state, meta)
      if preempted.requested:
        if pending is not None:
          check_finite(*pending)
        save(state, meta)
        guarded_save(lambda *_: ckpt.wait(), step)
        logging.warning("Stopped at step %d after %s; rerun the same command to resume.", step,
                        preempted.signal_name)
        return {"preempted": True, "step": step}

    result = meta["final"]
    _print_final(result)
    return result
  except BaseException:
    failed = True
    raise
  finally:
    if preempted is not None:
      preempted.restore()
    if train_iter is not None:
      train_iter.close()  # stops grain's workers (their shared memory) after an error as well
    errors = []
    for close in (writer.close, ckpt.wait, ckpt.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors and not failed:  # a failure already on its way out is the one to report
      error = environment_failure(errors[0], workdir)
      if error is errors[0]:
        raise error
      raise error from None


def _final_result(meta, step):
  last = meta["history"][-1] if meta["history"] else {}
  return {"step": step, "student_miou": last.get("student_miou"), "teacher_miou": last.get("teacher_miou"),
          "best_miou": meta["best_miou"], "best_step": meta["best_step"]}


def _print_final(result):
  if not result:
    return
  def fmt(v):
    return "n/a" if v is None else f"{100 * v:.2f}"
  msg = (f"final: student mIoU {fmt(result.get('student_miou'))}, teacher mIoU "
         f"{fmt(result.get('teacher_miou'))}, best {fmt(result.get('best_miou'))} at step {result.get('best_step')}")
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the run directory


def _os_reason(e: OSError) -> str:
  return f"{e.strerror or type(e).__name__}" + (f": {e.filename}" if e.filename else "")


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written there; RunEnvironmentError if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunEnvironmentError(f"--workdir={workdir} cannot be used: {_os_reason(e)}") from None


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints under workdir/checkpoints, from the folder names."""
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _stored_meta(workdir: str, step: int) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
      meta = json.load(f)
    return meta if isinstance(meta, dict) else {}
  except (OSError, ValueError):
    return {}


def check_run_identity(config, workdir: str, allow_config_change: bool = False):
  """(resuming, changes) for `config` in `workdir`, reading files only.

  resuming: the workdir holds checkpoints. changes: [(field, stored, requested)] where `config`
  differs from <workdir>/config.json in a field that changes the computation (all but
  config_base.FREE_FIELDS). Raises ConfigChangeError, nothing touched, if there are changes and
  not allow_config_change, or if the run has finished and `config` would train it further
  (its checkpoints are never trained over). A workdir from before config.json was kept per run
  is resumed unchecked, with a warning.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    return False, []
  latest = steps[-1]
  finals = [m["final"] for m in (_stored_meta(workdir, s) for s in steps) if isinstance(m.get("final"), dict)]
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      changes = config_base.config_changes(stored, config_base.as_json_dict(config))
    except (OSError, ValueError, AttributeError) as e:
      reason = _os_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
      if not allow_config_change:
        raise config_base.ConfigChangeError(
            f"{path}: cannot read the run's config ({reason}); pass --allow_config_change to resume "
            "with the config given") from None
      changes = [("config.json", "unreadable", "rewritten")]
  else:
    logging.warning("%s has checkpoints but no config.json (a run from an older version): resuming without "
                    "comparing configs.", workdir)
    changes = []
  if finals:
    total = max_iterations(config, pipeline.steps_per_epoch(config))
    done = max(int(f.get("step", latest)) for f in finals)
    if changes or total != done:
      what = config_base.describe_changes(changes) if changes else f"{total} steps instead of {done}"
      raise config_base.ConfigChangeError(
          f"--workdir={workdir} holds a run that finished at step {done}; the config given differs ({what}) and "
          "would train over its final checkpoints: use a new --workdir")
  if changes and not allow_config_change:
    raise config_base.ConfigChangeError(
        f"--workdir={workdir} holds a run (step {latest}) started with another config: "
        f"{config_base.describe_changes(changes)}; resume with the run's own config ({path}), use a new --workdir, "
        "or pass --allow_config_change to resume with the new values")
  if changes:
    logging.warning("Resuming %s with a changed config (--allow_config_change): %s", workdir,
                    config_base.describe_changes(changes))
  return True, changes


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_run_config(config, workdir: str, *, new_run: bool, changes, step: int) -> None:
  """Writes <workdir>/config.json for a new run; after an allowed change, keeps the previous one
  as config.before_step_<step>.json and writes the new one."""
  path = os.path.join(workdir, "config.json")
  try:
    if new_run:
      _write_text(path, config.to_json_best_effort(indent=2))
    elif changes:
      kept = os.path.join(workdir, f"config.before_step_{step}.json")
      if os.path.exists(path):
        os.replace(path, kept)
      _write_text(path, config.to_json_best_effort(indent=2))
      logging.warning("%s now holds the changed config; the one the run used up to step %d is kept as %s.",
                      path, step, kept)
  except OSError as e:
    raise RunEnvironmentError(f"cannot write {path}: {_os_reason(e)}") from None


def check_pretrained(config) -> None:
  """A new run's pretrained backbone must exist (ConfigError naming how to get one); "none"
  trains from random weights on purpose, with a warning."""
  path = config_base.pretrained_dir(config)
  if path is None:
    if str(config.model.pretrained).strip() or config.data.name != "synthetic":
      logging.warning("config.model.pretrained=%r: the backbone starts from random weights (the published "
                      "results start from an ImageNet-pretrained one).", config.model.pretrained)
    return
  if not os.path.isdir(path):
    raise config_base.ConfigError(
        f"config.model.pretrained={path!r}: no such directory. Convert the ImageNet backbone once with "
        f"`python scripts/convert_torch_checkpoint.py --input resnet101.pth --output {path}` (README, Real data), "
        "or pass --config.model.pretrained=none to train from scratch on purpose")


# OSError numbers and TensorStore/orbax texts of a machine that cannot store a checkpoint.
_ENV_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "I/O error", errno.ENOTDIR: "not a directory",
               errno.ENOENT: "no such file or directory"}
_ENV_TEXTS = (("No space left on device", "no space left on the device"),
              ("Disk quota exceeded", "disk quota exceeded"), ("RESOURCE_EXHAUSTED", "disk full or quota exceeded"),
              ("Read-only file system", "read-only file system"), ("PERMISSION_DENIED", "permission denied"),
              ("Permission denied", "permission denied"))


def environment_cause(e: BaseException) -> str | None:
  """A short description if `e` (or an exception in its chain) says the disk is full, a quota is
  exceeded or the directory cannot be written; None otherwise."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  for x in chain:
    if isinstance(x, OSError) and x.errno in _ENV_ERRNOS:
      return f"{_ENV_ERRNOS[x.errno]} ({_os_reason(x)})"
  for x in chain:
    lines = str(x).strip().splitlines()
    for marker, label in _ENV_TEXTS:
      found = [line for line in lines if marker in line]
      if found:
        # TensorStore's line names the file first and the system's reason last: keep the reason.
        detail = found[0].split('": ')[-1].strip()
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        return f"{label} ({detail})"
  return None


def environment_failure(e: BaseException, workdir: str, where: str | None = None) -> BaseException:
  """RunEnvironmentError (one line) if `e` says the machine could not store what the run writes
  under `where` (default: the workdir); `e` itself otherwise."""
  cause = environment_cause(e)
  if cause is None:
    return e
  steps = checkpoint_steps(workdir)
  kept = (f"the newest complete checkpoint, step {steps[-1]}, is kept" if steps
          else "no complete checkpoint exists yet")
  return RunEnvironmentError(
      f"cannot write to {os.path.abspath(where or workdir)}: {cause}; {kept}. "
      "Free space (or fix the workdir) and rerun the same command to resume")


def _saved_note(directory: str, step: int) -> str:
  if step == 0:
    return "no step was trained yet"
  return f"the state after step {step} was saved in {directory}: fix the data and rerun the same command to resume"
