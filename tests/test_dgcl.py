"""Density, memory bank and contrastive loss (dgcl_jax/density.py, memory_bank.py, dgcl.py) against the
reference's outputs and NumPy versions; one file, as the three share the NumPy versions and inputs."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dgcl_jax import density as density_lib
from dgcl_jax import dgcl

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "dgcl_reference.npz")
LOSS_STATIC = ("temperature", "ks", "num_anchors", "num_positives", "max_pixels", "num_negatives",
               "ignore_classes", "ignore_label", "topk_chunk", "buckets", "row_block")
UPDATE_STATIC = ("max_new_per_class", "density_min_entries", "ks", "topk_chunk", "buckets", "row_block")

_loss_vg = jax.jit(jax.value_and_grad(dgcl.dgcl_loss), static_argnames=LOSS_STATIC)
_update = jax.jit(lambda bank, *a, **kw: bank.update(*a, **kw), static_argnames=UPDATE_STATIC)


def _entries(bank, c):
  """(fts [n, Cf], rep [n, Cr], density [n]) of class c's valid entries, newest first (host arrays)."""
  n = int(np.asarray(bank.count)[c])
  return np.asarray(bank.fts)[c, :n], np.asarray(bank.rep)[c, :n], np.asarray(bank.density)[c, :n]


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES))


# ---------------------------------------------------------------- NumPy versions

def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_density(feats, keys, ks):
  s = _np_normalize(feats.astype(np.float64)) @ _np_normalize(keys.astype(np.float64)).T
  s = -np.sort(-s, axis=1)
  return np.mean([s[:, :k].mean(1) for k in ks], axis=0)


def _np_loss(rep, fts, labels, bank, *, temperature=0.5, ks=(8, 16, 32), num_anchors=200,
             num_positives=50, ignore_classes=(0,)):
  """Section 4 with every count below its cap (nothing random)."""
  rep = rep.reshape(-1, rep.shape[-1]).astype(np.float64)
  fts = fts.reshape(-1, fts.shape[-1]).astype(np.float64)
  labels = labels.reshape(-1)
  b_fts, b_rep, b_dens, b_cnt = (np.asarray(x) for x in (bank.fts, bank.rep, bank.density, bank.count))
  losses, anchors_all = [], []
  for c in np.unique(labels):
    if c == 255 or c in ignore_classes:
      continue
    idx = np.nonzero(labels == c)[0]
    n = len(idx)
    dens = _np_density(fts[idx], b_fts[c, :b_cnt[c]], ks) if n > 32 else np.ones(n)
    anchors = idx[np.argsort(dens, kind="stable")[:min(num_anchors, n)]]
    pos = idx[np.argsort(-dens, kind="stable")[:min(num_positives, n)]]
    btop = np.argsort(-b_dens[c, :b_cnt[c]], kind="stable")[:num_positives]
    proto = np.concatenate([rep[pos], b_rep[c, btop]]).mean(0)
    negs = rep[(labels != c) & (labels != 255)]
    t = _np_normalize(np.concatenate([proto[None], negs]))
    logits = _np_normalize(rep[anchors]) @ t.T / temperature
    logits -= logits.max(1, keepdims=True)
    logp = logits[:, 0] - np.log(np.exp(logits).sum(1) + 1e-6)
    losses.append(-logp.mean())
    anchors_all.extend(anchors.tolist())
  return (float(np.mean(losses)) if losses else 0.0), set(anchors_all)


class _NpBank:
  """Per-class lists of (update, id, fts, rep, density), newest first."""

  def __init__(self, num_classes, capacity, density_min_entries, ks):
    self.q = [[] for _ in range(num_classes)]
    self.cap, self.min_entries, self.ks = capacity, density_min_entries, ks

  def update(self, step, ids, fts, rep, labels):
    for c, q in enumerate(self.q):
      sel = np.nonzero(labels == c)[0]
      if len(q) > self.min_entries:
        dens = _np_density(fts[sel], np.stack([e[2] for e in q]), self.ks)
      else:
        dens = np.zeros(len(sel))
      new = [(step, ids[i], fts[i], rep[i], d) for i, d in zip(sel, dens)]
      self.q[c] = (new + q)[:self.cap]


# ---------------------------------------------------------------- density

def test_density_matches_reference(ref):
  got = dgcl.multi_scale_density(ref["density/feats"], ref["density/keys"], (8, 16, 32))
  assert got.dtype == jnp.float32 and got.shape == (200,)
  np.testing.assert_allclose(np.asarray(got), ref["density/density"], atol=1e-5, rtol=0)


def test_density_matches_numpy_and_two_pass_topk():
  rng = np.random.default_rng(0)
  feats, keys = rng.normal(size=(37, 10)), rng.normal(size=(90, 10))
  want = _np_density(feats, keys, (8, 16, 32))
  got = dgcl.multi_scale_density(jnp.asarray(feats, jnp.float32), jnp.asarray(keys, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  for chunk in (16, 5):
    two = dgcl.multi_scale_density(jnp.asarray(feats, jnp.float32), jnp.asarray(keys, jnp.float32),
                                   topk_chunk=chunk)
    np.testing.assert_array_equal(np.asarray(two), np.asarray(got))
  chunked = dgcl.multi_scale_density(jnp.asarray(feats, jnp.float32), jnp.asarray(keys, jnp.float32),
                                     row_chunk=8)   # 5 blocks, the last one padded
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), atol=1e-7)
  x = jnp.asarray(rng.integers(0, 4, size=(6, 50)), jnp.float32)   # ties
  np.testing.assert_array_equal(dgcl.top_k_values(x, 32, 16), jax.lax.top_k(x, 32)[0])


def test_density_key_mask():
  rng = np.random.default_rng(1)
  feats, keys = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
  mask = np.arange(40) < 25
  got = dgcl.multi_scale_density(feats, keys, (4, 8), key_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), _np_density(feats, keys[:25], (4, 8)), atol=1e-5)
  # Fewer valid keys than k: mean over the valid ones.
  got = dgcl.multi_scale_density(feats, keys, (4, 8), key_mask=jnp.asarray(np.arange(40) < 6))
  s = np.sort(_np_normalize(feats.astype(np.float64)) @ _np_normalize(keys[:6].astype(np.float64)).T)[:, ::-1]
  np.testing.assert_allclose(np.asarray(got), (s[:, :4].mean(1) + s.mean(1)) / 2, atol=1e-5)


# ---------------------------------------------------------------- memory bank

def test_bank_matches_reference(ref):
  bank = dgcl.MemoryBank.create(4, 1200, 16, 12)
  key = jax.random.PRNGKey(0)
  for i in range(4):
    assert bool(bank.is_full()) == (i >= 2)
    bank = _update(bank, ref[f"bank/update{i}/fts"], ref[f"bank/update{i}/rep"],
                   ref[f"bank/update{i}/labels"], jax.random.fold_in(key, i),
                   max_new_per_class=1000, density_min_entries=1000, ks=(8, 16, 32))
    if i not in (1, 3):
      continue
    assert bool(bank.is_full())
    for c in range(4):
      # Every class pixel is taken (600 <= 1000), so the reference's row-major order is exact
      # and no sorting is needed.
      for got, name in zip(_entries(bank, c), ("fts", "rep", "density")):
        np.testing.assert_allclose(got, ref[f"bank/after{i}/class{c}/{name}"], atol=1e-5, rtol=0)
  assert np.all(ref["bank/after1/class0/density"] == 0)


def test_bank_order_eviction_and_density_threshold():
  num_classes, cap, min_entries, ks = 3, 20, 10, (2, 4)
  rng = np.random.default_rng(2)
  bank = dgcl.MemoryBank.create(num_classes, cap, 5, 3)
  npbank = _NpBank(num_classes, cap, min_entries, ks)
  next_id = 0
  for step in range(6):
    labels = rng.choice([0, 1, 2, 255], p=[0.3, 0.2, 0.1, 0.4], size=(2, 3, 4))
    n = labels.size
    ids = np.arange(next_id, next_id + n)
    next_id += n
    fts = rng.normal(size=(n, 5)).astype(np.float32)
    fts[:, 0] = ids   # identifies the pixel
    rep = rng.normal(size=(n, 3)).astype(np.float32)
    bank = _update(bank, fts.reshape(2, 3, 4, 5), rep.reshape(2, 3, 4, 3), labels, jax.random.PRNGKey(step),
                   max_new_per_class=16, density_min_entries=min_entries, ks=ks)
    npbank.update(step, ids, fts, rep, labels.reshape(-1))
    for c in range(num_classes):
      want = npbank.q[c]
      assert int(bank.count[c]) == len(want)
      g_fts, g_rep, g_dens = _entries(bank, c)
      # Every class pixel is taken (<= max_new_per_class), so the row-major order is exact.
      np.testing.assert_array_equal(g_fts[:, 0].astype(int), [e[1] for e in want])
      np.testing.assert_array_equal(g_rep, np.array([e[3] for e in want]).reshape(-1, 3))
      np.testing.assert_allclose(g_dens, [e[4] for e in want], atol=1e-5)
  assert any(e[4] != 0 for q in npbank.q for e in q)   # thresholds were crossed
  assert any(e[4] == 0 for q in npbank.q for e in q)


def test_bank_is_full_and_sampling_without_replacement():
  num_classes, cap, max_new = 2, 12, 5
  labels = np.array([0] * 30 + [1] * 3 + [255] * 3).reshape(1, 6, 6)
  ids = np.arange(36, dtype=np.float32)
  fts = np.stack([ids, labels.reshape(-1).astype(np.float32)], -1).reshape(1, 6, 6, 2)
  rep = np.zeros((1, 6, 6, 1), np.float32)
  bank = dgcl.MemoryBank.create(num_classes, cap, 2, 1)
  picks = []
  for step in range(5):
    bank = _update(bank, fts, rep, labels, jax.random.PRNGKey(step), max_new_per_class=max_new,
                   density_min_entries=100, ks=(2,))
    counts = np.asarray(bank.count)
    np.testing.assert_array_equal(counts, [min(cap, max_new * (step + 1)), min(cap, 3 * (step + 1))])
    new = _entries(bank, 0)[0][:max_new]
    assert np.all(new[:, 1] == 0) and len(set(new[:, 0].tolist())) == max_new   # distinct class-0 pixels
    picks.append(tuple(sorted(new[:, 0].tolist())))
    np.testing.assert_array_equal(np.sort(_entries(bank, 1)[0][:3, 0]), [30, 31, 32])
    assert bool(bank.is_full()) == (step >= 3)
  assert len(set(picks)) > 1   # the draw depends on the key


# ---------------------------------------------------------------- loss

@pytest.mark.parametrize("case", ["mixed", "one_class", "ignored"])
def test_loss_matches_reference(ref, case):
  bank = dgcl.MemoryBank(
      fts=jnp.stack([ref[f"bank/after3/class{c}/fts"] for c in range(4)]),
      rep=jnp.stack([ref[f"bank/after3/class{c}/rep"] for c in range(4)]),
      density=jnp.stack([ref[f"bank/after3/class{c}/density"] for c in range(4)]),
      count=jnp.full((4,), 1200, jnp.int32))
  loss, grad = _loss_vg(jnp.asarray(ref[f"loss/{case}/rep"]), ref[f"loss/{case}/fts"],
                        jnp.asarray(ref[f"loss/{case}/labels"], jnp.int32), bank, jax.random.PRNGKey(3),
                        temperature=0.5, num_anchors=200, num_positives=50, num_negatives=512)
  want, want_grad = ref[f"loss/{case}/loss"], ref[f"loss/{case}/grad_rep"]
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=0)
  scale = max(np.abs(want_grad).max(), 1e-30)
  assert np.abs(np.asarray(grad) - want_grad).max() <= 1e-3 * scale
  if case == "ignored":
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def _small_bank(rng, num_classes=5, cap=64, cf=8, cr=6):
  return dgcl.MemoryBank(fts=jnp.asarray(rng.normal(size=(num_classes, cap, cf)), jnp.float32),
                         rep=jnp.asarray(rng.normal(size=(num_classes, cap, cr)), jnp.float32),
                         density=jnp.asarray(rng.uniform(size=(num_classes, cap)), jnp.float32),
                         count=jnp.full((num_classes,), cap, jnp.int32))


def _labels(rng, counts, shape=(2, 8, 8)):
  lab = np.concatenate([np.full(n, c) for c, n in counts.items()])
  assert lab.size == np.prod(shape)
  return rng.permutation(lab).reshape(shape).astype(np.int32)


SMALL = dict(temperature=0.5, ks=(2, 4, 8), num_anchors=20, num_positives=10, num_negatives=512)


def test_loss_matches_numpy_and_gradient_only_at_anchors():
  rng = np.random.default_rng(4)
  bank = _small_bank(rng)
  # class 1: > 32 pixels and > num_anchors; class 2: < 32 (densities 1); 3, 4 absent; 0 negatives only.
  labels = _labels(rng, {0: 10, 1: 60, 2: 10, 255: 48})   # <= num_positives below 32: no ties
  rep = rng.normal(size=(2, 8, 8, 6)).astype(np.float32)
  fts = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
  loss, grad = _loss_vg(jnp.asarray(rep), fts, labels, bank, jax.random.PRNGKey(0), **SMALL)
  want, anchors = _np_loss(rep, fts, labels, bank, temperature=0.5, ks=(2, 4, 8), num_anchors=20,
                           num_positives=10)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert len(anchors) == 30
  nonzero = set(np.nonzero(np.any(np.asarray(grad).reshape(-1, 6) != 0, axis=1))[0].tolist())
  assert nonzero == anchors


def test_loss_all_ignored_is_zero_without_nan():
  rng = np.random.default_rng(5)
  bank = _small_bank(rng)
  labels = np.full((2, 8, 8), 255, np.int32)
  rep = jnp.zeros((2, 8, 8, 6))   # zero reps: normalization must not make NaN gradients
  loss, grad = _loss_vg(rep, jnp.zeros((2, 8, 8, 8)), labels, bank, jax.random.PRNGKey(0), **SMALL)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)


def test_loss_sampling_vmap_and_slices_version():
  """Caps active (max_pixels, negatives): finite, vmappable, dgcl_loss_slices == vmap(dgcl_loss)."""
  rng = np.random.default_rng(6)
  bank = _small_bank(rng)
  labels = np.stack([_labels(rng, {0: 20, 1: 60, 2: 10, 255: 38}), _labels(rng, {1: 100, 3: 28})])
  rep = jnp.asarray(rng.normal(size=(2, 2, 8, 8, 6)), jnp.float32)
  fts = jnp.asarray(rng.normal(size=(2, 2, 8, 8, 8)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  kw = dict(SMALL, max_pixels=40, num_negatives=16)
  per_fn = jax.jit(jax.vmap(functools.partial(dgcl.dgcl_loss, **kw), (0, 0, 0, None, 0)))
  per = per_fn(rep, fts, labels, bank, keys)
  sl = jax.jit(functools.partial(dgcl.dgcl_loss_slices, **kw))(rep, fts, labels, bank, keys)
  assert np.all(np.isfinite(np.asarray(per))) and np.all(np.asarray(per) > 0)
  np.testing.assert_allclose(np.asarray(sl), np.asarray(per), rtol=1e-6)
  other = per_fn(rep, fts, labels, bank, jax.random.split(jax.random.PRNGKey(2), 2))
  assert not np.allclose(np.asarray(other), np.asarray(per))   # sampling depends on the key


# ---------------------------------------------------------------- multi-device

def test_sharded_step_matches_unsharded_and_bank_is_replicated():
  devices = jax.devices()
  assert len(devices) >= 4
  mesh = Mesh(np.array(devices[:4]), ("data",))
  rng = np.random.default_rng(7)
  bank = _small_bank(rng, cap=32)
  labels = np.concatenate([_labels(rng, {0: 20, 1: 60, 2: 10, 255: 38}),
                           _labels(rng, {1: 100, 3: 20, 255: 8})])   # global batch of 4
  rep = rng.normal(size=(4, 8, 8, 6)).astype(np.float32)
  fts = rng.normal(size=(4, 8, 8, 8)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  kw = dict(SMALL, max_pixels=40, num_negatives=16)

  def step(bank, rep, fts, labels, key):
    k_loss, k_bank = jax.random.split(key)
    split = lambda x: x.reshape(2, 2, *x.shape[1:])
    loss_fn = functools.partial(dgcl.dgcl_loss, **kw)
    per_slice = lambda r: jax.vmap(loss_fn, (0, 0, 0, None, 0))(
        split(r), split(fts), split(labels), bank, jax.random.split(k_loss, 2))
    loss, grad = jax.value_and_grad(lambda r: jnp.mean(per_slice(r)))(rep)
    new_bank = bank.update(fts, rep, labels, k_bank, max_new_per_class=24, density_min_entries=10,
                           ks=(2, 4, 8))
    return loss, grad, new_bank

  want = jax.jit(step)(bank, rep, fts, labels, key)
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  args = (jax.device_put(bank, repl), jax.device_put(rep, data), jax.device_put(fts, data),
          jax.device_put(labels, data), jax.device_put(key, repl))
  got = jax.jit(step, out_shardings=(repl, data, repl))(*args)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-7)
  for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    shards = g.addressable_shards
    assert len(shards) == 4
    for s in shards:
      assert s.data.shape == g.shape
      np.testing.assert_array_equal(np.asarray(s.data), np.asarray(shards[0].data))


# ---------------------------------------------------------------- work in proportion to the pixels

def _ref_subset(mask, key, size):
  """The draw of the unbucketed implementation: top-`size` of uniform keys over the mask."""
  _, idx = jax.lax.top_k(jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0), size)
  return idx, jnp.arange(size) < jnp.minimum(jnp.sum(mask), size)


def _ref_loss(rep, fts, labels, bank, rng, *, temperature=0.5, ks=(8, 16, 32), num_anchors=200,
              num_positives=50, max_pixels=10000, num_negatives=512, ignore_classes=(0,)):
  """The unbucketed loss: every present class draws and computes min(max_pixels, P) rows."""
  rep = rep.reshape(-1, rep.shape[-1])
  fts = jax.lax.stop_gradient(fts.reshape(-1, fts.shape[-1]))
  labels = labels.reshape(-1)
  num_pix, cap = labels.shape[0], bank.capacity
  n_keep, n_neg = min(max_pixels, num_pix), min(num_negatives, num_pix)
  n_anc, n_pos, n_bpos = min(num_anchors, n_keep), min(num_positives, n_keep), min(num_positives, cap)
  losses, qual = [], []
  for c, key in enumerate(jax.random.split(rng, bank.num_classes)):
    k_keep, k_neg = jax.random.split(key)
    mask = labels == c
    n = jnp.sum(mask)
    b_count, bank_valid = bank.count[c], jnp.arange(cap) < bank.count[c]
    kept, kept_valid = _ref_subset(mask, k_keep, n_keep)
    dens = jnp.where(n > 32, dgcl.multi_scale_density(fts[kept], bank.fts[c], ks, key_mask=bank_valid), 1.0)
    a_sel = jax.lax.top_k(jnp.where(kept_valid, -dens, -jnp.inf), n_anc)[1]
    a_valid = jnp.arange(n_anc) < jnp.minimum(n, n_anc)
    p_sel = jax.lax.top_k(jnp.where(kept_valid, dens, -jnp.inf), n_pos)[1]
    p_valid = jnp.arange(n_pos) < jnp.minimum(n, n_pos)
    bp_sel = jax.lax.top_k(jnp.where(bank_valid, bank.density[c], -jnp.inf), n_bpos)[1]
    bp_valid = jnp.arange(n_bpos) < jnp.minimum(b_count, n_bpos)
    proto = (jnp.sum(jnp.where(p_valid[:, None], rep[kept[p_sel]], 0), 0)
             + jnp.sum(jnp.where(bp_valid[:, None], bank.rep[c][bp_sel], 0), 0)) / (p_valid.sum() + bp_valid.sum())
    neg_idx, neg_valid = _ref_subset((labels != c) & (labels != 255), k_neg, n_neg)
    t = density_lib.normalize(jax.lax.stop_gradient(jnp.concatenate([proto[None], rep[neg_idx]])))
    logits = density_lib.normalize(rep[kept[a_sel]]) @ t.T / temperature
    logits = jnp.where(jnp.concatenate([jnp.ones((1,), bool), neg_valid])[None], logits, -jnp.inf)
    logits = logits - jax.lax.stop_gradient(logits.max(1, keepdims=True))
    logp = jnp.where(a_valid, logits[:, 0] - jnp.log(jnp.exp(logits).sum(1) + 1e-6), 0.0)
    q = (n > 0) & (c not in ignore_classes)
    losses.append(jnp.where(q, -logp.sum() / jnp.maximum(a_valid.sum(), 1), 0.0))
    qual.append(q)
  return jnp.sum(jnp.stack(losses)) / jnp.maximum(jnp.sum(jnp.stack(qual)), 1)


def _ref_update(bank, fts, rep, labels, rng, *, max_new_per_class=1000, density_min_entries=1000,
                ks=(8, 16, 32)):
  """The unbucketed bank update: every class draws and computes min(max_new, P) rows."""
  fts, rep, labels = fts.reshape(-1, fts.shape[-1]), rep.reshape(-1, rep.shape[-1]), labels.reshape(-1)
  num_pix, cap = labels.shape[0], bank.capacity
  num_new, pos = min(max_new_per_class, num_pix), jnp.arange(bank.capacity)
  out = []
  for c, key in enumerate(jax.random.split(rng, bank.num_classes)):
    mask, count = labels == c, bank.count[c]
    idx, valid = _ref_subset(mask, key, num_new)
    in_order = jnp.minimum(jnp.sort(jnp.where(valid, idx, num_pix)), num_pix - 1)
    idx = jnp.where(jnp.sum(mask) <= num_new, in_order, idx)
    n_new = valid.sum()
    dens = jnp.where(count > density_min_entries,
                     dgcl.multi_scale_density(fts[idx], bank.fts[c], ks, key_mask=pos < count), 0.0)
    src_new, src_old = jnp.minimum(pos, num_new - 1), jnp.maximum(pos - n_new, 0)
    take = pos < n_new
    out.append((jnp.where(take[:, None], fts[idx][src_new], bank.fts[c][src_old]),
                jnp.where(take[:, None], rep[idx][src_new], bank.rep[c][src_old]),
                jnp.where(take, dens[src_new], bank.density[c][src_old]), jnp.minimum(count + n_new, cap)))
  return dgcl.MemoryBank(*(jnp.stack(x) for x in zip(*out)))


# Classes of 1 (no density), 33, 500, 5000 and 20000 (above max_pixels and max_new) pixels; 6 absent.
SIZES = {0: 890, 1: 1, 2: 33, 3: 500, 4: 5000, 5: 20000, 255: 200}
PROPORTIONAL = dict(temperature=0.5, ks=(2, 4, 8), num_anchors=20, num_positives=10, num_negatives=64)


def _sized_inputs(seed, sizes=SIZES, num_classes=7, cap=64, shape=(2, 128, 104)):
  rng = np.random.default_rng(seed)
  bank = _small_bank(rng, num_classes=num_classes, cap=cap)
  bank = bank.replace(count=jnp.asarray([cap, cap, cap // 2, cap, 40, cap, cap], jnp.int32))
  labels = _labels(rng, sizes, shape)
  rep = jnp.asarray(rng.normal(size=shape + (6,)), jnp.float32)
  fts = jnp.asarray(rng.normal(size=shape + (8,)), jnp.float32)
  return bank, rep, fts, labels


def test_proportional_loss_equals_unbucketed(ref):
  bank, rep, fts, labels = _sized_inputs(8)
  key = jax.random.PRNGKey(5)
  want, want_grad = jax.jit(jax.value_and_grad(functools.partial(_ref_loss, **PROPORTIONAL)))(
      rep, fts, labels, bank, key)
  assert float(want) > 0
  for row_block in (None, 100):
    got, grad = _loss_vg(rep, fts, labels, bank, key, row_block=row_block, **PROPORTIONAL)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-7)
  # Gradient at the anchors only: class 1's one pixel and 20 of each of 2..5 (0 ignored, 6 absent).
  assert np.sum(np.any(np.asarray(grad) != 0, axis=-1)) == 81
  # The fixtures' case against the unbucketed loss.
  fix_bank = dgcl.MemoryBank(
      fts=jnp.stack([ref[f"bank/after3/class{c}/fts"] for c in range(4)]),
      rep=jnp.stack([ref[f"bank/after3/class{c}/rep"] for c in range(4)]),
      density=jnp.stack([ref[f"bank/after3/class{c}/density"] for c in range(4)]),
      count=jnp.full((4,), 1200, jnp.int32))
  args = (jnp.asarray(ref["loss/mixed/rep"]), jnp.asarray(ref["loss/mixed/fts"]),
          jnp.asarray(ref["loss/mixed/labels"], jnp.int32), fix_bank, jax.random.PRNGKey(3))
  want, want_grad = jax.jit(jax.value_and_grad(_ref_loss))(*args)
  got, grad = _loss_vg(*args)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-8)


def test_proportional_slices_equal_unbucketed():
  """Per-slice draw sizes and density rows follow the largest slice: each slice's loss unchanged."""
  bank, rep0, fts0, labels0 = _sized_inputs(9)
  _, rep1, fts1, _ = _sized_inputs(10)
  swapped = {**SIZES, 1: 5000, 4: 1, 2: 20000, 5: 33}   # another count per class
  labels1 = _labels(np.random.default_rng(11), swapped, (2, 128, 104))
  rep, fts, labels = jnp.stack([rep0, rep1]), jnp.stack([fts0, fts1]), jnp.stack([labels0, labels1])
  keys = jax.random.split(jax.random.PRNGKey(6), 2)
  kw = dict(PROPORTIONAL, max_pixels=4000)
  want = jax.jit(jax.vmap(functools.partial(_ref_loss, **kw), (0, 0, 0, None, 0)))(rep, fts, labels, bank, keys)
  got = jax.jit(functools.partial(dgcl.dgcl_loss_slices, **kw))(rep, fts, labels, bank, keys)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  per = jax.jit(jax.vmap(functools.partial(dgcl.dgcl_loss, **kw), (0, 0, 0, None, 0)))(rep, fts, labels, bank, keys)
  np.testing.assert_allclose(np.asarray(per), np.asarray(want), rtol=1e-5)


def test_proportional_update_equals_unbucketed():
  bank, rep, fts, labels = _sized_inputs(12)
  kw = dict(max_new_per_class=1000, density_min_entries=50, ks=(2, 4, 8))
  key = jax.random.PRNGKey(7)
  want = jax.jit(functools.partial(_ref_update, **kw))(bank, fts, rep, labels, key)
  got = _update(bank, fts, rep, labels, key, **kw)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got.fts[6]), np.asarray(bank.fts[6]))   # absent: as it was
  np.testing.assert_array_equal(np.asarray(got.fts[1, 1:]), np.asarray(bank.fts[1, :-1]))   # one pixel in
  # Densities only where the class held more than density_min_entries (class 4 held 40).
  assert np.all(np.asarray(got.density[5]) != 0) and np.all(np.asarray(got.density[4]) == 0)


def _count_density_rows(monkeypatch):
  """Patches the density so that each block it computes reports its row count; returns the list."""
  rows = []
  density_fn = density_lib.density_fn

  def counting(*args, **kwargs):
    block = density_fn(*args, **kwargs)

    def counted(f):
      jax.debug.callback(lambda x: rows.append(int(x)), f.shape[0], ordered=False)
      return block(f)
    return counted

  monkeypatch.setattr(density_lib, "density_fn", counting)
  return rows


def test_absent_and_small_classes_cost_no_density(monkeypatch):
  rows = _count_density_rows(monkeypatch)
  bank, rep, fts, labels = _sized_inputs(13)
  kw = dict(PROPORTIONAL, row_block=16)
  loss = jax.jit(jax.value_and_grad(functools.partial(dgcl.dgcl_loss, **kw)))
  jax.block_until_ready(loss(rep, fts, labels, bank, jax.random.PRNGKey(0)))
  # Class 1 (1 pixel) and 6 (absent): nothing; 0 is ignored; 33 / 500 / 5000 pixels in blocks
  # of 16, 20000 capped at max_pixels.
  want = [-(-n // 16) * 16 for n in (33, 500, 5000, 10000)]
  jax.effects_barrier()
  assert sum(rows) == sum(want) and set(rows) == {16}
  rows.clear()
  jax.block_until_ready(_update(bank, fts, rep, labels, jax.random.PRNGKey(0), max_new_per_class=1000,
                                density_min_entries=50, ks=(2, 4, 8), row_block=16))
  # Classes 0, 1 (one pixel), 3, 5 (capped at max_new); not 2 and 4 (32 and 40 entries <=
  # density_min_entries), not 6 (absent).
  jax.effects_barrier()
  assert sum(rows) == sum(-(-min(n, 1000) // 16) * 16 for n in (890, 1, 500, 20000))
  rows.clear()
  only = np.full(labels.shape, 255, np.int32)
  only[0, 0, :40] = 3   # one class of 40 pixels: 3 blocks of 16 rows; every other class absent
  jax.block_until_ready(loss(rep, fts, jnp.asarray(only), bank, jax.random.PRNGKey(0)))
  slices = jax.jit(functools.partial(dgcl.dgcl_loss_slices, **kw))
  jax.block_until_ready(slices(rep[None], fts[None], jnp.asarray(only)[None], bank,
                               jax.random.PRNGKey(0)[None]))
  jax.effects_barrier()
  assert rows == [16, 16, 16, 16, 16, 16]


def test_loss_density_map_spares_the_update(monkeypatch):
  rows = _count_density_rows(monkeypatch)
  bank, rep, fts, labels = _sized_inputs(14)
  kw = dict(PROPORTIONAL, row_block=16)
  loss, dmap = jax.jit(functools.partial(dgcl.dgcl_loss, return_density=True, **kw))(
      rep, fts, labels, bank, jax.random.PRNGKey(1))
  np.testing.assert_allclose(float(loss), float(jax.jit(functools.partial(dgcl.dgcl_loss, **kw))(
      rep, fts, labels, bank, jax.random.PRNGKey(1))), rtol=1e-6)
  dmap, flat = np.asarray(dmap), np.asarray(labels)
  assert dmap.shape == labels.shape
  for c, n in SIZES.items():   # computed for every pixel of 2, 3, 4 and 10000 of 5's
    known = np.isfinite(dmap[flat == c])
    assert known.sum() == {2: 33, 3: 500, 4: 5000, 5: 10000}.get(c, 0), c
    if known.any():
      want = dgcl.multi_scale_density(fts[flat == c][known], bank.fts[c], (2, 4, 8),
                                      key_mask=jnp.arange(64) < bank.count[c])
      np.testing.assert_allclose(dmap[flat == c][known], np.asarray(want), atol=1e-6)
  rows.clear()
  ukw = dict(max_new_per_class=1000, density_min_entries=30, ks=(2, 4, 8), row_block=16)
  want = jax.block_until_ready(_update(bank, fts, rep, labels, jax.random.PRNGKey(2), **ukw))
  jax.effects_barrier()
  computed = sum(rows)
  rows.clear()
  got = jax.block_until_ready(
      _update(bank, fts, rep, labels, jax.random.PRNGKey(2), density=jnp.asarray(dmap), **ukw))
  jax.effects_barrier()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  # Every class holds > 30 entries; left to compute with the map: 0 (ignored by the loss), 1 (one
  # pixel: no density in the loss) and 5 (20000 pixels: its draw is not within the loss's 10000).
  assert computed == sum(-(-min(n, 1000) // 16) * 16 for n in (890, 1, 33, 500, 1000, 1000))
  assert sum(rows) == sum(-(-n // 16) * 16 for n in (890, 1, 1000))
  # Slices: one map per slice, as dgcl_loss's.
  sl = jax.jit(functools.partial(dgcl.dgcl_loss_slices, return_density=True, **kw))(
      rep[None], fts[None], labels[None], bank, jax.random.PRNGKey(1)[None])
  np.testing.assert_allclose(np.asarray(sl[0]), [float(loss)], rtol=1e-6)
  np.testing.assert_array_equal(np.isnan(np.asarray(sl[1][0])), np.isnan(dmap))
