"""The embedded synthetic dataset: the whole method on a laptop in minutes, nothing to download.

Use: python -m dgcl_jax.main --config=configs/synthetic.py --workdir=/tmp/dgcl_synth
Variants: --config=configs/synthetic.py:self_training (or supervised, dgcl).
"""

from dgcl_jax import config_base


def get_config(arg: str = "dgcl"):
  method = str(arg or "dgcl")
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
  return config
