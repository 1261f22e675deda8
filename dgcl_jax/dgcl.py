"""Multi-scale density, the per-class memory bank and the density-guided contrastive loss.

REFERENCE.md section 4, with static shapes: loops over classes are `lax.map` (one class's
[pixels x capacity] similarity live at a time), random subsets without replacement are top-k
over uniform keys restricted by a mask, and counts are mask sums.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NORM_EPS = 1e-12   # torch.nn.functional.normalize


def _normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, eps) over the last axis; gradient 0 (not NaN) at zero rows."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def top_k_values(x: jax.Array, k: int, chunk: int | None = None) -> jax.Array:
  """The k largest values of each row of x [..., N], descending: [..., k].

  With `chunk`, exact top-k as ceil(k / chunk) top-`chunk` passes, each masking the previous
  pass's picks with -inf (on GPU a top-k with k > 16 can lower to a full sort of the row).
  """
  if chunk is None or k <= chunk:
    return lax.top_k(x, k)[0]
  parts = []
  remaining = k
  while remaining > 0:   # static: ceil(k / chunk) passes
    kk = min(chunk, remaining)
    vals, idx = lax.top_k(x, kk)
    parts.append(vals)
    remaining -= kk
    if remaining > 0:
      x = jnp.put_along_axis(x, idx, -jnp.inf, axis=-1, inplace=False)
  return jnp.concatenate(parts, axis=-1)


def multi_scale_density(feats: jax.Array, keys: jax.Array, ks: Sequence[int] = (8, 16, 32),
                        key_mask: jax.Array | None = None, topk_chunk: int | None = None,
                        row_chunk: int | None = 2048) -> jax.Array:
  """Density of feats [M, C] against keys [N, C] -> [M] float32.

  Cosine similarities S = F K^T; for each k the mean of the k largest values of a row; the
  density is the mean over ks. `key_mask` [N] bool marks valid keys; with fewer than k valid
  keys the mean runs over the valid ones (0 when there are none). With `row_chunk`, rows are
  processed sequentially in blocks of that many, so only a [row_chunk, N] block of S is live.
  """
  ks = tuple(int(k) for k in ks)
  kmax = min(max(ks), keys.shape[0])
  kn = _normalize(keys.astype(jnp.float32))
  n_valid = None if key_mask is None else jnp.sum(key_mask.astype(jnp.int32))

  def block(f):
    sim = jnp.einsum("mc,nc->mn", _normalize(f.astype(jnp.float32)), kn,
                     preferred_element_type=jnp.float32)
    if key_mask is not None:
      sim = jnp.where(key_mask[None, :], sim, -jnp.inf)
    top = top_k_values(sim, kmax, topk_chunk)
    if key_mask is None:
      means = [jnp.mean(top[:, :min(k, kmax)], axis=1) for k in ks]
    else:
      top = jnp.where(jnp.isfinite(top), top, 0.0)
      means = [jnp.sum(top[:, :min(k, kmax)], axis=1) / jnp.maximum(jnp.minimum(k, n_valid), 1)
               for k in ks]
    return sum(means) / len(means)

  m = feats.shape[0]
  if row_chunk is None or m <= row_chunk:
    return block(feats)
  n_blocks = -(-m // row_chunk)
  padded = jnp.pad(feats, ((0, n_blocks * row_chunk - m), (0, 0)))
  out = lax.map(block, padded.reshape(n_blocks, row_chunk, feats.shape[1]))
  return out.reshape(-1)[:m]


def _random_subset(mask: jax.Array, rng: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Up to `size` indices of True entries of mask [N], uniform without replacement.

  Returns (indices [size] int32, valid [size] bool); valid entries come first, and every True
  entry is taken when there are at most `size` of them.
  """
  u = jax.random.uniform(rng, mask.shape)
  score = jnp.where(mask, u, -1.0)
  _, idx = lax.top_k(score, size)
  n = jnp.sum(mask.astype(jnp.int32))
  valid = jnp.arange(size) < jnp.minimum(n, size)
  return idx, valid


@flax.struct.dataclass
class MemoryBank:
  """Per-class FIFO queues of (fts, rep, density), newest at index 0.

  fts [K, cap, Cf] f32, rep [K, cap, Cr] f32, density [K, cap] f32, count [K] int32.
  """
  fts: jax.Array
  rep: jax.Array
  density: jax.Array
  count: jax.Array

  @classmethod
  def create(cls, num_classes: int, capacity: int, fts_dim: int, rep_dim: int) -> "MemoryBank":
    return cls(fts=jnp.zeros((num_classes, capacity, fts_dim), jnp.float32),
               rep=jnp.zeros((num_classes, capacity, rep_dim), jnp.float32),
               density=jnp.zeros((num_classes, capacity), jnp.float32),
               count=jnp.zeros((num_classes,), jnp.int32))

  @property
  def num_classes(self) -> int:
    return self.fts.shape[0]

  @property
  def capacity(self) -> int:
    return self.fts.shape[1]

  def counts(self) -> jax.Array:
    """[K] int32 entries held per class."""
    return self.count

  def is_full(self) -> jax.Array:
    """Scalar bool: every class (class 0 included) holds `capacity` entries."""
    return jnp.all(self.count >= self.capacity)

  def class_entries(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host helper: (fts [n, Cf], rep [n, Cr], density [n]) of class c's valid entries, newest first."""
    n = int(np.asarray(self.count)[c])
    # Slice on the host: device slices of varying n would each compile.
    return (np.asarray(self.fts)[c, :n], np.asarray(self.rep)[c, :n], np.asarray(self.density)[c, :n])

  def update(self, fts: jax.Array, rep: jax.Array, labels: jax.Array, rng: jax.Array, *,
             max_new_per_class: int = 1000, density_min_entries: int = 1000,
             ks: Sequence[int] = (8, 16, 32), topk_chunk: int | None = None) -> "MemoryBank":
    """Pushes fts [B, H, W, Cf], rep [B, H, W, Cr] of pixels labeled [B, H, W] (255 ignored).

    Per class: at most `max_new_per_class` of its pixels, drawn without replacement; their
    density against the class's current entries if it holds more than `density_min_entries`,
    else 0; they enter at the front, the oldest entries fall off beyond capacity.
    """
    num_classes, cap = self.num_classes, self.capacity
    fts, rep, labels = jnp.asarray(fts), jnp.asarray(rep), jnp.asarray(labels)
    fts = fts.reshape(-1, fts.shape[-1]).astype(jnp.float32)
    rep = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
    labels = labels.reshape(-1).astype(jnp.int32)
    num_pix = labels.shape[0]
    num_new = min(int(max_new_per_class), num_pix)
    pos = jnp.arange(cap)

    def one_class(xs):
      c, key, q_fts, q_rep, q_dens, count = xs
      idx, valid = _random_subset(labels == c, key, num_new)
      n_new = jnp.sum(valid.astype(jnp.int32))
      # When every pixel of the class is taken the reference keeps their row-major order (which
      # decides what a partial eviction drops); a real draw stays in random order, as randperm.
      in_order = jnp.minimum(jnp.sort(jnp.where(valid, idx, num_pix)), num_pix - 1)
      idx = jnp.where(jnp.sum(labels == c) <= num_new, in_order, idx)
      new_fts = fts[idx]
      new_rep = rep[idx]
      # The reference computes density against the queue as it stands before this insert.
      new_dens = lax.cond(
          count > density_min_entries,
          lambda: multi_scale_density(new_fts, q_fts, ks, key_mask=pos < count, topk_chunk=topk_chunk),
          lambda: jnp.zeros((num_new,), jnp.float32))
      take_new = pos < n_new
      src_new = jnp.minimum(pos, num_new - 1)
      src_old = jnp.maximum(pos - n_new, 0)
      out_fts = jnp.where(take_new[:, None], new_fts[src_new], q_fts[src_old])
      out_rep = jnp.where(take_new[:, None], new_rep[src_new], q_rep[src_old])
      out_dens = jnp.where(take_new, new_dens[src_new], q_dens[src_old])
      return out_fts, out_rep, out_dens, jnp.minimum(count + n_new, cap)

    keys = jax.random.split(rng, num_classes)
    out = lax.map(one_class, (jnp.arange(num_classes), keys, self.fts, self.rep, self.density,
                              self.count))
    return MemoryBank(fts=out[0], rep=out[1], density=out[2], count=out[3].astype(jnp.int32))


def _class_qualifies(c, labels, ignore_classes, ignore_label):
  present = jnp.any(labels == c)
  ok = c != ignore_label
  for ic in ignore_classes:
    ok = ok & (c != ic)
  return present & ok


def _class_loss(c, key, b_fts, b_rep, b_dens, b_count, rep, fts, labels, *, temperature, ks,
                num_anchors, num_positives, max_pixels, num_negatives, ignore_label, topk_chunk):
  """Loss of class c on one slice (flattened rep [P, Cr] f32, fts [P, Cf], labels [P])."""
  num_pix = labels.shape[0]
  cap = b_fts.shape[0]
  n_keep = min(max_pixels, num_pix)
  n_anc = min(num_anchors, n_keep)
  n_pos = min(num_positives, n_keep)
  n_bpos = min(num_positives, cap)
  n_neg = min(num_negatives, num_pix)
  k_keep, k_neg = jax.random.split(key)

  mask = labels == c
  n = jnp.sum(mask.astype(jnp.int32))
  kept, kept_valid = _random_subset(mask, k_keep, n_keep)
  bank_valid = jnp.arange(cap) < b_count
  dens = lax.cond(
      n > 32,
      lambda: multi_scale_density(fts[kept], b_fts, ks, key_mask=bank_valid, topk_chunk=topk_chunk),
      lambda: jnp.ones((n_keep,), jnp.float32))

  # Anchors: lowest density (n is counted before the max_pixels cap, as the reference).
  _, a_sel = lax.top_k(jnp.where(kept_valid, -dens, -jnp.inf), n_anc)
  a_valid = jnp.arange(n_anc) < jnp.minimum(n, n_anc)
  anchors = rep[kept[a_sel]]

  # Prototype: one mean over the highest-density pixels and the bank's highest-density entries.
  _, p_sel = lax.top_k(jnp.where(kept_valid, dens, -jnp.inf), n_pos)
  p_valid = jnp.arange(n_pos) < jnp.minimum(n, n_pos)
  _, bp_sel = lax.top_k(jnp.where(bank_valid, b_dens, -jnp.inf), n_bpos)
  bp_valid = jnp.arange(n_bpos) < jnp.minimum(b_count, n_bpos)
  pos_sum = (jnp.sum(jnp.where(p_valid[:, None], rep[kept[p_sel]], 0.0), axis=0)
             + jnp.sum(jnp.where(bp_valid[:, None], b_rep[bp_sel], 0.0), axis=0))
  pos_cnt = jnp.sum(p_valid) + jnp.sum(bp_valid)
  proto = lax.stop_gradient(pos_sum / jnp.maximum(pos_cnt, 1).astype(jnp.float32))

  # Negatives: any labeled pixel of another class (class 0 included), not only the kept ones.
  neg_idx, neg_valid = _random_subset((labels != c) & (labels != ignore_label), k_neg, n_neg)
  negs = lax.stop_gradient(rep[neg_idx])

  targets = _normalize(jnp.concatenate([proto[None], negs], axis=0))
  logits = jnp.einsum("ac,tc->at", _normalize(anchors), targets,
                      preferred_element_type=jnp.float32) / temperature
  t_valid = jnp.concatenate([jnp.ones((1,), bool), neg_valid])
  logits = jnp.where(t_valid[None, :], logits, -jnp.inf)
  logits = logits - lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  log_prob = logits[:, 0] - jnp.log(jnp.sum(jnp.exp(logits), axis=1) + 1e-6)
  log_prob = jnp.where(a_valid, log_prob, 0.0)
  return -jnp.sum(log_prob) / jnp.maximum(jnp.sum(a_valid), 1).astype(jnp.float32)


def _prepare(rep, fts, labels):
  rep, fts, labels = jnp.asarray(rep), jnp.asarray(fts), jnp.asarray(labels)
  rep = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
  fts = lax.stop_gradient(fts.reshape(-1, fts.shape[-1]).astype(jnp.float32))
  return rep, fts, labels.reshape(-1).astype(jnp.int32)


def dgcl_loss(rep: jax.Array, fts: jax.Array, labels: jax.Array, bank: MemoryBank, rng: jax.Array, *,
              temperature: float = 0.5, ks: Sequence[int] = (8, 16, 32), num_anchors: int = 200,
              num_positives: int = 50, max_pixels: int = 10000, num_negatives: int = 512,
              ignore_classes: Sequence[int] = (0,), ignore_label: int = 255,
              topk_chunk: int | None = None) -> jax.Array:
  """Density-guided contrastive loss of one slice -> scalar float32 (REFERENCE.md section 4).

  rep [B, H, W, Cr] (gradient flows through the anchors only), fts [B, H, W, Cf] (no gradient),
  labels [B, H, W] (255 ignored). Mean over qualifying classes; 0 when none. Vmappable over a
  leading slice axis with `bank` broadcast (then absent classes are masked, not skipped; see
  `dgcl_loss_slices` for a version that skips classes absent from every slice).
  """
  rep, fts, labels = _prepare(rep, fts, labels)
  kw = dict(temperature=temperature, ks=tuple(ks), num_anchors=num_anchors,
            num_positives=num_positives, max_pixels=max_pixels, num_negatives=num_negatives,
            ignore_label=ignore_label, topk_chunk=topk_chunk)
  ignore_classes = tuple(ignore_classes)

  def one_class(xs):
    c, key, b_fts, b_rep, b_dens, b_count = xs
    q = _class_qualifies(c, labels, ignore_classes, ignore_label)
    loss = lax.cond(q, lambda: _class_loss(c, key, b_fts, b_rep, b_dens, b_count, rep, fts, labels, **kw),
                    lambda: jnp.zeros((), jnp.float32))
    return loss, q

  keys = jax.random.split(rng, bank.num_classes)
  losses, qual = lax.map(one_class, (jnp.arange(bank.num_classes), keys, bank.fts, bank.rep,
                                     bank.density, bank.count))
  return jnp.sum(losses) / jnp.maximum(jnp.sum(qual), 1).astype(jnp.float32)


def dgcl_loss_slices(rep: jax.Array, fts: jax.Array, labels: jax.Array, bank: MemoryBank, rngs: jax.Array,
                     **kwargs) -> jax.Array:
  """Per-slice losses [S] of rep [S, B, H, W, Cr], fts, labels [S, B, H, W], rngs [S] keys.

  Equal to `jax.vmap(dgcl_loss, (0, 0, 0, None, 0))`, but with the class loop outside the slice
  vmap, so a class absent from every slice costs nothing.
  """
  ignore_classes = tuple(kwargs.pop("ignore_classes", (0,)))
  ignore_label = kwargs.get("ignore_label", 255)
  kw = dict(temperature=0.5, ks=(8, 16, 32), num_anchors=200, num_positives=50, max_pixels=10000,
            num_negatives=512, ignore_label=255, topk_chunk=None)
  unknown = set(kwargs) - set(kw)
  if unknown:
    raise TypeError(f"dgcl_loss_slices: unknown arguments {sorted(unknown)}")
  kw.update(kwargs)
  kw["ks"] = tuple(kw["ks"])
  rep, fts, labels = jax.vmap(_prepare)(rep, fts, labels)
  num_slices = rep.shape[0]
  keys = jax.vmap(lambda k: jax.random.split(k, bank.num_classes))(rngs)   # [S, K]
  keys = jnp.swapaxes(keys, 0, 1)

  def one_class(xs):
    c, key, b_fts, b_rep, b_dens, b_count = xs
    q = jax.vmap(lambda l: _class_qualifies(c, l, ignore_classes, ignore_label))(labels)

    def compute():
      loss = jax.vmap(lambda k, r, f, l: _class_loss(c, k, b_fts, b_rep, b_dens, b_count, r, f, l, **kw))(
          key, rep, fts, labels)
      return jnp.where(q, loss, 0.0)

    loss = lax.cond(jnp.any(q), compute, lambda: jnp.zeros((num_slices,), jnp.float32))
    return loss, q

  losses, qual = lax.map(one_class, (jnp.arange(bank.num_classes), keys, bank.fts, bank.rep,
                                     bank.density, bank.count))
  return jnp.sum(losses, axis=0) / jnp.maximum(jnp.sum(qual, axis=0), 1).astype(jnp.float32)
