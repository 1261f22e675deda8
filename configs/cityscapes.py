"""Cityscapes, the published DGCL recipe on the CPS split lists (REFERENCE.md sections 2-3).

Use: --config=configs/cityscapes.py:372 (splits 186, 372, 744, 1488); append ',u2pl' for the
other lists common in the field, e.g. --config=configs/cityscapes.py:372,u2pl.
DGCL on DINOv2 (UniMatch V2's DPT network and optimizer; README, DGCL on DINOv2): append
',dinov2_small', ',dinov2_base' or ',dinov2_large', e.g. --config=configs/cityscapes.py:372,dinov2_small.
"""

import os

from dgcl_jax import config_base

SPLITS = ("186", "372", "744", "1488")
_SPLIT_ROOT = os.path.join(os.path.dirname(config_base.__file__), "splits")


def get_config(arg: str = "372"):
  parts = [p for p in str(arg or "372").split(",") if p]
  split = parts[0] if parts else "372"
  family = "cityscapes-u2pl" if "u2pl" in parts[1:] else "cityscapes"
  variants = [p for p in parts[1:] if p != "u2pl"]
  if split not in SPLITS:
    raise ValueError(f"configs/cityscapes.py: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  if len(variants) > 1 or (variants and variants[0] not in config_base.DINOV2_VARIANTS):
    raise ValueError(f"configs/cityscapes.py: unknown variant {','.join(variants)!r}; expected u2pl and/or one of "
                     f"{', '.join(config_base.DINOV2_VARIANTS)}")
  config = config_base.base_config()
  config.method = "dgcl"
  config.num_epochs = 200
  config.sup_only_epochs = 10
  config.batch_size = 16        # 8 devices x 2 in the reference
  config.num_slices = 8
  config.checkpoint_every_steps = 1000

  m = config.model
  m.depth = 101
  m.dtype = "bfloat16"   # the reference trains in float16 with a loss scaler (model.dtype="float16");
                         # bfloat16 needs none on Ampere and newer. The teacher runs in float32.
  m.num_classes = 19
  m.replace_stride_with_dilation = (False, True, True)    # output stride 8
  m.aspp_dilations = (12, 24, 36)
  m.aux = True
  m.zero_init_residual = True
  m.remat = True              # recompute activations in the backward pass: ~4x less memory (README, Benchmarks)
  m.pretrained = "pretrained/resnet101"   # ImageNet backbone (README, Real data); required:
                                          # --config.model.pretrained=none trains from scratch

  d = config.data
  d.name = "cityscapes"
  d.root = "data/cityscapes"
  d.labeled_list = os.path.join(_SPLIT_ROOT, family, split, "labeled.txt")
  d.unlabeled_list = os.path.join(_SPLIT_ROOT, family, split, "unlabeled.txt")
  d.val_list = os.path.join(_SPLIT_ROOT, family, "val.txt")
  d.crop_size = 769
  d.max_image_size = (1024, 2048)  # every Cityscapes image: bounds the uint8 window shipped per crop
  d.val_crop_size = 800
  d.class_names = config_base.CITYSCAPES_CLASSES

  config.optim.base_lr = 0.01
  config.optim.decoder_lr_mult = 1.0
  config.loss.ohem = True
  config.loss.aux_weight = 0.4
  # evaluate.py's default: the reference's stand-alone protocol (REFERENCE.md section 2), with which
  # the published numbers were measured: the teacher, windows of 800 (stride 534) over the full image.
  config.evaluation.mode = "sliding"
  config.evaluation.model = "teacher"
  if variants:
    _dinov2(config, variants[0])
  return config


def _dinov2(config, variant):
  """UniMatch V2's Cityscapes setting for its DPT (configs/cityscapes.yaml there): crop 798, 4 GPUs x
  (2 + 2), 180 epochs, OHEM (thresh 0.7, min_kept 200000 per GPU), AdamW lr 5e-6 / x40
  (config_base.use_dinov2_dpt), evaluation by 798 windows with stride 532. Ours: the 10 sup-only
  epochs, DGCL's EMA and contrastive settings, no aux head (the DPT has none)."""
  config_base.use_dinov2_dpt(config, variant)
  config.num_epochs = 180
  config.batch_size = 8         # 4 devices x 2 in UniMatch V2 (DGCL: 8 x 2)
  config.num_slices = 4
  config.data.crop_size = 798   # 57 x 57 patches
  config.data.val_crop_size = 798   # sliding windows of 798, stride ceil(2/3 x 798) = 532 as UniMatch V2's int()
  config.loss.ohem_min_kept = 200000
  config.model.zero_init_residual = False
