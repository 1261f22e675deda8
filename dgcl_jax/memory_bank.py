"""The per-class memory bank of (features, representations, density) (REFERENCE.md section 4).

Per class a FIFO queue, newest first; the loop over classes is a `lax.map` (the draws and
densities) and a `fori_loop` that writes each class's row in place (the insert).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from dgcl_jax import density as density_lib


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
             buckets: Sequence[int] = density_lib.DEFAULT_BUCKETS, row_block: int | None = None,
             density: jax.Array | None = None) -> "MemoryBank":
    """Pushes fts [B, H, W, Cf], rep [B, H, W, Cr] of pixels labeled [B, H, W] (a label outside
    [0, num_classes), such as the ignore label, belongs to no class).

    Per class: at most `max_new_per_class` of its pixels, drawn without replacement; their
    density against the class's current entries if it holds more than `density_min_entries`,
    else 0; they enter at the front, the oldest entries fall off beyond capacity. The density
    work follows the pixels drawn (blocks of `row_block` rows, default
    `density.default_row_block()`); a class without pixels is left as it is. `buckets`: the sizes the draw is made at.
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
    sizes = density_lib.bucket_sizes(buckets, num_new)
    row_block = density_lib.default_row_block() if row_block is None else int(row_block)
    pos = jnp.arange(cap)

    def draw_class(xs):
      """Class c's new pixels [num_new] (first n_new valid) and their densities [num_new]."""
      c, key, q_fts, count = xs
      mask = labels == c
      n = jnp.sum(mask.astype(jnp.int32))

      def insert():
        # When every pixel of the class is taken the reference keeps their row-major order (which
        # decides what a partial eviction drops); a real draw stays in random order, as randperm.
        branch = density_lib.bucket_index(jnp.minimum(n, num_new), sizes)
        idx, valid = density_lib.draw_subset(mask, key, branch, sizes, row_major=n <= num_new)
        n_new = jnp.sum(valid.astype(jnp.int32))
        # The reference computes density against the queue as it stands before this insert.
        rows = jnp.where(count > density_min_entries, n_new, 0)
        if density is not None:
          given = density[idx]
          known = jnp.all(jnp.isfinite(given) | ~valid)
          rows = jnp.where(known, 0, rows)
        new_dens = density_lib.rows_density(fts, idx, rows, q_fts, ks, pos < count, topk_chunk, row_block, 0.0)
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
