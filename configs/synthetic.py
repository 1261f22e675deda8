"""The embedded synthetic dataset: the whole method on a laptop in minutes, nothing to download.

Use: python -m dgcl_jax.main --config=configs/synthetic.py --workdir=/tmp/dgcl_synth
Variants: --config=configs/synthetic.py:self_training (or supervised, dgcl).
DGCL on a small DINOv2-style ViT with UniMatch V2's DPT head (ours: a 4-block, 48-wide ViT from
scratch, AdamW): --config=configs/synthetic.py:dpt, or dpt,self_training / dpt,supervised.
"""

from dgcl_jax import config_base


def get_config(arg: str = "dgcl"):
  parts = [p for p in str(arg or "dgcl").split(",") if p]
  dpt = "dpt" in parts
  methods = [p for p in parts if p != "dpt"]
  if len(methods) > 1:
    raise ValueError(f"configs/synthetic.py: {arg!r} names more than one method")
  method = methods[0] if methods else "dgcl"
  config = config_base.base_config()
  config.method = method
  config.seed = 0
  config.num_epochs = 12
  config.sup_only_epochs = 4     # a 2-epoch warm-up left the teacher too weak for this budget (see README)
  config.batch_size = 8
  config.num_slices = 2
  config.steps_per_epoch = -1
  config.checkpoint_every_steps = 100
  config.log_every_steps = 10

  m = config.model
  m.depth = 14                  # small variant: one bottleneck block per stage
  m.base_width = 16
  m.num_classes = 5
  m.replace_stride_with_dilation = (False, False, True)
  m.aspp_dilations = (2, 4, 6)
  m.decoder_channels = 64
  m.low_level_channels = 16
  m.rep_dim = 64

  d = config.data
  d.name = "synthetic"
  d.crop_size = 64
  d.val_crop_size = 64
  d.rescale_range = (0.5, 2.0)
  d.synthetic_num_labeled = 16
  d.synthetic_num_unlabeled = 256
  d.synthetic_num_val = 64
  d.synthetic_image_size = 64
  d.class_names = ("background", "disc", "square", "triangle", "stripes")
  d.num_workers = 0

  config.optim.base_lr = 0.01
  config.optim.decoder_lr_mult = 1.0

  g = config.dgcl                # bank scaled down so the contrastive term runs within the budget
  g.bank_capacity = 400
  g.max_new_per_class = 200
  g.density_min_entries = 200
  g.max_pixels = 2000
  g.num_anchors = 50
  g.num_positives = 20
  g.num_negatives = 128
  if dpt:
    _dpt(config)
  return config


def _dpt(config):
  """The DINOv2 ViT + DPT network at toy size (all values ours): model.vit='tiny' (48 wide, 4 blocks,
  2 heads, every block feeds the head; DPT features 16), 56-pixel images (4 x 4 patches of 14; pred
  and fts at 32 x 32), from scratch with AdamW (UniMatch V2's optimizer, lr and weight decay ours)."""
  m = config.model
  m.arch = "dpt"
  m.vit = "tiny"
  m.rep_dim = 32
  m.pretrained = ""
  d = config.data
  d.crop_size = d.val_crop_size = d.synthetic_image_size = 56
  o = config.optim
  o.name, o.base_lr, o.decoder_lr_mult, o.weight_decay = "adamw", 3e-3, 1.0, 0.01
