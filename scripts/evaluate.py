"""Evaluate a checkpoint: mIoU, per-class IoU table, optional colorized predictions.

  python scripts/evaluate.py --workdir=runs/pascal732 \
      [--checkpoint=best|latest|STEP] [--model=auto|teacher|student] [--mode=center|sliding] \
      [--scales=1.0,...] [--flip] [--output_json=FILE] [--save_predictions=DIR] [--config.x=y]

The run's own <workdir>/config.json is the config (--config=FILE replaces it, --config.x=y
overrides a field). The default protocol is the config's `evaluation` fields: for Pascal the
in-training one (student or teacher, whichever scored higher, on centre crops); for Cityscapes
the reference's stand-alone one (the teacher, windows of 800 with stride 534 over the full
image, REFERENCE.md section 2). Both networks are scored in float32.
A checkpoint converted from the reference's PyTorch training checkpoints
(scripts/convert_torch_checkpoint.py) is evaluated with --variables=DIR --config=FILE instead.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dgcl_jax import cli, script_support  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG, _WORKDIR, _VARIABLES, _CHECKPOINT, _MODEL = script_support.define_checkpoint_flags("Which network to evaluate.")
_MODE = flags.DEFINE_enum("mode", None, ["center", "sliding"],
                          "Center crop or sliding window over the full image. Default: the config's evaluation.mode.")
_SCALES = flags.DEFINE_list("scales", ["1.0"], "Scales for sliding-window evaluation.")
_FLIP = flags.DEFINE_bool("flip", False, "Add horizontally flipped predictions.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write {miou, per_class_iou, protocol, ...} here.")
_SAVE_PREDICTIONS = flags.DEFINE_string("save_predictions", None, "Write colorized prediction PNGs here.")


def protocol_name(mode: str, crop: int, scales, flip: bool) -> str:
  """'centre crops of 513' / 'sliding window 800, stride 534, over the full image', scales, flip."""
  if mode == "sliding":
    text = f"sliding window {crop}, stride {int(math.ceil(crop * 2 / 3))}, over the full image"
  else:
    text = f"centre crops of {crop}"
  if list(scales) != [1.0]:
    text += f", scales {list(scales)}"
  return text + (", flipped" if flip else "") + ", float32"


def _center_confusion(config, module, variables, batch_sharding, save_dir, palette):
  """The in-training evaluation path, batch by batch: one compiled function gives the confusion
  matrix and, for --save_predictions, the predictions."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dgcl_jax import evaluation, runtime, summaries  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  num_classes = config.model.num_classes
  eval_fn = jax.jit(functools.partial(evaluation.predictions_and_confusion, module, num_classes=num_classes,
                                      ignore_label=int(config.data.ignore_label)))
  conf = np.zeros((num_classes, num_classes), np.int64)
  index = 0
  for item in pipeline.create_val_iterator(config, mode="center", batch_size=jax.device_count()):
    batch = runtime.global_batch({"image": item["image"], "label": item["label"]}, batch_sharding)
    preds, batch_conf = eval_fn(variables, batch["image"], batch["label"])
    conf += np.asarray(jax.device_get(batch_conf), np.int64)
    if save_dir:
      preds = np.asarray(jax.device_get(preds))
      for i in range(preds.shape[0]):
        if item["valid"][i]:
          Image.fromarray(summaries.colorize(preds[i], palette)).save(os.path.join(save_dir, f"{index:05d}.png"))
          index += 1
  return conf


def _predictor_confusion(config, module, variables, mode, scales, flip, save_dir, palette):
  """Image by image through evaluation.Predictor: sliding windows over the full image, scales, flips."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dgcl_jax import evaluation, summaries  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  num_classes = config.model.num_classes
  predictor = evaluation.Predictor(module, variables, num_classes, int(config.data.val_crop_size))
  conf = np.zeros((num_classes, num_classes), np.int64)
  val_mode = "full" if mode == "sliding" else "center"
  for index, item in enumerate(pipeline.create_val_iterator(config, mode=val_mode, batch_size=1)):
    if "valid" in item and not item["valid"][0]:
      continue
    logits = predictor.predict(item["image"], mode=mode, scales=scales, flip=flip)
    pred = np.asarray(jax.device_get(logits)).argmax(-1)
    conf += np.asarray(evaluation.confusion_matrix(pred, item["label"], num_classes, int(config.data.ignore_label)),
                       np.int64)
    if save_dir:
      name = os.path.basename(str(item.get("name", f"{index:05d}"))).rsplit(".", 1)[0]
      Image.fromarray(summaries.colorize(pred[0], palette)).save(os.path.join(save_dir, f"{name}.png"))
  return conf


def _report(config, conf, source, protocol, mode, scales) -> None:
  """The per-class IoU table and the mIoU line; --output_json."""
  from dgcl_jax import evaluation  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  miou, iou = evaluation.miou_from_confusion(conf)
  names = list(pipeline.class_names(config))
  width = max(len(n) for n in names)
  print(f"{'class':<{width}}  IoU (%)")
  for name, value in zip(names, iou):
    print(f"{name:<{width}}  {100 * value:6.2f}")
  print(f"mIoU: {100 * miou:.2f} ({script_support.describe(source)}; {protocol})")
  if _OUTPUT_JSON.value:
    crop = int(config.data.val_crop_size)
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"miou": miou, "per_class_iou": {n: float(v) for n, v in zip(names, iou)},
                 "protocol": protocol, "mode": mode, "crop": crop,
                 "stride": int(math.ceil(crop * 2 / 3)) if mode == "sliding" else None,
                 "scales": list(scales), "flip": _FLIP.value, "dtype": "float32", **source}, f, indent=2)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  cli.quiet_libraries()
  cli.quiet_orbax_leftovers()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from dgcl_jax import checkpointing, convert, models  # pylint: disable=g-import-not-at-top
  from dgcl_jax import runtime, state  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    config = script_support.config_value(_CONFIG)
    mode = _MODE.value or config.evaluation.mode
    scales = tuple(float(s) for s in _SCALES.value)
    pipeline.check_val_inputs(config)
    mesh = runtime.make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    variables, source = script_support.load_model_variables(
        config, replicated, workdir=_WORKDIR.value, variables_dir=_VARIABLES.value, checkpoint=_CHECKPOINT.value,
        model=_MODEL.value)
  except (script_support.SetupError, checkpointing.CheckpointError, convert.ConversionError, pipeline.DataError,
          OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  # Both networks are scored in float32, as the in-training evaluation (REFERENCE.md section 2).
  module = models.build(state.teacher_model_config(config.model))
  palette = np.asarray(pipeline.palette(config.model.num_classes))
  save_dir = _SAVE_PREDICTIONS.value
  if save_dir:
    os.makedirs(save_dir, exist_ok=True)
  variables = jax.device_put(variables, replicated)
  protocol = protocol_name(mode, int(config.data.val_crop_size), scales, _FLIP.value)
  try:
    if mode == "center" and scales == (1.0,) and not _FLIP.value:
      conf = _center_confusion(config, module, variables, batch_sharding, save_dir, palette)
    else:
      conf = _predictor_confusion(config, module, variables, mode, scales, _FLIP.value, save_dir, palette)
  except pipeline.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  _report(config, conf, source, protocol, mode, scales)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: cli.exit_with_status(main(argv)), flags_parser=script_support.parse_flags)
