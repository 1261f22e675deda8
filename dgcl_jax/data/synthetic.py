"""A small synthetic segmentation dataset generated on the fly (numpy only, ~1 ms per 64x64 image).

Class 0 is background; class c >= 1 is the shape kind (c - 1) % 4 of `SHAPES`: disc, square,
triangle, or a stripe-textured blob. Every image is deterministic in (seed, split, index).
What makes it learnable: each object class has a colour tendency (a prototype hue with a wide
spread) on top of its shape or texture. What makes it non-trivial: the class colour spreads
overlap each other and the (less saturated) background's, textured and noisy fills, scales from
small to large, objects occluding each other, and background clutter (lines, rings, ellipses,
faint stripes) drawn both in object-like and in background colours.
"""

from __future__ import annotations

import functools

import numpy as np

SHAPES = ("disc", "square", "triangle", "stripes")
_SPLIT_IDS = {"labeled": 1, "unlabeled": 2, "val": 3, "pretrain": 4}


@functools.lru_cache(maxsize=8)
def _grid(size: int):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
  return yy, xx


# Colour tendency of each object kind (RGB); the spread around it makes the classes overlap.
_PROTOTYPES = {"disc": (215.0, 70.0, 60.0), "square": (70.0, 190.0, 80.0), "triangle": (80.0, 100.0, 215.0),
               "stripes": (225.0, 195.0, 70.0)}
_CLASS_SPREAD = 45.0


def _background_colour(rng):
  """Background and clutter: any hue, pulled halfway to grey (less saturated than objects)."""
  return (0.5 * rng.uniform(0.0, 255.0, 3) + 64.0).astype(np.float32)


def _class_colour(kind, rng):
  proto = np.asarray(_PROTOTYPES[kind], np.float32)
  return np.clip(proto + rng.normal(0.0, _CLASS_SPREAD, 3).astype(np.float32), 0, 255)


def _rotated(yy, xx, cy, cx, angle):
  ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
  dy, dx = yy - np.float32(cy), xx - np.float32(cx)
  return ca * dx + sa * dy, -sa * dx + ca * dy


def _shape_mask(kind, yy, xx, cy, cx, r, angle, rng):
  u, v = _rotated(yy, xx, cy, cx, angle)
  if kind == "disc":
    return u * u + v * v <= r * r
  if kind == "square":
    return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
  if kind == "triangle":  # equilateral, circumradius 1.3 r (its area is closer to the others')
    r = r * 1.3
    m = np.ones_like(u, dtype=bool)
    for k in range(3):
      a = 2.0 * np.pi * k / 3.0
      m &= np.float32(np.cos(a)) * u + np.float32(np.sin(a)) * v <= r * 0.5
    return m
  # stripes: an ellipse or a rectangle of any aspect; the class is the texture, not the outline
  ar = rng.uniform(0.55, 1.0)
  if rng.random() < 0.5:
    return (u / r) ** 2 + (v / (r * ar)) ** 2 <= 1.0
  return (np.abs(u) <= r) & (np.abs(v) <= r * ar)


def _stripes(ys, xs, rng, c1, c2, period_lo=3.0, period_hi=7.0):
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(period_lo, period_hi)
  phase = np.float32(np.cos(angle)) * xs + np.float32(np.sin(angle)) * ys
  t = (np.sin(phase * np.float32(2 * np.pi / period)) > 0).astype(np.float32)[..., None]
  return c1 * (1 - t) + c2 * t


def _fill(kind, ys, xs, rng, size):
  """Texture at pixels (ys, xs) [n]: flat, gradient or speckled for shapes; stripes for 'stripes'."""
  c1 = _class_colour(kind, rng)
  if kind == "stripes":
    c2 = c1 + rng.uniform(50, 120) * rng.choice([-1.0, 1.0], 3).astype(np.float32)
    return _stripes(ys, xs, rng, c1, np.clip(c2, 0, 255))
  style = rng.integers(0, 3)
  if style == 0:
    return c1
  c2 = np.clip(c1 + rng.normal(0, 40, 3).astype(np.float32), 0, 255)
  if style == 1:  # linear gradient
    a = rng.uniform(0, 2 * np.pi)
    t = (np.float32(np.cos(a)) * xs + np.float32(np.sin(a)) * ys) / np.float32(size)
    t = (t - t.min())[..., None]
    return c1 * (1 - t) + c2 * t
  t = (rng.random(ys.shape, dtype=np.float32) < 0.3).astype(np.float32)[..., None]  # speckle
  return c1 * (1 - t) + c2 * t


def _background(yy, xx, rng, size):
  c1, c2 = _background_colour(rng), _background_colour(rng)
  t = np.zeros_like(yy)
  for _ in range(2):  # low-frequency blend of two colours
    f = rng.uniform(0.5, 2.5) * 2 * np.pi / size
    a = rng.uniform(0, 2 * np.pi)
    t += np.sin(np.float32(f) * (np.float32(np.cos(a)) * xx + np.float32(np.sin(a)) * yy)
                + np.float32(rng.uniform(0, 2 * np.pi)))
  t = (t * np.float32(0.25) + np.float32(0.5))[..., None]
  return c1 * (1 - t) + c2 * t, (c1, c2)


def _clutter(yy, xx, rng, size, bg_colours):
  """A distractor (label 0): (mask [S, S], colours [n, 3] or [3])."""
  colour = bg_colours[rng.integers(0, 2)] if rng.random() < 0.5 else _background_colour(rng)
  colour = np.clip(colour + rng.normal(0, 15, 3).astype(np.float32), 0, 255)
  cy, cx = rng.uniform(0, size, 2)
  kind = rng.integers(0, 4)
  u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
  if kind == 0:    # line
    m = (np.abs(v) <= rng.uniform(0.5, 1.5)) & (np.abs(u) <= rng.uniform(0.2, 0.6) * size)
  elif kind == 1:  # ring: looks like a disc outline
    r = rng.uniform(0.06, 0.2) * size
    m = np.abs(np.sqrt(u * u + v * v) - r) <= rng.uniform(0.7, 1.5)
  elif kind == 2:  # thin ellipse
    r = rng.uniform(0.08, 0.25) * size
    m = (u / r) ** 2 + (v / (r * rng.uniform(0.15, 0.35))) ** 2 <= 1.0
  else:            # faint stripes patch of a lower frequency
    r = rng.uniform(0.08, 0.2) * size
    m = (np.abs(u) <= r) & (np.abs(v) <= r)
    return m, _stripes(yy[m], xx[m], rng, colour, np.clip(colour + 35, 0, 255), 8.0, 12.0)
  return m, colour


def generate(seed: int, split: str, index: int, size: int = 64, num_classes: int = 5):
  """-> (image uint8 [size, size, 3], label uint8 [size, size] in [0, num_classes))."""
  rng = np.random.default_rng([int(seed), _SPLIT_IDS.get(split, 9), int(index), 0x5EC])
  yy, xx = _grid(size)
  img, bg_colours = _background(yy, xx, rng, size)
  img = np.array(img, np.float32)
  label = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(1, 5)):
    m, colour = _clutter(yy, xx, rng, size, bg_colours)
    img[m] = colour
  if num_classes > 1:
    for _ in range(rng.integers(1, 5)):
      cls = int(rng.integers(1, num_classes))
      kind = SHAPES[(cls - 1) % len(SHAPES)]
      r = np.float32(size * rng.uniform(0.07, 0.3))
      cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
      m = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi), rng)
      img[m] = _fill(kind, yy[m], xx[m], rng, size)
      label[m] = cls
  for _ in range(rng.integers(0, 3)):  # clutter on top occludes objects (and stays background)
    m, colour = _clutter(yy, xx, rng, size, bg_colours)
    img[m] = colour
    label[m] = 0
  img = img * np.float32(rng.uniform(0.7, 1.2)) + np.float32(rng.uniform(-25, 25))
  img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(4, 18))
  return np.clip(img + 0.5, 0, 255).astype(np.uint8), label
