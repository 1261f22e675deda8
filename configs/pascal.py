"""Pascal VOC 2012 + SBD, the published DGCL recipe (REFERENCE.md section 3).

Use: --config=configs/pascal.py:732 (splits 92, 183, 366, 732, 1464, 662, 1323, 2646, 5291).
"""

import os

from dgcl_jax import config_base

SPLITS = ("92", "183", "366", "732", "1464", "662", "1323", "2646", "5291")
_SPLIT_DIR = os.path.join(os.path.dirname(config_base.__file__), "splits", "pascal")


def get_config(arg: str = "732"):
  split = str(arg or "732")
  if split not in SPLITS:
    raise ValueError(f"configs/pascal.py: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  config = config_base.base_config()
  config.method = "dgcl"
  config.num_epochs = 80
  config.sup_only_epochs = 1
  config.batch_size = 16        # 4 devices x 4 in the reference
  config.num_slices = 4
  config.checkpoint_every_steps = 1000

  config.model.depth = 101
  config.model.dtype = "bfloat16"   # the reference trains in float16 with a loss scaler (model.dtype="float16");
                                    # bfloat16 needs none on Ampere and newer. The teacher runs in float32.
  config.model.num_classes = 21
  config.model.replace_stride_with_dilation = (False, False, True)
  config.model.aspp_dilations = (6, 12, 18)
  config.model.aux = False
  config.model.zero_init_residual = False
  config.model.remat = True   # recompute activations in the backward pass: ~4x less memory (README, Benchmarks)
  config.model.pretrained = "pretrained/resnet101"   # ImageNet backbone (README, Real data); required:
                                                     # --config.model.pretrained=none trains from scratch

  d = config.data
  d.name = "pascal"
  d.root = "data/VOC2012"
  d.labeled_list = os.path.join(_SPLIT_DIR, split, "labeled.txt")
  d.unlabeled_list = os.path.join(_SPLIT_DIR, split, "unlabeled.txt")
  d.val_list = os.path.join(_SPLIT_DIR, "val.txt")
  d.crop_size = 513
  d.val_crop_size = 513
  d.class_names = config_base.PASCAL_CLASSES

  config.optim.base_lr = 0.001
  config.optim.decoder_lr_mult = 10.0
  config.loss.ohem = False
  return config
