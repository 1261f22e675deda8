"""Which network scripts/evaluate.py and predict.py load (dgcl_jax/restore.py)."""

import types

import pytest

from dgcl_jax import restore

FNS = types.SimpleNamespace(steps_per_epoch=10)


def _config(method="dgcl", sup_only_epochs=2):
  return types.SimpleNamespace(method=method, sup_only_epochs=sup_only_epochs)


def _meta(step, student, teacher):
  return {"history": [{"step": step, "student_miou": student, "teacher_miou": teacher}]}


def test_auto_picks_the_network_that_scored_higher_at_that_step():
  assert restore._resolve_model(_config(), FNS, 30, _meta(30, 0.50, 0.55), "auto") == "teacher"
  assert restore._resolve_model(_config(), FNS, 30, _meta(30, 0.56, 0.55), "auto") == "student"


def test_auto_falls_back_to_teacher_after_the_supervised_epochs_without_a_record():
  assert restore._resolve_model(_config(), FNS, 25, _meta(20, 0.5, None), "auto") == "teacher"


@pytest.mark.parametrize("config,step", [(_config("supervised"), 100), (_config("dgcl", 2), 20)])
def test_untrained_teacher_auto_is_student_and_teacher_is_an_error(config, step):
  assert restore._resolve_model(config, FNS, step, _meta(step, 0.4, None), "auto") == "student"
  with pytest.raises(ValueError, match="--model=teacher: the checkpoint's teacher is untrained"):
    restore._resolve_model(config, FNS, step, {}, "teacher")


def test_explicit_choice_is_kept_when_the_teacher_is_trained():
  assert restore._resolve_model(_config(), FNS, 21, _meta(21, 0.9, 0.1), "teacher") == "teacher"
  assert restore._resolve_model(_config(), FNS, 21, _meta(21, 0.1, 0.9), "student") == "student"
