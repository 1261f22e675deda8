"""Multi-scale density, the per-class memory bank and the density-guided contrastive loss.

REFERENCE.md section 4, with static shapes: loops over classes are `lax.map` / `fori_loop`,
random subsets without replacement are top-k over uniform keys restricted by a mask, and counts
are mask sums. A class's work follows the pixels it has: its subset is drawn at the smallest of
a few static sizes (`buckets`, chosen with `lax.switch`) that holds them, and its densities are
computed in blocks of `row_block` rows by a loop that runs ceil(rows / row_block) times; an
absent class does no density work at all. The loss's class loop has no gradient: it picks
anchors and targets, and one gather of the anchors after it carries the gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

_NORM_EPS = 1e-12   # torch.nn.functional.normalize
# Sizes a class's random subset is drawn at (each one top_k; the largest is the cap).
DEFAULT_BUCKETS = (32, 128, 512, 2048, 8192)


def default_row_block() -> int:
  """Rows per density block: small on CPU (cost follows the pixels closely), larger on
  accelerators (fewer loop iterations)."""
  return 128 if jax.default_backend() == "cpu" else 1024


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


def _density_fn(keys: jax.Array, ks: Sequence[int], key_mask: jax.Array | None,
                topk_chunk: int | None):
  """f [m, C] -> density [m] f32 against keys [N, C] (normalized once, outside any row loop)."""
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

  return block


def multi_scale_density(feats: jax.Array, keys: jax.Array, ks: Sequence[int] = (8, 16, 32),
                        key_mask: jax.Array | None = None, topk_chunk: int | None = None,
                        row_chunk: int | None = 2048) -> jax.Array:
  """Density of feats [M, C] against keys [N, C] -> [M] float32.

  Cosine similarities S = F K^T; for each k the mean of the k largest values of a row; the
  density is the mean over ks. `key_mask` [N] bool marks valid keys; with fewer than k valid
  keys the mean runs over the valid ones (0 when there are none). With `row_chunk`, rows are
  processed sequentially in blocks of that many, so only a [row_chunk, N] block of S is live.
  """
  block = _density_fn(keys, ks, key_mask, topk_chunk)
  m = feats.shape[0]
  if row_chunk is None or m <= row_chunk:
    return block(feats)
  n_blocks = -(-m // row_chunk)
  padded = jnp.pad(feats, ((0, n_blocks * row_chunk - m), (0, 0)))
  out = lax.map(block, padded.reshape(n_blocks, row_chunk, feats.shape[1]))
  return out.reshape(-1)[:m]


def _rows_density(fts: jax.Array, idx: jax.Array, num_rows: jax.Array, keys: jax.Array,
                  ks: Sequence[int], key_mask: jax.Array, topk_chunk: int | None, row_block: int,
                  fill: float) -> jax.Array:
  """[R]: density of fts[idx[i]] against keys for i < num_rows (traced), `fill` for the rest.

  fts [P, C], idx [R] int32. A loop over blocks of `row_block` rows runs ceil(num_rows /
  row_block) times, so the work follows num_rows, not R; num_rows = 0 computes nothing.
  """
  size = idx.shape[0]
  row_block = max(1, min(int(row_block), size))
  n_blocks = -(-size // row_block)
  idx = jnp.pad(idx, (0, n_blocks * row_block - size))
  density = _density_fn(keys, ks, key_mask, topk_chunk)

  def body(i, out):
    rows = lax.dynamic_slice(idx, (i * row_block,), (row_block,))
    return lax.dynamic_update_slice(out, density(fts[rows]), (i * row_block,))

  trips = (num_rows + row_block - 1) // row_block
  out = lax.fori_loop(0, trips, body, jnp.full((n_blocks * row_block,), fill, jnp.float32))
  return jnp.where(jnp.arange(size) < num_rows, out[:size], fill)


def _bucket_sizes(buckets: Sequence[int], cap: int) -> tuple[int, ...]:
  """The static subset sizes for at most `cap` rows: the buckets below cap, then cap."""
  return tuple(sorted({int(b) for b in buckets if 0 < int(b) < cap})) + (cap,)


def _bucket_index(m: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """Index of the smallest of `sizes` (ascending) that is >= m, for 0 <= m <= sizes[-1]."""
  return sum(((m > size).astype(jnp.int32) for size in sizes[:-1]), jnp.zeros((), jnp.int32))


def _random_subset(mask: jax.Array, rng: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Up to `size` indices of True entries of mask [N], uniform without replacement.

  Returns (indices [size] int32, valid [size] bool); valid entries come first, and every True
  entry is taken when there are at most `size` of them. The draw for a smaller `size` is a prefix
  of the draw for a larger one with the same rng (top_k is stable), so bucketing keeps the draws.
  """
  u = jax.random.uniform(rng, mask.shape)
  score = jnp.where(mask, u, -1.0)
  _, idx = lax.top_k(score, size)
  n = jnp.sum(mask.astype(jnp.int32))
  valid = jnp.arange(size) < jnp.minimum(n, size)
  return idx, valid


def _draw(mask: jax.Array, rng: jax.Array, branch: jax.Array, sizes: tuple[int, ...],
          row_major: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`_random_subset(mask, rng, sizes[branch])` padded to sizes[-1] (indices 0, invalid).

  With `row_major` (traced bool) true, the valid indices are sorted ascending.
  """
  cap = sizes[-1]

  def draw(size):
    idx, valid = _random_subset(mask, rng, size)
    if row_major is not None:
      in_order = jnp.minimum(jnp.sort(jnp.where(valid, idx, mask.shape[0])), mask.shape[0] - 1)
      idx = jnp.where(row_major, in_order, idx)
    return jnp.pad(idx, (0, cap - size)), jnp.pad(valid, (0, cap - size))

  if len(sizes) == 1:
    return draw(sizes[0])
  return lax.switch(branch, [functools.partial(draw, size) for size in sizes])


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

  def is_full(self) -> jax.Array:
    """Scalar bool: every class (class 0 included) holds `capacity` entries."""
    return jnp.all(self.count >= self.capacity)

  def update(self, fts: jax.Array, rep: jax.Array, labels: jax.Array, rng: jax.Array, *,
             max_new_per_class: int = 1000, density_min_entries: int = 1000,
             ks: Sequence[int] = (8, 16, 32), topk_chunk: int | None = None,
             buckets: Sequence[int] = DEFAULT_BUCKETS, row_block: int | None = None,
             density: jax.Array | None = None) -> "MemoryBank":
    """Pushes fts [B, H, W, Cf], rep [B, H, W, Cr] of pixels labeled [B, H, W] (255 ignored).

    Per class: at most `max_new_per_class` of its pixels, drawn without replacement; their
    density against the class's current entries if it holds more than `density_min_entries`,
    else 0; they enter at the front, the oldest entries fall off beyond capacity. The density
    work follows the pixels drawn (blocks of `row_block` rows, default `default_row_block()`);
    a class without pixels is left as it is. `buckets`: the sizes the draw is made at.
    `density` [B, H, W] f32 (NaN: unknown), e.g. from `dgcl_loss(return_density=True)` with this
    bank and the same ks: a class whose drawn pixels all have one uses those.
    """
    num_classes, cap = self.num_classes, self.capacity
    fts, rep, labels = jnp.asarray(fts), jnp.asarray(rep), jnp.asarray(labels)
    fts = fts.reshape(-1, fts.shape[-1]).astype(jnp.float32)
    rep = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
    labels = labels.reshape(-1).astype(jnp.int32)
    num_pix = labels.shape[0]
    if density is not None:
      density = jnp.asarray(density, jnp.float32).reshape(-1)
      if density.shape != labels.shape:
        raise ValueError(f"MemoryBank.update: density has {density.shape[0]} entries, labels {num_pix}")
    num_new = min(int(max_new_per_class), num_pix)
    sizes = _bucket_sizes(buckets, num_new)
    row_block = default_row_block() if row_block is None else int(row_block)
    pos = jnp.arange(cap)

    def draw_class(xs):
      """Class c's new pixels [num_new] (first n_new valid) and their densities [num_new]."""
      c, key, q_fts, count = xs
      mask = labels == c
      n = jnp.sum(mask.astype(jnp.int32))

      def insert():
        # When every pixel of the class is taken the reference keeps their row-major order (which
        # decides what a partial eviction drops); a real draw stays in random order, as randperm.
        idx, valid = _draw(mask, key, _bucket_index(jnp.minimum(n, num_new), sizes), sizes,
                           row_major=n <= num_new)
        n_new = jnp.sum(valid.astype(jnp.int32))
        # The reference computes density against the queue as it stands before this insert.
        rows = jnp.where(count > density_min_entries, n_new, 0)
        if density is not None:
          given = density[idx]
          known = jnp.all(jnp.isfinite(given) | ~valid)
          rows = jnp.where(known, 0, rows)
        new_dens = _rows_density(fts, idx, rows, q_fts, ks, pos < count, topk_chunk, row_block, 0.0)
        if density is not None:
          new_dens = jnp.where(known & (count > density_min_entries), given, new_dens)
        return idx, n_new, new_dens

      return lax.cond(n > 0, insert, lambda: (jnp.zeros((num_new,), jnp.int32), jnp.zeros((), jnp.int32),
                                              jnp.zeros((num_new,), jnp.float32)))

    keys = jax.random.split(rng, num_classes)
    idx, n_new, new_dens = lax.map(draw_class, (jnp.arange(num_classes), keys, self.fts, self.count))
    # Row c's first n_new[c] entries are the new ones, then the old ones shifted back by n_new[c].
    # One class at a time, written into the bank in place (no second copy of the bank's arrays).
    count = jnp.minimum(self.count + n_new, cap).astype(jnp.int32)
    fts_bank, rep_bank, dens_bank = _insert_front(
        (self.fts, self.rep, self.density), (lambda c: fts[idx[c]], lambda c: rep[idx[c]], lambda c: new_dens[c]),
        n_new)
    return MemoryBank(fts=fts_bank, rep=rep_bank, density=dens_bank, count=count)


def _insert_front(banks, new_rows, n_new):
  """For each class c: banks[i][c] <- new_rows[i](c)[:n_new[c]] followed by banks[i][c][:cap - n_new[c]].

  banks: arrays [K, cap, ...]; new_rows: functions c -> [num_new, ...]; n_new [K] int32 <= num_new.
  A loop over classes that updates each row in place, so no array holds a second copy of a bank.
  """
  num_classes, cap = banks[0].shape[:2]

  def shift_in(row, new, n):
    num_new = new.shape[0]
    # old entry pos - n at pos >= n: a window of [zeros(num_new); row] starting at num_new - n.
    padded = jnp.concatenate([jnp.zeros((num_new,) + row.shape[1:], row.dtype), row])
    shifted = lax.dynamic_slice_in_dim(padded, num_new - n, cap)
    if num_new >= cap:
      head = new[:cap]
    else:
      head = jnp.concatenate([new, jnp.zeros((cap - num_new,) + row.shape[1:], row.dtype)])
    take_new = (jnp.arange(cap) < n).reshape((cap,) + (1,) * (row.ndim - 1))
    return jnp.where(take_new, head.astype(row.dtype), shifted)

  def body(c, arrays):
    return tuple(lax.dynamic_update_index_in_dim(a, shift_in(a[c], f(c), n_new[c]), c, 0)
                 for a, f in zip(arrays, new_rows))

  return lax.fori_loop(0, num_classes, body, tuple(banks))


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The density-guided loss's settings (REFERENCE.md section 4; config.dgcl and data.ignore_label).

  max_pixels: a class's pixels kept per slice (its densities are computed); buckets: the sizes
  its subset is drawn at; row_block: density rows per loop iteration (None: default_row_block());
  topk_chunk: top-k as passes of this size (None: one top_k).
  """
  temperature: float = 0.5
  ks: tuple[int, ...] = (8, 16, 32)
  num_anchors: int = 200
  num_positives: int = 50
  max_pixels: int = 10000
  num_negatives: int = 512
  ignore_classes: tuple[int, ...] = (0,)
  ignore_label: int = 255
  topk_chunk: int | None = None
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  row_block: int | None = None

  @classmethod
  def from_config(cls, config) -> "LossSettings":
    g = config.dgcl
    return cls(temperature=float(g.temperature), ks=tuple(int(k) for k in g.ks), num_anchors=int(g.num_anchors),
               num_positives=int(g.num_positives), max_pixels=int(g.max_pixels),
               num_negatives=int(g.num_negatives), ignore_classes=tuple(int(c) for c in g.ignore_classes),
               ignore_label=int(config.data.ignore_label))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shapes of one loss call: settings plus the sizes that follow from the pixel count."""
  settings: LossSettings
  sizes: tuple[int, ...]      # subset draw sizes, the last the cap n_keep
  row_block: int
  num_pix: int                # pixels per slice
  with_density: bool

  @property
  def num_anchors(self) -> int:
    return min(self.settings.num_anchors, self.sizes[-1])

  @property
  def num_targets(self) -> int:
    return 1 + min(self.settings.num_negatives, self.num_pix)


def _class_qualifies(c, labels, settings: LossSettings):
  ok = jnp.any(labels == c) & (c != settings.ignore_label)
  for ic in settings.ignore_classes:
    ok = ok & (c != ic)
  return ok


def _class_targets(c, key, class_bank, rep, fts, labels, branch, rows, plan: _Plan):
  """What the loss of class c on one slice needs, without gradient (all inputs stop-gradient).

  class_bank: the class's (fts [cap, Cf], rep [cap, Cr], density [cap], count []); rep [P, Cr]
  f32, fts [P, Cf], labels [P] flattened. The subset of at most n_keep = plan.sizes[-1] pixels
  is drawn at size sizes[branch] (>= the class's min(n, n_keep)); densities are computed for its
  first `rows` entries (>= min(n, n_keep) when n > 32, may be 0 otherwise); both are traced and
  may be shared by the slices of a vmap. Returns anchor pixel indices [A] int32, their validity
  [A] bool, the normalized targets (prototype, then negatives) [1 + N, Cr] and their validity
  [1 + N] bool; `plan.with_density` adds the pixels whose density was computed [n_keep] int32
  (P where none) and their densities [n_keep].
  """
  st = plan.settings
  b_fts, b_rep, b_dens, b_count = class_bank
  num_pix, cap = labels.shape[0], b_fts.shape[0]
  n_pos, n_bpos = min(st.num_positives, plan.sizes[-1]), min(st.num_positives, cap)
  k_keep, k_neg = jax.random.split(key)

  mask = labels == c
  n = jnp.sum(mask.astype(jnp.int32))
  kept, kept_valid = _draw(mask, k_keep, branch, plan.sizes)
  bank_valid = jnp.arange(cap) < b_count
  dens = _rows_density(fts, kept, rows, b_fts, st.ks, bank_valid, st.topk_chunk, plan.row_block, 1.0)
  dens = jnp.where(n > 32, dens, 1.0)

  # Anchors: lowest density (n is counted before the max_pixels cap, as the reference).
  _, a_sel = lax.top_k(jnp.where(kept_valid, -dens, -jnp.inf), plan.num_anchors)
  a_valid = jnp.arange(plan.num_anchors) < jnp.minimum(n, plan.num_anchors)

  # Prototype: one mean over the highest-density pixels and the bank's highest-density entries.
  _, p_sel = lax.top_k(jnp.where(kept_valid, dens, -jnp.inf), n_pos)
  p_valid = jnp.arange(n_pos) < jnp.minimum(n, n_pos)
  _, bp_sel = lax.top_k(jnp.where(bank_valid, b_dens, -jnp.inf), n_bpos)
  bp_valid = jnp.arange(n_bpos) < jnp.minimum(b_count, n_bpos)
  pos_sum = (jnp.sum(jnp.where(p_valid[:, None], rep[kept[p_sel]], 0.0), axis=0)
             + jnp.sum(jnp.where(bp_valid[:, None], b_rep[bp_sel], 0.0), axis=0))
  pos_cnt = jnp.sum(p_valid) + jnp.sum(bp_valid)
  proto = pos_sum / jnp.maximum(pos_cnt, 1).astype(jnp.float32)

  # Negatives: any labeled pixel of another class (class 0 included), not only the kept ones.
  neg_idx, neg_valid = _random_subset((labels != c) & (labels != st.ignore_label), k_neg, plan.num_targets - 1)
  targets = _normalize(jnp.concatenate([proto[None], rep[neg_idx]], axis=0))
  t_valid = jnp.concatenate([jnp.ones((1,), bool), neg_valid])
  out = (kept[a_sel], a_valid, targets, t_valid)
  if plan.with_density:
    out += (jnp.where(kept_valid & (n > 32), kept, num_pix), dens)
  return out


def _no_targets(plan: _Plan, rep_dim: int):
  """`_class_targets`'s output for a class without a loss: no valid anchor."""
  out = (jnp.zeros((plan.num_anchors,), jnp.int32), jnp.zeros((plan.num_anchors,), bool),
         jnp.zeros((plan.num_targets, rep_dim), jnp.float32), jnp.arange(plan.num_targets) < 1)
  if plan.with_density:
    out += (jnp.full((plan.sizes[-1],), plan.num_pix, jnp.int32), jnp.zeros((plan.sizes[-1],), jnp.float32))
  return out


def _density_map(num_pix, idx, dens):
  """[P] f32: dens [..., R] at pixels idx [..., R] (P = none), NaN at the other pixels."""
  return jnp.full((num_pix,), jnp.nan, jnp.float32).at[idx.reshape(-1)].set(dens.reshape(-1), mode="drop")


def _anchor_loss(rep, a_idx, a_valid, targets, t_valid, temperature):
  """Mean over classes with anchors of the per-class InfoNCE loss (the prototype is target 0).

  rep [P, Cr] f32 (the only input with gradient), a_idx / a_valid [K, A], targets [K, T, Cr],
  t_valid [K, T] -> scalar.
  """
  anchors = _normalize(rep[a_idx])                                        # [K, A, Cr]
  logits = jnp.einsum("kac,ktc->kat", anchors, targets, preferred_element_type=jnp.float32)
  logits = jnp.where(t_valid[:, None, :], logits / temperature, -jnp.inf)
  logits = logits - lax.stop_gradient(jnp.max(logits, axis=2, keepdims=True))
  log_prob = logits[..., 0] - jnp.log(jnp.sum(jnp.exp(logits), axis=2) + 1e-6)
  log_prob = jnp.where(a_valid, log_prob, 0.0)
  num = jnp.sum(a_valid, axis=1)
  per_class = -jnp.sum(log_prob, axis=1) / jnp.maximum(num, 1).astype(jnp.float32)
  return jnp.sum(per_class) / jnp.maximum(jnp.sum(num > 0), 1).astype(jnp.float32)


def _prepare(rep, fts, labels):
  rep, fts, labels = jnp.asarray(rep), jnp.asarray(fts), jnp.asarray(labels)
  rep = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
  fts = lax.stop_gradient(fts.reshape(-1, fts.shape[-1]).astype(jnp.float32))
  return rep, fts, labels.reshape(-1).astype(jnp.int32)


def _settings(settings: LossSettings | None, overrides) -> LossSettings:
  """`settings` (default LossSettings()) with keyword overrides; TypeError naming an unknown one."""
  settings = LossSettings() if settings is None else settings
  if overrides:
    overrides = {k: tuple(v) if k in ("ks", "ignore_classes", "buckets") else v for k, v in overrides.items()}
    settings = dataclasses.replace(settings, **overrides)
  return settings


def dgcl_loss(rep: jax.Array, fts: jax.Array, labels: jax.Array, bank: MemoryBank, rng: jax.Array,
              settings: LossSettings | None = None, *, return_density: bool = False, **overrides):
  """Density-guided contrastive loss of one slice -> scalar float32 (REFERENCE.md section 4).

  rep [B, H, W, Cr] (gradient flows through the anchors only), fts [B, H, W, Cf] (no gradient),
  labels [B, H, W] (settings.ignore_label ignored). Mean over qualifying classes; 0 when none.
  A class with n pixels computes min(n, max_pixels) densities (in blocks of `row_block` rows),
  none if n <= 32. `settings` (LossSettings) with keyword `overrides` of its fields. The
  one-slice case of `dgcl_loss_slices`; vmappable over a leading slice axis with `bank` broadcast.

  With `return_density`: (loss, density [B, H, W] f32), the density of each pixel against its
  class's bank entries where the loss computed it, NaN elsewhere (no gradient). Passed to
  `MemoryBank.update(density=...)` with the same bank and ks, it spares the update that work.
  """
  out = dgcl_loss_slices(jnp.asarray(rep)[None], jnp.asarray(fts)[None], jnp.asarray(labels)[None], bank,
                         jnp.asarray(rng)[None],
                         _settings(settings, overrides), return_density=return_density)
  return jax.tree.map(lambda x: x[0], out)


def dgcl_loss_slices(rep: jax.Array, fts: jax.Array, labels: jax.Array, bank: MemoryBank, rngs: jax.Array,
                     settings: LossSettings | None = None, *, return_density: bool = False, **overrides):
  """Per-slice losses [S] of rep [S, B, H, W, Cr], fts, labels [S, B, H, W], rngs [S] keys.

  Equal to `jax.vmap(dgcl_loss, (0, 0, 0, None, 0))`, with the class loop outside the slice
  vmap: a class absent from every slice costs nothing, and a class's draw size and density rows
  follow its largest count over the slices (one `lax.switch` and one loop per class, not a
  select over every branch). `return_density`: (losses, density [S, B, H, W]) as `dgcl_loss`.
  """
  st = _settings(settings, overrides)
  labels_shape = jnp.shape(labels)
  rep, fts, labels = jax.vmap(_prepare)(rep, fts, labels)
  num_slices, num_pix = labels.shape
  sizes = _bucket_sizes(st.buckets, min(int(st.max_pixels), num_pix))
  plan = _Plan(st, sizes, default_row_block() if st.row_block is None else int(st.row_block), num_pix,
               bool(return_density))
  # The class loop has no gradient: it picks the anchors, the loss gathers them once after it.
  rep_ng = lax.stop_gradient(rep)
  keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, bank.num_classes))(rngs), 0, 1)   # [K, S]
  none = _no_targets(plan, rep.shape[-1])

  def one_class(xs):
    c, key, class_bank = xs[0], xs[1], xs[2:]
    q = jax.vmap(lambda l: _class_qualifies(c, l, st))(labels)
    m = jnp.where(q, jnp.minimum(jnp.sum((labels == c).astype(jnp.int32), axis=1), sizes[-1]), 0)
    branch = _bucket_index(jnp.max(m), sizes)
    rows = jnp.max(jnp.where(m > 32, m, 0))

    def one_slice(q_s, k, r, f, l):
      got = _class_targets(c, k, class_bank, r, f, l, branch, rows, plan)
      return jax.tree.map(lambda a, b: jnp.where(q_s, a, b), got, none)

    all_none = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_slices,) + a.shape), none)
    return lax.cond(jnp.any(q), lambda: jax.vmap(one_slice)(q, key, rep_ng, fts, labels), lambda: all_none)

  picked = lax.map(one_class, (jnp.arange(bank.num_classes), keys, bank.fts, bank.rep,
                               bank.density, bank.count))              # each [K, S, ...]
  picked = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), picked)
  losses = jax.vmap(lambda r, *p: _anchor_loss(r, *p, st.temperature))(rep, *picked[:4])
  if not return_density:
    return losses
  return losses, jax.vmap(functools.partial(_density_map, num_pix))(*picked[4:]).reshape(labels_shape)
