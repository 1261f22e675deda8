"""Pascal VOC 2012 + SBD, the published DGCL recipe (REFERENCE.md section 3).

Use: --config=configs/pascal.py:732 (splits 92, 183, 366, 732, 1464, 662, 1323, 2646, 5291).
DGCL on DINOv2 (UniMatch V2's DPT network and optimizer; README, DGCL on DINOv2): append
',dinov2_small', ',dinov2_base' or ',dinov2_large', e.g. --config=configs/pascal.py:732,dinov2_small.
"""

import os

from dgcl_jax import config_base

SPLITS = ("92", "183", "366", "732", "1464", "662", "1323", "2646", "5291")
_SPLIT_DIR = os.path.join(os.path.dirname(config_base.__file__), "splits", "pascal")


def get_config(arg: str = "732"):
  parts = [p for p in str(arg or "732").split(",") if p]
  split = parts[0] if parts else "732"
  variants = parts[1:]
  if split not in SPLITS:
    raise ValueError(f"configs/pascal.py: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  if len(variants) > 1 or (variants and variants[0] not in config_base.DINOV2_VARIANTS):
    raise ValueError(f"configs/pascal.py: unknown variant {','.join(variants)!r}; expected one of "
                     f"{', '.join(config_base.DINOV2_VARIANTS)}")
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
  d.max_image_size = (500, 500)   # VOC images are at most 500 px a side: bounds the uint8 window shipped per crop
  d.val_crop_size = 513
  d.class_names = config_base.PASCAL_CLASSES

  config.optim.base_lr = 0.001
  config.optim.decoder_lr_mult = 10.0
  config.loss.ohem = False
  if variants:
    _dinov2(config, variants[0])
  return config


def _dinov2(config, variant):
  """UniMatch V2's Pascal setting for its DPT (configs/pascal.yaml there): crop 518, 4 GPUs x (4 + 4),
  60 epochs, AdamW lr 5e-6 / x40 (config_base.use_dinov2_dpt). Ours: the sup-only first epoch, DGCL's
  EMA and contrastive settings, the in-training evaluation on centre-padded 518 crops (UniMatch V2
  resizes the whole image to the nearest multiple of 14)."""
  config_base.use_dinov2_dpt(config, variant)
  config.num_epochs = 60
  config.batch_size = 16        # 4 devices x 4 in UniMatch V2, as in DGCL
  config.num_slices = 4
  config.data.crop_size = 518   # 37 x 37 patches: the DINOv2 positional embedding's own grid
  config.data.val_crop_size = 518
