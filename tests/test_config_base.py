"""dgcl_jax/config_base.py: the shipped configs validate, bad values are one line naming the field."""

import os
import re

import pytest

from dgcl_jax import config_base
from tests.tiny import load_config


def test_shipped_configs_validate():
  for name, args in (("pascal", ("92", "732", "5291")), ("cityscapes", ("186", "372", "1488", "372,u2pl")),
                     ("synthetic", ("dgcl", "self_training", "supervised"))):
    for arg in args:
      config = load_config(name, arg)
      config_base.validate(config)
  pascal = load_config("pascal", "732")
  assert pascal.data.labeled_list.endswith(os.path.join("pascal", "732", "labeled.txt"))
  assert os.path.exists(pascal.data.labeled_list)
  city = load_config("cityscapes", "372")
  assert city.model.aux and city.loss.ohem and city.num_slices == 8


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update({"batch_size": 6}), "batch_size=6 is not divisible"),
    (lambda c: c.optim.update({"base_lr": -0.1}), "config.optim.base_lr=-0.1"),
    (lambda c: c.update({"method": "dgcll"}), "config.method='dgcll'"),
    (lambda c: c.data.update({"crop_size": 8}), "config.data.crop_size=8"),
    (lambda c: c.loss.update({"unsup_weight": -1.0}), "config.loss.unsup_weight=-1.0"),
    (lambda c: c.model.update({"num_classes": 0}), "config.model.num_classes=0"),
    (lambda c: c.data.update({"max_image_size": (500,)}), "config.data.max_image_size=(500,)"),
    (lambda c: c.loss.update({"pseudo_labels": "oracle"}), "config.loss.pseudo_labels='oracle'"),
    # What --config.model.aspp_dilations=abc gives: a tuple of one string.
    (lambda c: c.model.update({"aspp_dilations": ("abc",)}), "config.model.aspp_dilations=('abc',): expected a tuple of 3"),
    (lambda c: c.model.update({"aspp_dilations": (6, 12)}), "config.model.aspp_dilations=(6, 12)"),
    (lambda c: c.dgcl.update({"ks": ()}), "config.dgcl.ks=(): expected a tuple of one or more positive int"),
    (lambda c: c.dgcl.update({"ks": (8, -1)}), "config.dgcl.ks=(8, -1)"),
    (lambda c: c.data.update({"mean": (1.0, 2.0)}), "config.data.mean=(1.0, 2.0)"),
])
def test_validate_rejects_bad_values(mutate, message):
  config = load_config("synthetic")
  mutate(config)
  with pytest.raises(config_base.ConfigError, match=re.escape(message)):
    config_base.validate(config, num_devices=4)


def test_validate_rejects_misspelled_field():
  config = load_config("synthetic")
  config.optim.lerning_rate = 0.1
  with pytest.raises(config_base.ConfigError, match="unknown config field 'optim.lerning_rate'"):
    config_base.validate(config)


def test_validate_rejects_batch_not_divisible_by_devices():
  config = load_config("synthetic")
  config.batch_size = 6
  config.num_slices = 3
  with pytest.raises(config_base.ConfigError, match="not divisible by the 4 devices"):
    config_base.validate(config, num_devices=4)


