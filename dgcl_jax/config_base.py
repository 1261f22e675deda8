"""The base configuration every config file starts from, and its validation.

Config files in `configs/` call `base_config()` and change what differs. Every field
a run may read is declared here, so a misspelled field is caught by `validate`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle")


def model_config() -> ml_collections.ConfigDict:
  """DeepLabV3+ on a deep-stem ResNet (REFERENCE.md section 1), Pascal defaults; or, with
  arch = "dpt", UniMatch V2's DPT on a DINOv2 ViT/14 (models/dpt.py)."""
  m = ml_collections.ConfigDict()
  m.arch = "deeplabv3plus"      # deeplabv3plus (ResNet; the fields up to `aux` below) | dpt (DINOv2 ViT + DPT
                                # head: vit, dpt_*, rep_dim; image sides multiples of 14; no aux, no dropout)
  m.vit = "small"               # dpt: small (384 wide, 12 blocks, 6 heads) | base (768, 12, 12) | large (1024,
                                # 24, 16), patch 14; tiny (48, 4, 2) is ours, for tests
  m.dpt_features = 0            # dpt: the head's width (= fts dim); 0: UniMatch V2's per size, 64/128/256 (tiny 16)
  m.dpt_out_channels = ()       # dpt: projections of the 4 ViT layers; (): UniMatch V2's per size, e.g.
                                # (48, 96, 192, 384) for small
  m.depth = 101                 # 50, 101, or 14 (the small test variant: one block per stage)
  m.base_width = 64             # stage widths base x (1, 2, 4, 8); stem 64/64/128 scale with it
  m.num_classes = 21
  m.replace_stride_with_dilation = (False, False, True)   # output stride 16
  m.multi_grid = True           # stage-4 grids (2, 2, 4)
  m.aspp_dilations = (6, 12, 18)
  m.decoder_channels = 256      # ASPP branches, head, classifier width (= fts dim)
  m.low_level_channels = 48
  m.rep_dim = 256               # representation head output
  m.aux = False                 # auxiliary head on stage 3 (Cityscapes)
  m.zero_init_residual = False
  m.dropout_rate = 0.1          # channel dropout
  m.bn_momentum = 0.9           # Flax convention (= PyTorch 0.1)
  m.bn_epsilon = 1e-5
  m.remat = False               # the student's backward pass recomputes each ResNet block and head layer
                                # from its input: a fraction of the activation memory for about one more
                                # forward pass; same numbers (to rounding), same parameter names (layers.remat_call)
  m.dtype = "float32"           # compute dtype of the student's forward: float32, bfloat16, or float16 with
                                # dynamic loss scaling (optim.loss_scale_*); the teacher and evaluation
                                # always run in float32
  m.pretrained = ""             # orbax checkpoint directory written by scripts/convert_torch_checkpoint.py,
                                # read when a run starts (not on resume); "" or "none": random init
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "dgcl"             # supervised | self_training | dgcl
  c.seed = 0
  c.num_epochs = 80
  c.sup_only_epochs = 1
  c.batch_size = 16             # global labeled batch; the unlabeled batch is the same size
  c.num_slices = 4              # the reference's device count W: per-slice statistics (REFERENCE.md s.3)
  c.steps_per_epoch = -1        # -1: floor(ceil(n_sup / num_slices) / (batch_size / num_slices))
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.eval_every_epochs = 1
  c.log_every_steps = 20
  c.image_summary_every_steps = 0   # 0: only at evaluation
  c.num_eval_images_logged = 3
  c.compilation_cache_dir = ""  # jax's persistent compilation cache: "" = JAX_COMPILATION_CACHE_DIR if set,
                                # else $XDG_CACHE_HOME or ~/.cache, /dgcl_jax/jax_cache; "none" = off; else a dir

  c.model = model_config()

  d = c.data = ml_collections.ConfigDict()
  d.name = "pascal"             # pascal | cityscapes | custom | tfds | synthetic
  d.root = ""
  d.labeled_list = ""
  d.unlabeled_list = ""
  d.val_list = ""
  d.ignore_label = 255
  d.crop_size = 513
  d.val_crop_size = 513
  d.rescale_range = (0.5, 2.0)
  d.max_image_size = ()         # (H, W) of the largest training image, if known: bounds the uint8 window shipped per crop
  d.mean = (123.675, 116.28, 103.53)
  d.std = (58.395, 57.12, 57.375)
  d.num_workers = -1            # -1: sized to the machine; 0: read in the main process
  d.prefetch_buffer_size = 2
  d.class_names = PASCAL_CLASSES
  # custom layout
  d.image_dir = "JPEGImages"
  d.mask_dir = "SegmentationClassAug"
  d.image_ext = ".jpg"
  d.mask_ext = ".png"
  # tfds
  d.tfds_name = ""
  d.tfds_data_dir = ""
  d.tfds_train_split = "train"
  d.tfds_val_split = "validation"
  d.tfds_image_key = "image"
  d.tfds_label_key = "segmentation_mask"
  d.tfds_num_labeled = 0
  # synthetic
  d.synthetic_num_labeled = 16
  d.synthetic_num_unlabeled = 256
  d.synthetic_num_val = 64
  d.synthetic_image_size = 64

  o = c.optim = ml_collections.ConfigDict()
  o.name = "sgd"                # sgd (DGCL's: momentum, weight decay added to the gradient) | adamw (UniMatch
                                #    V2's for the DINOv2 DPT: decoupled weight decay, betas, eps)
  o.base_lr = 0.001             # the backbone's learning rate
  o.decoder_lr_mult = 10.0      # every other parameter's lr = base_lr x this (Pascal 10, Cityscapes 1; dpt 40)
  o.momentum = 0.9              # sgd
  o.weight_decay = 1e-4
  o.betas = (0.9, 0.999)        # adamw
  o.eps = 1e-8                  # adamw
  o.poly_power = 0.9
  o.loss_scale_init = 2.0 ** 16         # dynamic loss scaling of a float16 student (GradScaler's defaults)
  o.loss_scale_growth_interval = 2000   # finite steps in a row before the scale doubles

  l = c.loss = ml_collections.ConfigDict()
  l.unsup_weight = 0.5
  l.contrastive_weight = 0.5
  l.contrastive_grad_quirk = True   # gradient weight 0.5/W as the reference (s.3 step 9); False: 0.5
  l.aux_weight = 0.4
  l.ohem = False
  l.ohem_thresh = 0.7
  l.ohem_min_kept = 100000
  l.drop_percent = 20.0         # r: pseudo labels with entropy >= the (100 - r(1-p))th percentile -> 255
  l.contrastive_percent = 80.0  # a: contrastive labels with entropy >= the (100 - a_p)th percentile -> 255,
                                #    a_p = max(a (1 - p), floor): at p = 0 only the 20% most certain remain
  l.contrastive_percent_min = 10.0
  l.unsup_scale_quirk = True    # multiply the mean by B*H*W / valid (s.3 step 6); False: plain mean
  l.cutmix_prob = 0.5
  l.cutmix_coin = "step"        # step: one coin per step shared by all slices (the reference, s.3 step 3);
                                #    slice: each slice draws its own
  l.pseudo_labels = "teacher"   # teacher | ground_truth: a diagnostic upper bound, not the method: the
                                #    unlabeled images' own labels replace the teacher's pseudo labels
  l.quantile_method = "sort"    # sort (numpy linear) | histogram

  g = c.dgcl = ml_collections.ConfigDict()
  g.temperature = 0.5
  g.ks = (8, 16, 32)
  g.num_anchors = 200
  g.num_positives = 50
  g.max_pixels = 10000
  g.num_negatives = 512
  g.bank_capacity = 10000
  g.max_new_per_class = 1000
  g.density_min_entries = 1000
  g.ignore_classes = (0,)
  g.share_density = True        # the bank update reuses the densities the loss computed against the same
                                # bank (same values, less work); False: it computes every one itself

  e = c.ema = ml_collections.ConfigDict()
  e.decay = 0.999
  e.first_epoch_reset = True    # quirk s.3 step 11: teacher := student through the first semi epoch

  v = c.evaluation = ml_collections.ConfigDict()   # scripts/evaluate.py's defaults (its flags override)
  v.mode = "center"             # center: the in-training protocol (val_crop_size centre crops) | sliding:
                                #    windows of val_crop_size, stride ceil(2/3 of it), over the full image
  v.model = "auto"              # auto (the higher scorer in the run's own evaluation) | teacher | student
  return c


_METHODS = ("supervised", "self_training", "dgcl")
_ARCHS = ("deeplabv3plus", "dpt")
_VIT_SIZES = ("small", "base", "large", "tiny")
_OPTIMIZERS = ("sgd", "adamw")
PATCH = 14                      # the DINOv2 ViT's patch side (models/vit.py)
_DATASETS = ("pascal", "cityscapes", "custom", "tfds", "synthetic")


class ConfigError(ValueError):
  """A configuration value that cannot run."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'path/to/config.py[:arg]' -> its get_config(arg) (get_config() without an arg), for scripts."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("_dgcl_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _check_keys(cfg, ref, prefix=""):
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"unknown config field '{name}' (misspelled? see dgcl_jax/config_base.py)")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"config field '{name}' must be a group of fields")
      _check_keys(cfg[key], ref[key], name + ".")


# Sequence fields: (element type, length or None for any non-empty length, elements positive).
_SEQUENCES = {
    "model.replace_stride_with_dilation": (bool, 3, False), "model.aspp_dilations": (int, 3, True),
    "data.rescale_range": (float, 2, True), "data.mean": (float, 3, False), "data.std": (float, 3, True),
    "data.max_image_size": (int, 0, True),
    "dgcl.ks": (int, None, True), "dgcl.ignore_classes": (int, 0, False),
    "model.dpt_out_channels": (int, 0, True), "optim.betas": (float, 2, False),
}


def _check_sequences(config) -> None:
  """One line for a sequence field of the wrong kind (e.g. --config.model.aspp_dilations=abc)."""
  for name, (kind, length, positive) in _SEQUENCES.items():
    group, field = name.split(".")
    value = config[group][field]
    if kind is bool:
      ok_item = lambda x: isinstance(x, (bool, np.bool_)) or (isinstance(x, int) and x in (0, 1))
    elif kind is int:
      ok_item = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    else:
      ok_item = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    ok = isinstance(value, (tuple, list)) and all(ok_item(x) for x in value)
    if ok and length is None:
      ok = len(value) > 0
    elif ok and length:
      ok = len(value) == length
    if ok and positive:
      ok = all(x > 0 for x in value)
    if not ok:
      count = {None: "one or more", 0: "any number of"}.get(length, str(length))
      raise ConfigError(f"config.{name}={value!r}: expected a tuple of {count} "
                        f"{'positive ' if positive else ''}{kind.__name__} values, e.g. "
                        f"{tuple(base_config()[group][field])}")


def check_batch_split(config, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """ConfigError (one line) unless config.batch_size splits evenly into config.num_slices slices,
  over `num_devices` devices and `num_processes` processes."""
  b = config.batch_size
  for count, what in ((config.num_slices, f"config.num_slices={config.num_slices}"),
                      (num_devices, f"the {num_devices} devices"), (num_processes, f"the {num_processes} processes")):
    if count and b % count:
      raise ConfigError(f"config.batch_size={b} is not divisible by {what}")


def validate(config, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """Raises ConfigError with one line naming the field if `config` cannot run."""
  _check_keys(config, base_config())
  _check_sequences(config)
  if len(config.data.max_image_size) not in (0, 2):
    raise ConfigError(f"config.data.max_image_size={tuple(config.data.max_image_size)!r}: expected () or "
                      "(height, width) of the largest training image")
  if config.method not in _METHODS:
    raise ConfigError(f"config.method={config.method!r}: expected one of {_METHODS}")
  if config.data.name not in _DATASETS:
    raise ConfigError(f"config.data.name={config.data.name!r}: expected one of {_DATASETS}")
  positive = {
      "batch_size": config.batch_size, "num_slices": config.num_slices, "num_epochs": config.num_epochs,
      "checkpoint_every_steps": config.checkpoint_every_steps, "log_every_steps": config.log_every_steps,
      "data.crop_size": config.data.crop_size, "data.val_crop_size": config.data.val_crop_size,
      "model.num_classes": config.model.num_classes,
      "optim.base_lr": config.optim.base_lr, "dgcl.bank_capacity": config.dgcl.bank_capacity,
      "dgcl.temperature": config.dgcl.temperature,
  }
  for name, value in positive.items():
    if not value > 0:
      raise ConfigError(f"config.{name}={value}: must be positive")
  non_negative = {
      "sup_only_epochs": config.sup_only_epochs, "optim.weight_decay": config.optim.weight_decay,
      "optim.momentum": config.optim.momentum, "optim.decoder_lr_mult": config.optim.decoder_lr_mult,
      "loss.unsup_weight": config.loss.unsup_weight, "loss.contrastive_weight": config.loss.contrastive_weight,
      "loss.aux_weight": config.loss.aux_weight, "loss.drop_percent": config.loss.drop_percent,
      "loss.contrastive_percent": config.loss.contrastive_percent, "loss.cutmix_prob": config.loss.cutmix_prob,
      "eval_every_epochs": config.eval_every_epochs,
  }
  for name, value in non_negative.items():
    if value < 0:
      raise ConfigError(f"config.{name}={value}: must not be negative")
  if not 0.0 <= config.ema.decay <= 1.0:
    raise ConfigError(f"config.ema.decay={config.ema.decay}: must lie in [0, 1]")
  if config.loss.cutmix_prob > 1.0:
    raise ConfigError(f"config.loss.cutmix_prob={config.loss.cutmix_prob}: must lie in [0, 1]")
  if config.sup_only_epochs > config.num_epochs:
    raise ConfigError(f"config.sup_only_epochs={config.sup_only_epochs} exceeds config.num_epochs={config.num_epochs}")
  check_batch_split(config, num_devices, num_processes)
  if config.model.arch not in _ARCHS:
    raise ConfigError(f"config.model.arch={config.model.arch!r}: expected one of {_ARCHS}")
  if config.model.arch == "dpt":
    _validate_dpt(config)
  elif config.model.depth not in (14, 50, 101):
    raise ConfigError(f"config.model.depth={config.model.depth}: expected 14, 50 or 101")
  if config.optim.name not in _OPTIMIZERS:
    raise ConfigError(f"config.optim.name={config.optim.name!r}: expected one of {_OPTIMIZERS}")
  if not all(0.0 <= b < 1.0 for b in config.optim.betas):
    raise ConfigError(f"config.optim.betas={tuple(config.optim.betas)}: each must lie in [0, 1)")
  if not config.optim.eps > 0:
    raise ConfigError(f"config.optim.eps={config.optim.eps}: must be positive")
  if config.evaluation.mode not in ("center", "sliding"):
    raise ConfigError(f"config.evaluation.mode={config.evaluation.mode!r}: expected center or sliding")
  if config.evaluation.model not in ("auto", "teacher", "student"):
    raise ConfigError(f"config.evaluation.model={config.evaluation.model!r}: expected auto, teacher or student")
  if config.loss.pseudo_labels not in ("teacher", "ground_truth"):
    raise ConfigError(f"config.loss.pseudo_labels={config.loss.pseudo_labels!r}: expected teacher or ground_truth")
  if config.loss.cutmix_coin not in ("step", "slice"):
    raise ConfigError(f"config.loss.cutmix_coin={config.loss.cutmix_coin!r}: expected step or slice")
  if config.loss.quantile_method not in ("sort", "histogram"):
    raise ConfigError(f"config.loss.quantile_method={config.loss.quantile_method!r}: expected sort or histogram")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected float32, bfloat16 or float16")
  if not config.optim.loss_scale_init > 0 or config.optim.loss_scale_growth_interval < 1:
    raise ConfigError(f"config.optim.loss_scale_init={config.optim.loss_scale_init} and "
                      f"loss_scale_growth_interval={config.optim.loss_scale_growth_interval}: must be positive")
  if config.data.crop_size < 32:
    raise ConfigError(f"config.data.crop_size={config.data.crop_size}: must be at least 32")
  if config.dgcl.num_negatives < 1 or config.dgcl.num_anchors < 1 or config.dgcl.num_positives < 1:
    raise ConfigError("config.dgcl.num_anchors, num_positives and num_negatives must be positive")
  if max(config.dgcl.ks) > config.dgcl.bank_capacity:
    raise ConfigError(f"config.dgcl.ks={tuple(config.dgcl.ks)}: largest k exceeds dgcl.bank_capacity")


def _validate_dpt(config) -> None:
  """model.arch = "dpt": the ViT size, the head's widths, no aux head, crops in whole 14-pixel patches."""
  m = config.model
  if m.vit not in _VIT_SIZES:
    raise ConfigError(f"config.model.vit={m.vit!r}: expected one of {_VIT_SIZES}")
  if not isinstance(m.dpt_features, int) or isinstance(m.dpt_features, bool) or m.dpt_features < 0:
    raise ConfigError(f"config.model.dpt_features={m.dpt_features!r}: expected a non-negative int (0: per ViT size)")
  if len(m.dpt_out_channels) not in (0, 4):
    raise ConfigError(f"config.model.dpt_out_channels={tuple(m.dpt_out_channels)}: expected 4 values (one per "
                      "ViT layer the head reads) or () for the per-size default")
  if m.aux:
    raise ConfigError("config.model.aux=True: the auxiliary head (ResNet stage 3) has no DPT counterpart; "
                      "set it False with model.arch='dpt'")
  for name in ("crop_size", "val_crop_size"):
    value = config.data[name]
    if value % PATCH:
      lower = max(PATCH, value // PATCH * PATCH)
      raise ConfigError(f"config.data.{name}={value}: model.arch='dpt' needs a multiple of the ViT's {PATCH}-pixel "
                        f"patch (e.g. {lower} or {lower + PATCH})")


DINOV2_VARIANTS = ("dinov2_small", "dinov2_base", "dinov2_large")


def use_dinov2_dpt(config, variant: str) -> None:
  """Turns a DGCL recipe into DGCL on UniMatch V2's segmentation network (README, DGCL on DINOv2):
  a DINOv2 ViT/14 of `variant`'s size ("dinov2_small" | "dinov2_base" | "dinov2_large") with its DPT
  head, trained as UniMatch V2 trains it: AdamW (betas 0.9 / 0.999, weight decay 0.01), backbone lr
  5e-6 and head lr x40, poly 0.9; the pretrained backbone from pretrained/<variant> (a converted
  DINOv2 release checkpoint). Crops, batch, epochs and OHEM are the dataset config's to set; the
  teacher, EMA and DGCL settings stay DGCL's."""
  if variant not in DINOV2_VARIANTS:
    raise ConfigError(f"unknown DINOv2 variant {variant!r}: expected one of {', '.join(DINOV2_VARIANTS)}")
  m = config.model
  m.arch = "dpt"
  m.vit = variant.split("_", 1)[1]
  m.dpt_features, m.dpt_out_channels = 0, ()   # UniMatch V2's per-size widths (models/dpt.py)
  m.aux = False                                # no DPT counterpart
  m.pretrained = f"pretrained/{variant}"       # convert_torch_checkpoint.py --input dinov2_vit?14_pretrain.pth
  o = config.optim
  o.name, o.base_lr, o.decoder_lr_mult = "adamw", 5e-6, 40.0
  o.betas, o.eps, o.weight_decay, o.poly_power = (0.9, 0.999), 1e-8, 0.01, 0.9


def pretrained_source(config) -> tuple[str, str]:
  """(what, torch file) config.model.pretrained is converted from, for messages: ('the ImageNet
  backbone', 'resnet101.pth') or, for model.arch='dpt', ('the DINOv2 backbone', 'dinov2_vits14_pretrain.pth')."""
  if config.model.get("arch", "deeplabv3plus") == "dpt":
    letter = {"small": "s", "base": "b", "large": "l"}.get(config.model.vit, "s")
    return "the DINOv2 backbone", f"dinov2_vit{letter}14_pretrain.pth"
  return "the ImageNet backbone", "resnet101.pth"


# ----------------------------------------------------------------------------- run identity


class ConfigChangeError(ConfigError):
  """A resumed run's config differs from the one its checkpoints were trained with."""


# Fields that do not change what a run computes, free to differ when a run resumes: how often it
# logs, saves and evaluates, input-pipeline parallelism, where the data lives, class names, and
# the pretrained backbone (read only when a run starts). Every other field is the run's identity.
FREE_FIELDS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
    "image_summary_every_steps", "num_eval_images_logged", "evaluation.mode", "evaluation.model",
    "model.pretrained", "model.remat", "compilation_cache_dir",
    "data.root", "data.tfds_data_dir", "data.num_workers", "data.prefetch_buffer_size", "data.class_names",
    "data.max_image_size",
})
# Split lists: the same ids under another path (a moved checkout) are the same run.
_LIST_FIELDS = frozenset({"data.labeled_list", "data.unlabeled_list", "data.val_list"})


def pretrained_dir(config) -> str | None:
  """config.model.pretrained, or None for a random initialization ("" or "none")."""
  value = str(config.model.pretrained or "").strip()
  return None if value.lower() in ("", "none") else value


def as_json_dict(config) -> dict:
  """The config as config.json stores it (tuples become lists)."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(config.to_json_best_effort())


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _same_list_file(a, b) -> bool:
  if a == b:
    return True
  try:
    with open(a, "rb") as fa, open(b, "rb") as fb:
      return fa.read().split() == fb.read().split()
  except (OSError, TypeError):
    return False


def config_changes(stored: dict, requested: dict) -> list[tuple[str, object, object]]:
  """(field, stored value, requested value) for each identity field that differs.

  Both dicts as `as_json_dict` gives them. A field the stored config lacks (added to the code
  after the run started) counts with its default; fields the code no longer has are ignored.
  """
  old, new = _flatten(stored), _flatten(requested)
  defaults = _flatten(as_json_dict(base_config()))
  changes = []
  for name, value in new.items():
    if name in FREE_FIELDS:
      continue
    before = old.get(name, defaults.get(name, value))
    if name in _LIST_FIELDS:
      if not _same_list_file(before, value):
        changes.append((name, before, value))
    elif before != value:
      changes.append((name, before, value))
  return changes


def describe_changes(changes) -> str:
  import json  # pylint: disable=g-import-not-at-top
  return ", ".join(f"{name} {json.dumps(a)} -> {json.dumps(b)}" for name, a, b in changes)
