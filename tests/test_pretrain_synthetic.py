"""scripts/pretrain_synthetic.py: image-level targets, training, and the written backbone loading."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from dgcl_jax import config_base
from dgcl_jax import state as state_lib
from dgcl_jax.data import synthetic

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def script():
  return _module("pretrain_synthetic", os.path.join(_ROOT, "scripts", "pretrain_synthetic.py"))


def _tiny_config():
  config = config_base.load_config_file(os.path.join(_ROOT, "configs", "synthetic.py") + ":supervised")
  config.model.base_width = 4
  config.model.decoder_channels = 8
  config.model.low_level_channels = 4
  config.model.rep_dim = 8
  config.data.synthetic_image_size = 32
  config.data.crop_size = 32
  config.data.val_crop_size = 32
  return config


def test_targets_are_the_classes_present_and_the_split_is_its_own(script):
  images, targets = script.make_dataset(6, 0, 32, 5)
  for i in range(6):
    image, label = synthetic.generate(0, "pretrain", i, 32, 5)
    np.testing.assert_array_equal(images[i], image)
    expected = np.zeros(4, np.float32)
    for c in range(1, 5):
      expected[c - 1] = float((label == c).any())
    np.testing.assert_array_equal(targets[i], expected)
    for split in ("labeled", "unlabeled", "val"):
      assert not np.array_equal(image, synthetic.generate(0, split, i, 32, 5)[0])


def test_pretraining_fits_and_the_backbone_loads_into_the_train_state(script, tmp_path):
  config = _tiny_config()
  variables, history = script.pretrain(config, num_images=16, steps=40, batch_size=16, lr=0.05, seed=0,
                                       log_every=10, log=lambda _: None)
  assert history[-1][1] < 0.8 * history[0][1], history  # 16 images: the head and backbone fit them
  assert set(variables["params"]) == {"backbone"} and set(variables["batch_stats"]) == {"backbone"}

  from dgcl_jax import convert
  out = str(tmp_path / "backbone")
  convert.save_variables(out, variables)
  config.model.pretrained = out
  state = state_lib.create_train_state(config, jax.random.PRNGKey(3))
  for tree, key in ((state.params, "params"), (state.teacher_params, "params"),
                    (state.batch_stats, "batch_stats"), (state.teacher_batch_stats, "batch_stats")):
    got, want = jax.tree.leaves(tree["backbone"]), jax.tree.leaves(variables[key]["backbone"])
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_refuses_an_existing_output_and_a_non_synthetic_config(script, tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(SystemExit, match="exists"):
    script.main(["--output", str(tmp_path / "out")])
  config = _tiny_config()
  config.data.name = "pascal"
  with pytest.raises(SystemExit, match="synthetic dataset only"):
    script.pretrain(config, num_images=2, steps=1, batch_size=2, lr=0.1, seed=0)
