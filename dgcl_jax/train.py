"""The training loop: restore or start a run, a short schedule of periodic actions, the result.

main.py -> train.train_and_evaluate (this file) -> step.StepFunctions (the jitted steps) ->
models / losses / dgcl. The run directory's checks live in rundir.py, the mesh, compilation cache
and signals in runtime.py, the TrainState in state.py.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from dgcl_jax import checkpointing
from dgcl_jax import config_base
from dgcl_jax import errors
from dgcl_jax import evaluation
from dgcl_jax import rundir
from dgcl_jax import runtime
from dgcl_jax import state as state_lib
from dgcl_jax import summaries
from dgcl_jax.data import pipeline
from dgcl_jax.step import StepFunctions, variables_of

# Re-exported: what callers of the loop catch.
NonFiniteLossError = errors.NonFiniteLossError
RunEnvironmentError = errors.RunEnvironmentError


def itstime(step: int, every: int, total: int, *, last: bool = True) -> bool:
  """Whether a periodic action runs after `step` steps: every `every` steps (never when every <= 0)
  and, with `last`, after the final step."""
  return (every > 0 and step % every == 0) or (last and step == total)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def evaluate_state(fns: StepFunctions, state, config, use_teacher: bool):
  """(mIoU, per-class IoU) of student or teacher on the validation set (center crops)."""
  conf = np.zeros((config.model.num_classes,) * 2, np.int64)
  batch_size = max(jax.device_count(), config.batch_size // max(1, config.num_slices))
  batch_size = int(math.ceil(batch_size / jax.device_count()) * jax.device_count())
  variables = variables_of(state, use_teacher)
  for item in pipeline.create_val_iterator(config, mode="center", batch_size=batch_size // jax.process_count(),
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    arrays = runtime.global_batch({"image": item["image"], "label": item["label"]}, fns.batch_sharding)
    conf += np.asarray(jax.device_get(fns.eval_step(variables, arrays["image"], arrays["label"])), np.int64)
  return evaluation.miou_from_confusion(conf)


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


class Run:
  """One run's checkpoints and records: saving (latest, best, the final result), the metrics
  fetched one step late and their finiteness check, evaluation, progress logs."""

  def __init__(self, config, workdir: str, fns: StepFunctions, ckpt: checkpointing.Checkpointer,
               writer: summaries.Writer, train_iter):
    self.config, self.workdir, self.fns, self.ckpt = config, workdir, fns, ckpt
    self.writer, self.train_iter = writer, train_iter
    self.total_steps = fns.max_iter
    self.steps_per_epoch = fns.steps_per_epoch
    self.meta = {"best_miou": -1.0, "best_step": -1, "history": []}
    self.last_saved = -1
    self.pending = None          # (step, metrics) of the last step, fetched one step late
    self._rate_from = (time.time(), 0)

  def is_semi(self, step: int) -> bool:
    """Whether the step after `step` steps is a semi-supervised one (never for method 'supervised')."""
    return self.config.method != "supervised" and step // self.steps_per_epoch >= self.config.sup_only_epochs

  def resumed(self, step: int, meta: dict[str, Any]) -> None:
    self.meta, self.last_saved, self._rate_from = meta, step, (time.time(), step)

  # -- saving -----------------------------------------------------------------

  def _guarded(self, save_fn, *args):
    """A checkpoint save; a full disk or an unwritable workdir (also from orbax's background
    thread, which reports here at the next save or wait) becomes one RunEnvironmentError."""
    try:
      save_fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      error = rundir.environment_failure(e, self.workdir, self.ckpt.directory)
      if error is e:
        raise
      raise error from None

  def save(self, state) -> None:
    """The latest checkpoint of `state` (once per step); orbax writes it in the background."""
    step = int(state.step)
    if step != self.last_saved:
      # Orbax serializes `meta` in a background thread: hand it a copy.
      self._guarded(self.ckpt.save, step, state, copy.deepcopy(self.meta), self.train_iter.get_state())
      self.last_saved = step

  def save_and_wait(self, state) -> None:
    if int(state.step) > 0:
      self.save(state)
      self._guarded(self.ckpt.wait)

  def finish(self, step: int) -> None:
    """Records the final result in the metadata the last checkpoint will carry."""
    if step == self.total_steps:
      self.meta["final"] = _final_result(self.meta, step)

  def saved_note(self, step: int) -> str:
    return rundir.saved_note(self.ckpt.directory, step)

  # -- metrics ----------------------------------------------------------------

  def check_pending(self):
    """Host values of the pending step's metrics (None if none); NonFiniteLossError if one is not finite."""
    if self.pending is None:
      return None
    (step, metrics), self.pending = self.pending, None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # A step the float16 loss scaler skipped may report non-finite losses; its parameters are kept.
    checked = {k: v for k, v in host.items() if not host.get("skipped") or k in ("params_finite", "loss_scale")}
    if not all(math.isfinite(v) for v in checked.values()) or host.get("params_finite", 1.0) != 1.0:
      if self.last_saved >= 0:
        kept = (f"the last good checkpoint (step {self.last_saved}) in {self.ckpt.directory} is kept; "
                "rerunning the same command resumes from it")
      else:
        kept = "no checkpoint was saved before it (the run stopped before its first checkpoint)"
      raise errors.NonFiniteLossError(f"non-finite loss at step {step}: {host}; {kept}")
    return host

  def log_progress(self, step: int, summary) -> None:
    host = self.check_pending()
    now = time.time()
    then, then_step = self._rate_from
    rate = (step - then_step) * self.config.batch_size * 2 / max(now - then, 1e-9)
    eta = (self.total_steps - step) * (now - then) / max(step - then_step, 1)
    self._rate_from = (now, step)
    logging.info("epoch %d step %d/%d | sup %.4f unsup %.4f contrastive %.4f | lr %.2e (head %.2e) | %.1f img/s "
                 "| ETA %s", (step - 1) // self.steps_per_epoch, step, self.total_steps, host["sup"], host["unsup"],
                 host["contrastive"], host["lr_backbone"], host["lr_head"], rate, _format_eta(eta))
    self.writer.scalars(step, {f"train/{k}": v for k, v in host.items()})
    self.writer.scalars(step, {"train/images_per_second": rate})
    if summary and itstime(step, self.config.image_summary_every_steps, self.total_steps, last=False):
      self.writer.train_images(step, summary, self.config)

  # -- evaluation ---------------------------------------------------------------

  def eval_due(self, step: int) -> bool:
    every = max(1, int(self.config.eval_every_epochs)) if self.config.eval_every_epochs else 0
    return bool(every) and step % self.steps_per_epoch == 0 and itstime(step // self.steps_per_epoch, every,
                                                                        self.total_steps // self.steps_per_epoch)

  def evaluate(self, step: int, state) -> None:
    """Evaluates student (and a trained teacher), records it in meta, saves a new best checkpoint.
    A validation file that fails to load saves the train state first, the evaluation marked
    pending so that the rerun does it before training on."""
    try:
      self._evaluate(step, state)
    except pipeline.DataError as e:
      self.meta["eval_pending"] = step
      self.save_and_wait(state)
      raise pipeline.DataError(f"{e} (during the evaluation at step {step}; {self.saved_note(step)})") from None

  def _evaluate(self, step: int, state) -> None:
    record = {"step": step, "epoch": step // self.steps_per_epoch}
    record["student_miou"], _ = evaluate_state(self.fns, state, self.config, use_teacher=False)
    record["teacher_miou"] = None
    if self.is_semi(step - 1):
      record["teacher_miou"], _ = evaluate_state(self.fns, state, self.config, use_teacher=True)
    logging.info("epoch %d evaluation: student mIoU %.4f%s", record["epoch"], record["student_miou"],
                 "" if record["teacher_miou"] is None else f", teacher mIoU {record['teacher_miou']:.4f}")
    self.writer.scalars(step, {"eval/student_miou": record["student_miou"],
                               "eval/teacher_miou": record["teacher_miou"]})
    self.writer.eval_images(step, self.fns, state, self.config)
    self.meta["history"].append(record)
    self.meta.pop("eval_pending", None)
    best_now = max(record["student_miou"], record["teacher_miou"] or -1.0)
    if best_now > self.meta["best_miou"]:
      self.meta["best_miou"], self.meta["best_step"] = best_now, step
      self.finish(step)
      if step not in self.ckpt.steps("best"):
        self._guarded(self.ckpt.save_best, step, state, copy.deepcopy(self.meta), self.train_iter.get_state())
    self.finish(step)


def _prepare(config, workdir: str, allow_config_change: bool):
  """Checks that need no compilation, in the order a user would fix them -> (changes, Parts)."""
  rundir.prepare_workdir(workdir)
  steps_per_epoch = pipeline.steps_per_epoch(config)
  resuming, changes = rundir.check_run_identity(config, workdir, allow_config_change,
                                                total_steps=state_lib.total_steps(config, steps_per_epoch))
  if not resuming:
    rundir.check_pretrained(config)
  pipeline.check_inputs(config)
  return resuming, changes, state_lib.Parts.create(config, steps_per_epoch)


def _restore_or_init(run: Run, parts: state_lib.Parts, resuming: bool):
  """The state to train from: the newest restorable checkpoint, else a new one."""
  config, fns = run.config, run.fns
  abstract = state_lib.abstract_train_state(config, parts, fns.replicated)
  restored = run.ckpt.restore_latest(abstract)
  if restored is None:
    if resuming:  # every checkpoint was set aside as damaged: this is a new run after all
      rundir.check_pretrained(config)
    return jax.device_put(state_lib.create_train_state(config, jax.random.PRNGKey(config.seed), parts=parts),
                          fns.replicated), False
  state, meta, data_state = restored
  if int(data_state.get("step", int(state.step))) != int(state.step):
    raise RuntimeError(f"checkpoint in {run.ckpt.directory} is inconsistent: train state at step "
                       f"{int(state.step)}, data iterator at step {data_state.get('step')}")
  run.train_iter.set_state(data_state)
  run.resumed(int(state.step), meta)
  logging.info("Resumed from step %d in %s", int(state.step), run.ckpt.directory)
  return state, True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the final metrics.

  A workdir with checkpoints resumes only with the config it was started with (its
  config.json; see rundir.check_run_identity); `allow_config_change` accepts a different one
  for a run that has not finished. The run holds the workdir's lock (rundir.lock_workdir) from
  before its first write there to after its last: a second run on it stops with WorkdirLockedError.
  """
  config_base.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  runtime.setup_compilation_cache(config)
  lock = rundir.lock_workdir(workdir)
  try:
    return _train_and_evaluate(config, workdir, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, allow_config_change: bool) -> dict[str, Any]:
  """train_and_evaluate once the workdir is locked."""
  resuming, changes, parts = _prepare(config, workdir, allow_config_change)
  fns = StepFunctions(parts, runtime.make_mesh())
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = summaries.Writer(workdir, enabled=jax.process_index() == 0)
  train_iter = preempted = None
  failed = False
  try:
    train_iter = pipeline.create_train_iterator(config, process_index=jax.process_index(),
                                                process_count=jax.process_count())
    run = Run(config, workdir, fns, ckpt, writer, train_iter)
    state, restored = _restore_or_init(run, parts, resuming)
    if jax.process_index() == 0:
      rundir.record_run_config(config, workdir, new_run=not restored, changes=changes, step=int(state.step))
    preempted = runtime.Preempted()
    return _train(run, state, preempted)
  except BaseException:
    failed = True
    raise
  finally:
    if preempted is not None:
      preempted.restore()
    if train_iter is not None:
      train_iter.close()  # stops grain's workers (their shared memory) after an error as well
    _close(workdir, failed, (writer.close, ckpt.wait, ckpt.close))


def _close(workdir: str, failed: bool, closers) -> None:
  """Runs every closer; the first failure is raised (as one line if the disk is the cause) unless a
  failure is already on its way out."""
  problems = []
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      problems.append(e)
  if problems and not failed:
    error = rundir.environment_failure(problems[0], workdir)
    if error is problems[0]:
      raise error
    raise error from None


def _train(run: Run, state, preempted: runtime.Preempted) -> dict[str, Any]:
  """The loop from `state` to the last step: train, then the periodic actions."""
  config, fns = run.config, run.fns
  start, total = int(state.step), run.total_steps
  if run.meta.get("eval_pending") == start and start > 0:
    run.evaluate(start, state)   # a data error interrupted this evaluation: run it before anything else
  if start >= total:
    logging.info("Run already finished at step %d (of %d): nothing to train.", start, total)
    _print_final(run.meta.get("final") or {})
    return run.meta.get("final") or {}
  first_step_log = runtime.FirstStepLog()
  for step in range(start, total):
    semi = run.is_semi(step)
    try:
      local = next(run.train_iter)
    except pipeline.DataError as e:
      run.check_pending()   # the state after `step` steps is good once its losses are: keep it
      run.save_and_wait(state)
      raise pipeline.DataError(f"{e} (at step {step + 1}; {run.saved_note(step)})") from None
    started = first_step_log.now()
    state, metrics, summary = fns.train_step(state, runtime.global_batch(local, fns.batch_sharding), semi=semi)
    first_step_log(semi, metrics, started)
    run.check_pending()
    run.pending = (step, metrics)
    done = step + 1

    if itstime(done, config.log_every_steps, total):
      run.log_progress(done, summary)
    if run.eval_due(done):
      run.check_pending()
      run.evaluate(done, state)
      run.save(state)
    elif itstime(done, config.checkpoint_every_steps, total):
      run.check_pending()
      run.finish(done)
      run.save(state)
    if preempted.requested:
      run.check_pending()
      run.save_and_wait(state)
      logging.warning("Stopped at step %d after %s; rerun the same command to resume.", done,
                      preempted.signal_name)
      return {"preempted": True, "step": done}
  _print_final(run.meta["final"])
  return run.meta["final"]
