"""The density-guided contrastive loss (REFERENCE.md section 4), with its settings.

Static shapes: the loop over classes is a `lax.map` outside the vmap over slices, so a class
absent from every slice costs nothing, and a class's subset size and density rows follow its
largest count over the slices (density.py). The class loop has no gradient: it picks anchors and
targets, and one gather of the anchors after it carries the gradient.

The memory bank (memory_bank.py) and the density (density.py) are re-exported here, so that
`dgcl` names the method's parts for its callers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from dgcl_jax import density as density_lib
from dgcl_jax.density import DEFAULT_BUCKETS, default_row_block, multi_scale_density, top_k_values  # re-exported
from dgcl_jax.memory_bank import MemoryBank  # re-exported


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
  kept, kept_valid = density_lib.draw_subset(mask, k_keep, branch, plan.sizes)
  bank_valid = jnp.arange(cap) < b_count
  dens = density_lib.rows_density(fts, kept, rows, b_fts, st.ks, bank_valid, st.topk_chunk, plan.row_block,
                                  1.0)
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
  neg_idx, neg_valid = density_lib.random_subset((labels != c) & (labels != st.ignore_label), k_neg,
                                                 plan.num_targets - 1)
  targets = density_lib.normalize(jnp.concatenate([proto[None], rep[neg_idx]], axis=0))
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
  anchors = density_lib.normalize(rep[a_idx])                                 # [K, A, Cr]
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
  sizes = density_lib.bucket_sizes(st.buckets, min(int(st.max_pixels), num_pix))
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
    branch = density_lib.bucket_index(jnp.max(m), sizes)
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
