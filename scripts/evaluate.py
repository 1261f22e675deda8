"""Evaluate a checkpoint: mIoU, per-class IoU table, optional colorized predictions.

  python scripts/evaluate.py --config=configs/pascal.py:732 --workdir=runs/pascal732 \
      [--checkpoint=best|latest|STEP] [--model=auto|teacher|student] [--mode=center|sliding] \
      [--scales=1.0,...] [--flip] [--output_json=FILE] [--save_predictions=DIR]

A checkpoint converted from the reference's PyTorch training checkpoints
(scripts/convert_torch_checkpoint.py) is evaluated with --variables=DIR instead of --workdir.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dgcl_jax import restore  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG, _WORKDIR, _VARIABLES, _CHECKPOINT, _MODEL = restore.define_checkpoint_flags("Which network to evaluate.")
_MODE = flags.DEFINE_enum("mode", "center", ["center", "sliding"], "Center crop or sliding window.")
_SCALES = flags.DEFINE_list("scales", ["1.0"], "Scales for sliding-window evaluation.")
_FLIP = flags.DEFINE_bool("flip", False, "Add horizontally flipped predictions.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write {miou, per_class_iou, ...} here.")
_SAVE_PREDICTIONS = flags.DEFINE_string("save_predictions", None, "Write colorized prediction PNGs here.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dgcl_jax import evaluation, summaries, train  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    pipeline.check_inputs(config)
    mesh = train.make_mesh()
    fns = train.StepFunctions(config, mesh, pipeline.steps_per_epoch(config))
    variables, source = restore.load_model_variables(
        config, fns, workdir=_WORKDIR.value, variables_dir=_VARIABLES.value, checkpoint=_CHECKPOINT.value,
        model=_MODEL.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  module = fns.teacher if source["model"] == "teacher" else fns.student
  num_classes = config.model.num_classes
  palette = np.asarray(pipeline.palette(num_classes))
  conf = np.zeros((num_classes, num_classes), np.int64)
  scales = tuple(float(s) for s in _SCALES.value)
  if _SAVE_PREDICTIONS.value:
    os.makedirs(_SAVE_PREDICTIONS.value, exist_ok=True)
  variables = jax.device_put(variables, fns.replicated)
  if _MODE.value == "center" and scales == (1.0,) and not _FLIP.value:
    # The in-training evaluation path, batch by batch.
    eval_fn = jax.jit(lambda v, x, y: evaluation.confusion_from_model(module, v, x, y, num_classes))
    bs = jax.device_count()
    index = 0
    for item in pipeline.create_val_iterator(config, mode="center", batch_size=bs):
      batch = train.global_batch({"image": item["image"], "label": item["label"]}, fns.batch_sharding)
      conf += np.asarray(jax.device_get(eval_fn(variables, batch["image"], batch["label"])), np.int64)
      if _SAVE_PREDICTIONS.value:
        logits = evaluation.Predictor(module, variables, num_classes, config.data.val_crop_size).center(item["image"])
        preds = np.asarray(logits).argmax(-1)
        for i in range(preds.shape[0]):
          if item["valid"][i]:
            Image.fromarray(summaries.colorize(preds[i], palette)).save(
                os.path.join(_SAVE_PREDICTIONS.value, f"{index:05d}.png"))
            index += 1
  else:
    predictor = evaluation.Predictor(module, variables, num_classes, config.data.val_crop_size)
    mode = "sliding" if _MODE.value == "sliding" else "center"
    val_mode = "full" if mode == "sliding" else "center"
    for index, item in enumerate(pipeline.create_val_iterator(config, mode=val_mode, batch_size=1)):
      if "valid" in item and not item["valid"][0]:
        continue
      logits = predictor.predict(item["image"], mode=mode, scales=scales, flip=_FLIP.value)
      pred = np.asarray(jax.device_get(logits)).argmax(-1)
      conf += np.asarray(evaluation.confusion_matrix(pred, item["label"], num_classes), np.int64)
      if _SAVE_PREDICTIONS.value:
        name = os.path.basename(str(item.get("name", f"{index:05d}"))).rsplit(".", 1)[0]
        Image.fromarray(summaries.colorize(pred[0], palette)).save(
            os.path.join(_SAVE_PREDICTIONS.value, f"{name}.png"))
  miou, iou = evaluation.miou_from_confusion(conf)
  names = list(pipeline.class_names(config))
  width = max(len(n) for n in names)
  print(f"{'class':<{width}}  IoU (%)")
  for name, value in zip(names, iou):
    print(f"{name:<{width}}  {100 * value:6.2f}")
  print(f"mIoU: {100 * miou:.2f} ({source['model']}, {_MODE.value}, scales {list(scales)}, flip {_FLIP.value})")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"miou": miou, "per_class_iou": {n: float(v) for n, v in zip(names, iou)},
                 "mode": _MODE.value, "scales": list(scales), "flip": _FLIP.value,
                 **source}, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
