"""The device half of the training transform: compact uint8 crops finished on the device equal
transforms.train_transform's float32 crops bit for bit, inside the jitted train step too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgcl_jax.data import assemble, transforms
import tiny

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _params(crop, rescale=(0.5, 2.0)):
  return transforms.TransformParams(crop_size=crop, mean=MEAN, std=STD, rescale_range=rescale)


def _images(seed, count, lo, hi):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    h, w = rng.integers(lo, hi, 2)
    out.append((rng.integers(0, 256, (h, w, 3)).astype(np.uint8), rng.integers(0, 21, (h, w)).astype(np.uint8)))
  return out


def _both(images, p, window_hw, seed=0, with_label=True):
  dense, compact = [], []
  for i, (image, label) in enumerate(images):
    label = label if with_label else None
    dense.append(transforms.train_transform(image, label, np.random.default_rng([seed, i]), p))
    compact.append(transforms.train_window(image, label, np.random.default_rng([seed, i]), p, window_hw))
  stack = lambda key: np.stack([c[key] for c in compact])
  return dense, {k: stack(k) for k in ("window", "index", "frac", "label")}


@pytest.mark.parametrize("crop,lo,hi,rescale", [(33, 5, 90, (0.5, 2.0)), (40, 60, 200, (0.5, 2.0)),
                                                (24, 10, 40, (0.25, 1.5)), (17, 3, 12, (1.0, 1.0))])
def test_device_crops_equal_the_numpy_transform_bit_for_bit(crop, lo, hi, rescale):
  """Padding, flips, shrinking and enlarging, images smaller and larger than the crop."""
  p = _params(crop, rescale)
  window_hw = transforms.window_size(p)
  dense, compact = _both(_images(crop, 40, lo, hi), p, window_hw)
  out = jax.jit(assemble.crop_images)(compact["window"], compact["index"], compact["frac"],
                                       *assemble.normalization(MEAN, STD))
  np.testing.assert_array_equal(np.asarray(out), np.stack([d[0] for d in dense]))
  np.testing.assert_array_equal(compact["label"].astype(np.int32), np.stack([d[1] for d in dense]))


def test_unlabeled_ignore_mask_and_known_image_size():
  """max_image_size bounds the window; without a label the mask is 255 on padding only."""
  p = _params(40)
  images = _images(1, 20, 20, 61)
  window_hw = transforms.window_size(p, (60, 60))
  assert window_hw == (60, 60)
  dense, compact = _both(images, p, window_hw, with_label=False)
  np.testing.assert_array_equal(compact["label"].astype(np.int32), np.stack([d[1] for d in dense]))
  assert set(np.unique(compact["label"])) <= {0, 255}
  out = assemble.crop_images(compact["window"], compact["index"], compact["frac"], *assemble.normalization(MEAN, STD))
  np.testing.assert_array_equal(np.asarray(out), np.stack([d[0] for d in dense]))


def test_window_size_bounds_every_crop_of_large_images():
  """The strongest shrink of an image much larger than the crop still fits the window."""
  p = _params(21)
  window_hw = transforms.window_size(p)
  rng = np.random.default_rng(0)
  for i in range(300):
    h, w = rng.integers(21, 400, 2)
    transforms.train_window(np.zeros((h, w, 3), np.uint8), None, np.random.default_rng(i), p, window_hw)
  with pytest.raises(ValueError, match="source rows|source columns"):
    for i in range(50):
      transforms.train_window(np.zeros((200, 200, 3), np.uint8), None, np.random.default_rng(i), p, (30, 30))


def test_label_dtype():
  assert transforms.label_dtype(21, 255) == np.uint8
  assert transforms.label_dtype(300, 255) == np.int32
  assert transforms.label_dtype(19, 1000) == np.int32


def test_float_batches_pass_unchanged():
  batch = {"labeled_image": np.ones((1, 4, 4, 3), np.float32)}
  assert assemble.train_batch(batch, *assemble.normalization(MEAN, STD)) is batch


def test_train_step_sees_the_same_numbers_from_a_compact_batch():
  """The jitted step fed the pipeline's compact batch gives exactly the metrics and parameters of
  the same step fed the numpy transform's float32 crops."""
  config = tiny.tiny_config("supervised")
  p = transforms.TransformParams.from_config(config)
  c, b = config.data.crop_size, config.batch_size
  window_hw = transforms.window_size(p)
  images = _images(3, 2 * b, 12, 60)
  images = [(im, lb % config.model.num_classes) for im, lb in images]
  dense_l, compact_l = _both(images[:b], p, window_hw, seed=1)
  dense_u, compact_u = _both(images[b:], p, window_hw, seed=2, with_label=False)
  dense = {"labeled_image": np.stack([d[0] for d in dense_l]), "labeled_label": np.stack([d[1] for d in dense_l]),
           "unlabeled_image": np.stack([d[0] for d in dense_u]), "unlabeled_ignore": np.stack([d[1] for d in dense_u])}
  compact = {f"labeled_{k}": v for k, v in compact_l.items()}
  compact.update({f"unlabeled_{k}": v for k, v in compact_u.items() if k != "label"})
  compact["unlabeled_ignore"] = compact_u["label"]
  assert dense["labeled_image"].shape == (b, c, c, 3)
  fns = tiny.step_functions(config, 1)
  results = []
  for batch in (dense, compact):
    state = jax.device_put(jax.tree_util.tree_map(np.asarray, tiny.initial_state(config)), fns.replicated)
    state, metrics, _ = fns.train_step(state, jax.device_put(batch, fns.batch_sharding), semi=False)
    results.append((jax.tree_util.tree_map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}))
  assert results[0][1] == results[1][1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, results[0][0], results[1][0])
