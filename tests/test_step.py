"""dgcl_jax/step.py: the train step's semantics: data-parallel equivalence, per-slice pieces, the
contrastive gradient quirk, ground-truth pseudo labels, float16 loss scaling, shared densities.

Runs on 4 forced CPU devices (tests/conftest.py) with the tiny synthetic config (tests/tiny.py).
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from dgcl_jax import dgcl
from dgcl_jax import state as state_lib
from dgcl_jax.step import StepFunctions
from tests.tiny import full_bank, initial_state, random_batch, run_steps, step_functions, tiny_config


def test_supervised_four_devices_match_one_device():
  config = tiny_config("supervised")
  _, one = run_steps(config, 1, 3, semi=False)
  _, four = run_steps(config, 4, 3, semi=False)
  for a, b in zip(one, four):
    np.testing.assert_allclose(a["sup"], b["sup"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(a["total"], b["total"], rtol=2e-5, atol=1e-6)


def test_dgcl_step_on_four_devices_matches_one_and_bank_is_replicated():
  config = tiny_config("dgcl")
  state = initial_state(config)
  state = state.replace(memory_bank=full_bank(config))
  s1, one = run_steps(config, 1, 2, semi=True, state=state)
  s4, four = run_steps(config, 4, 2, semi=True, state=state)
  for a, b in zip(one, four):
    assert a["bank_full"] == 1.0
    assert a["contrastive"] > 0
    for key in ("sup", "unsup", "contrastive", "total"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # The bank is identical on every device, and equal to the single-device run's.
  for leaf in jax.tree_util.tree_leaves(s4.memory_bank):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 4
    for shard in shards[1:]:
      np.testing.assert_array_equal(shards[0], shard)
  np.testing.assert_array_equal(np.asarray(s1.memory_bank.count), np.asarray(s4.memory_bank.count))
  np.testing.assert_allclose(np.asarray(s1.memory_bank.fts), np.asarray(s4.memory_bank.fts), atol=1e-4)


def test_contrastive_loss_is_the_mean_of_per_slice_losses_computed_by_hand():
  """The 4-device step's contrastive value equals dgcl_loss run slice by slice by hand, averaged."""
  from dgcl_jax import losses, schedules  # pylint: disable=g-import-not-at-top
  config = tiny_config("dgcl")
  bank = full_bank(config)
  # Step 4 = the first semi-supervised step (4 steps per epoch, 1 supervised epoch): teacher := student.
  state = initial_state(config).replace(memory_bank=bank, step=np.asarray(4, np.int32))
  fns = step_functions(config, 4)
  batch = random_batch(config, 3)
  step_state = jax.device_put(jax.tree_util.tree_map(np.asarray, state), fns.replicated)
  _, metrics, _ = fns.train_step(step_state, jax.device_put(batch, fns.batch_sharding), semi=True)

  # By hand, slice by slice: teacher, pseudo labels, CutMix, one student forward, contrastive loss.
  b, s = config.batch_size, config.num_slices
  bs = b // s
  keys = jax.random.split(jax.random.fold_in(jnp.asarray(state.rng), 4), 8)
  k_teacher, k_student, k_cutmix, k_contrast = keys[:4]
  labeled, unlabeled = jnp.asarray(batch["labeled_image"]), jnp.asarray(batch["unlabeled_image"])
  ignore = jnp.asarray(batch["unlabeled_ignore"])
  t_out, _ = fns._teacher_forward(state.params, state.teacher_batch_stats,  # pylint: disable=protected-access
                                  jnp.concatenate([labeled, unlabeled]), k_teacher)
  p = fns.progress(jnp.asarray(4))
  drop = schedules.drop_percent(p, config.loss.drop_percent)
  percent = schedules.contrastive_percent(p, config.loss.contrastive_percent, config.loss.contrastive_percent_min)
  k_coin, k_slices = jax.random.split(k_cutmix)
  mix_keys = jax.random.split(k_slices, s)
  coin = jax.random.uniform(k_coin) < config.loss.cutmix_prob   # one coin for every slice
  mixed = []
  for i in range(s):
    rows = slice(i * bs, (i + 1) * bs)
    pseudo = losses.pseudo_labels(t_out["pred"][b:][rows], ignore[rows], drop, method=config.loss.quantile_method)
    mixed.append(losses.cutmix(mix_keys[i], unlabeled[rows], pseudo, ignore[rows], coin=coin)[0])
  images = jnp.concatenate([labeled, unlabeled] + mixed)
  out, _ = fns._student_forward(state.params, state.batch_stats, images, k_student)  # pylint: disable=protected-access
  loss_keys = jax.random.split(k_contrast, s)
  per_slice = []
  for i in range(s):
    rows = slice(i * bs, (i + 1) * bs)
    urows = slice(b + i * bs, b + (i + 1) * bs)
    labels_i = losses.contrastive_labels(jnp.asarray(batch["labeled_label"][rows]), t_out["pred"][urows],
                                         ignore[rows], percent, method=config.loss.quantile_method)
    rep_i = jnp.concatenate([out["rep"][rows], out["rep"][urows]]).astype(jnp.float32)
    fts_i = jnp.concatenate([out["fts"][rows], out["fts"][urows]]).astype(jnp.float32)
    per_slice.append(dgcl.dgcl_loss(rep_i, fts_i, labels_i, bank, loss_keys[i], dgcl.LossSettings.from_config(config)))
  assert float(metrics["contrastive"]) > 0
  np.testing.assert_allclose(float(metrics["contrastive"]), float(np.mean(per_slice)), rtol=1e-4)


def test_contrastive_gradient_quirk_scales_only_the_gradient():
  """One step from the same state: the contrastive part of the update is 1/W as large with the quirk.

  On the first step the momentum buffer is empty and weight decay adds the same term to every
  run, so parameter differences between runs are -lr x (difference of gradients). A
  self_training step gives the same update minus the contrastive term.
  """
  config = tiny_config("dgcl")
  state = initial_state(config).replace(memory_bank=full_bank(config))
  clean = tiny_config("dgcl")
  clean.loss.contrastive_grad_quirk = False
  no_contrast = tiny_config("self_training")
  results = {}
  for name, cfg in (("quirk", config), ("clean", clean), ("none", no_contrast)):
    run_state = state if name != "none" else state.replace(memory_bank=initial_state(no_contrast).memory_bank)
    new_state, hist = run_steps(cfg, 1, 1, semi=True, state=run_state)
    results[name] = (new_state, hist[0])
  # The reported contrastive value does not depend on the quirk.
  assert results["quirk"][1]["contrastive"] > 0
  assert results["quirk"][1]["contrastive"] == pytest.approx(results["clean"][1]["contrastive"], rel=1e-6)
  assert results["quirk"][1]["sup"] == pytest.approx(results["none"][1]["sup"], rel=1e-6)

  def delta(a, b):
    return np.concatenate([np.ravel(x) - np.ravel(y) for x, y in zip(
        jax.tree_util.tree_leaves(a.params["decoder"]), jax.tree_util.tree_leaves(b.params["decoder"]))])
  d_quirk = delta(results["quirk"][0], results["none"][0])
  d_clean = delta(results["clean"][0], results["none"][0])
  assert np.abs(d_clean).max() > 0
  np.testing.assert_allclose(d_quirk, d_clean / config.num_slices, rtol=0, atol=2e-3 * np.abs(d_clean).max())


def test_ground_truth_pseudo_labels_replace_the_teachers():
  """pseudo_labels='ground_truth' trains the mixed part on batch['unlabeled_label'].

  Unlabeled = labeled images, their labels as ground truth, no CutMix, no dropout, no scale quirk:
  the student sees each image twice in one batch, so the unsupervised loss equals the supervised.
  """
  config = tiny_config("self_training")
  config.loss.pseudo_labels = "ground_truth"
  config.loss.cutmix_prob = 0.0
  config.loss.unsup_scale_quirk = False
  config.model.dropout_rate = 0.0
  fns = step_functions(config, 1)
  batch = random_batch(config)
  batch["unlabeled_image"] = batch["labeled_image"]
  batch["unlabeled_ignore"] = np.where(batch["labeled_label"] == 255, 255, 0).astype(np.int32)
  losses = {}
  labels = batch["labeled_label"]
  shifted = np.where(labels == 255, 255, (labels + 1) % config.model.num_classes).astype(np.int32)
  for name, gt in (("same", labels), ("shifted", shifted)):
    state = jax.device_put(initial_state(config), fns.replicated)
    _, metrics, _ = fns.train_step(state, jax.device_put(dict(batch, unlabeled_label=gt), fns.batch_sharding),
                                   semi=True)
    losses[name] = {k: float(v) for k, v in metrics.items()}
  assert losses["same"]["unsup"] == pytest.approx(losses["same"]["sup"], rel=1e-4)
  assert abs(losses["shifted"]["unsup"] - losses["same"]["unsup"]) > 1e-3  # near-uniform logits at init


# ----------------------------------------------------------------------------- float16 loss scaling


def test_float16_overflow_skips_the_update_halves_the_scale_and_advances_the_step():
  config = tiny_config("dgcl")
  config.model.dtype = "float16"
  config.optim.loss_scale_init = 2.0 ** 40   # scaled cotangents overflow float16
  state = initial_state(config).replace(memory_bank=full_bank(config), step=np.asarray(5, np.int32))
  new_state, hist = run_steps(config, 1, 1, semi=True, state=state)
  metrics = hist[0]
  assert metrics["skipped"] == 1.0 and metrics["loss_scale"] == 2.0 ** 40
  assert float(new_state.loss_scale.scale) == 2.0 ** 39 and int(new_state.loss_scale.fin_steps) == 0
  assert int(new_state.step) == 6
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                (new_state.params, new_state.opt_state), (state.params, state.opt_state))
  counts = [np.asarray(x) for x in jax.tree_util.tree_leaves(new_state.opt_state)
            if np.issubdtype(np.asarray(x).dtype, np.integer)]
  old_counts = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)
                if np.issubdtype(np.asarray(x).dtype, np.integer)]
  # Parameters and momentum stay; the schedule counts advance with the step.
  assert all(jax.tree_util.tree_leaves(same[0]))
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(new_state.opt_state), jax.tree_util.tree_leaves(state.opt_state))
      if not np.issubdtype(np.asarray(a).dtype, np.integer))
  assert counts and all((c == o + 1).all() for c, o in zip(counts, old_counts))
  # BN statistics, the EMA teacher and the bank still move, as in the reference.
  assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(new_state.batch_stats)[0]),
                            np.asarray(jax.tree_util.tree_leaves(state.batch_stats)[0]))
  assert int(np.asarray(new_state.memory_bank.count).sum()) == int(np.asarray(state.memory_bank.count).sum())
  assert not np.array_equal(np.asarray(new_state.memory_bank.fts), np.asarray(state.memory_bank.fts))

  # With the default scale the same step is taken.
  config.optim.loss_scale_init = 2.0 ** 16
  state = state.replace(loss_scale=state_lib.make_loss_scale(config))
  new_state, hist = run_steps(config, 1, 1, semi=True, state=state)
  assert hist[0]["skipped"] == 0.0 and np.isfinite(hist[0]["total"])
  assert int(new_state.loss_scale.fin_steps) == 1 and float(new_state.loss_scale.scale) == 2.0 ** 16
  assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(new_state.params)[0]),
                            np.asarray(jax.tree_util.tree_leaves(state.params)[0]))


def test_float16_student_trains():
  """A few supervised steps of a float16 student on one batch: finite, decreasing losses."""
  config = tiny_config("supervised")
  config.model.dtype = "float16"
  fns = step_functions(config, 1)
  state = jax.device_put(jax.tree_util.tree_map(np.asarray, initial_state(config)), fns.replicated)
  batch = jax.device_put(random_batch(config, 0), fns.batch_sharding)
  sup = []
  for _ in range(8):
    state, metrics, _ = fns.train_step(state, batch, semi=False)
    sup.append(float(metrics["sup"]))
    assert float(metrics["skipped"]) == 0.0
  assert all(np.isfinite(sup))
  assert np.mean(sup[-2:]) < 0.9 * np.mean(sup[:2])


def test_bank_update_reuses_the_losss_densities(monkeypatch):
  """dgcl.share_density: the same bank as an update that computes every density, with fewer rows."""
  import test_dgcl  # pylint: disable=g-import-not-at-top
  rows = test_dgcl._count_density_rows(monkeypatch)  # pylint: disable=protected-access
  banks, computed = [], []
  for share in (False, True):
    config = tiny_config("dgcl")
    config.dgcl.share_density = share
    # 64 pixels: 16 x 16 features per image, so that classes have more than the loss's 32 pixels.
    config.data.crop_size = config.data.synthetic_image_size = 64
    fns = StepFunctions(state_lib.Parts.create(config, steps_per_epoch=4), Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    state = initial_state(config).replace(memory_bank=full_bank(config))
    state = jax.device_put(jax.tree_util.tree_map(np.asarray, state), fns.replicated)
    rows.clear()
    new_state, metrics, _ = fns.train_step(state, jax.device_put(random_batch(config), fns.batch_sharding),
                                           semi=True)
    jax.block_until_ready(new_state)
    jax.effects_barrier()
    assert float(metrics["bank_full"]) == 1.0 and float(metrics["contrastive"]) > 0
    banks.append(jax.tree_util.tree_map(np.asarray, new_state.memory_bank))
    computed.append(sum(rows))
  for a, b in zip(jax.tree_util.tree_leaves(banks[0]), jax.tree_util.tree_leaves(banks[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert (banks[1].density[:, :1] != 0).any()   # new entries got densities
  assert 0 < computed[1] < computed[0], computed
