"""Multi-scale density and the static-shape random subsets that the memory bank and the loss share.

REFERENCE.md section 4, with static shapes: random subsets without replacement are top-k over
uniform keys restricted by a mask, and counts are mask sums. A class's subset is drawn at the
smallest of a few static sizes (`buckets`, chosen with `lax.switch`) that holds its pixels, and
its densities are computed in blocks of `row_block` rows by a loop that runs
ceil(rows / row_block) times, so the work follows the pixels a class has.
"""

from __future__ import annotations

import functools
from typing import Sequence

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


def normalize(x: jax.Array) -> jax.Array:
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


def density_fn(keys: jax.Array, ks: Sequence[int], key_mask: jax.Array | None,
                topk_chunk: int | None):
  """f [m, C] -> density [m] f32 against keys [N, C] (normalized once, outside any row loop)."""
  ks = tuple(int(k) for k in ks)
  kmax = min(max(ks), keys.shape[0])
  kn = normalize(keys.astype(jnp.float32))
  n_valid = None if key_mask is None else jnp.sum(key_mask.astype(jnp.int32))

  def block(f):
    sim = jnp.einsum("mc,nc->mn", normalize(f.astype(jnp.float32)), kn,
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
  block = density_fn(keys, ks, key_mask, topk_chunk)
  m = feats.shape[0]
  if row_chunk is None or m <= row_chunk:
    return block(feats)
  n_blocks = -(-m // row_chunk)
  padded = jnp.pad(feats, ((0, n_blocks * row_chunk - m), (0, 0)))
  out = lax.map(block, padded.reshape(n_blocks, row_chunk, feats.shape[1]))
  return out.reshape(-1)[:m]


def rows_density(fts: jax.Array, idx: jax.Array, num_rows: jax.Array, keys: jax.Array,
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
  density = density_fn(keys, ks, key_mask, topk_chunk)

  def body(i, out):
    rows = lax.dynamic_slice(idx, (i * row_block,), (row_block,))
    return lax.dynamic_update_slice(out, density(fts[rows]), (i * row_block,))

  trips = (num_rows + row_block - 1) // row_block
  out = lax.fori_loop(0, trips, body, jnp.full((n_blocks * row_block,), fill, jnp.float32))
  return jnp.where(jnp.arange(size) < num_rows, out[:size], fill)


def bucket_sizes(buckets: Sequence[int], cap: int) -> tuple[int, ...]:
  """The static subset sizes for at most `cap` rows: the buckets below cap, then cap."""
  return tuple(sorted({int(b) for b in buckets if 0 < int(b) < cap})) + (cap,)


def bucket_index(m: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """Index of the smallest of `sizes` (ascending) that is >= m, for 0 <= m <= sizes[-1]."""
  return sum(((m > size).astype(jnp.int32) for size in sizes[:-1]), jnp.zeros((), jnp.int32))


def random_subset(mask: jax.Array, rng: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
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


def draw_subset(mask: jax.Array, rng: jax.Array, branch: jax.Array, sizes: tuple[int, ...],
                row_major: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`random_subset(mask, rng, sizes[branch])` padded to sizes[-1] (indices 0, invalid).

  With `row_major` (traced bool) true, the valid indices are sorted ascending.
  """
  cap = sizes[-1]

  def draw(size):
    idx, valid = random_subset(mask, rng, size)
    if row_major is not None:
      in_order = jnp.minimum(jnp.sort(jnp.where(valid, idx, mask.shape[0])), mask.shape[0] - 1)
      idx = jnp.where(row_major, in_order, idx)
    return jnp.pad(idx, (0, cap - size)), jnp.pad(valid, (0, cap - size))

  if len(sizes) == 1:
    return draw(sizes[0])
  return lax.switch(branch, [functools.partial(draw, size) for size in sizes])
