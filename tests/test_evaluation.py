"""dgcl_jax/evaluation.py: confusion matrices with the configured ignore label, and the Predictor's
forward traced once per network (not once per Predictor)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgcl_jax import evaluation


def test_confusion_matrix_skips_the_configured_ignore_label():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (2, 9, 11)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.3] = 255
  preds = rng.integers(0, 4, labels.shape).astype(np.int32)
  want = np.zeros((4, 4), np.int64)
  np.add.at(want, (labels[labels != 255], preds[labels != 255]), 1)
  np.testing.assert_array_equal(np.asarray(evaluation.confusion_matrix(preds, labels, 4)), want)
  # 254 as the ignore label: the same counts; 255 is then out of range and skipped as well.
  relabeled = np.where(labels == 255, 254, labels)
  np.testing.assert_array_equal(np.asarray(evaluation.confusion_matrix(preds, relabeled, 4, ignore_label=254)), want)
  # A class id used as the ignore label drops that class's row.
  dropped = np.asarray(evaluation.confusion_matrix(preds, labels, 4, ignore_label=2))
  np.testing.assert_array_equal(dropped, np.where(np.arange(4)[:, None] == 2, 0, want))


class _Counting(nn.Module):
  """A 1x1 convolution to `classes` logits that counts how often it is traced."""
  classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    _TRACES.append(x.shape)
    return {"pred": nn.Conv(self.classes, (1, 1))(x)}


_TRACES = []


def test_predictor_traces_the_network_once_for_every_predictor_and_image_of_one_size():
  module = _Counting()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  images = [np.random.default_rng(i).normal(size=(1, 8, 8, 3)).astype(np.float32) for i in range(3)]
  scaled = [jax.tree_util.tree_map(lambda v, s=i: v * (1.0 + s), variables) for i in range(3)]
  want = [np.asarray(module.apply(v, jnp.asarray(x))["pred"]) for v, x in zip(scaled, images)]
  _TRACES.clear()
  for v, image, w in zip(scaled, images, want):   # a new Predictor each time, as each evaluation makes one
    predictor = evaluation.Predictor(module, v, num_classes=3, crop_size=8)
    np.testing.assert_allclose(np.asarray(predictor.center(image)), w, rtol=1e-6, atol=1e-6)
  assert _TRACES == [(1, 8, 8, 3)]
  # A window of another size is another program: traced once more.
  evaluation.Predictor(module, variables, num_classes=3, crop_size=4).sliding_window(images[0])
  assert _TRACES == [(1, 8, 8, 3), (1, 4, 4, 3)]


def test_confusion_from_model_takes_the_ignore_label():
  module = _Counting()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  images = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  labels = np.random.default_rng(2).integers(0, 3, (2, 8, 8)).astype(np.int32)
  labels[:, :3] = 255
  want = evaluation.confusion_from_model(module, variables, images, labels, 3)
  got = evaluation.confusion_from_model(module, variables, images, np.where(labels == 255, 254, labels), 3,
                                        ignore_label=254)
  assert int(np.asarray(want).sum()) == 2 * 5 * 8
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
