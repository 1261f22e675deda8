"""Predict segmentation masks for a folder of images: colorized masks and overlays.

  python scripts/predict.py --workdir=runs/pascal732 --input=my_images/ --output=predictions/ \
      [--checkpoint=best] [--model=auto|teacher|student] [--mode=sliding|center] [--config.x=y]

The run's own <workdir>/config.json is the config (--config=FILE replaces it); with
--variables=DIR (a converted checkpoint) give --config=FILE. The network runs in float32.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dgcl_jax import cli, script_support  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG, _WORKDIR, _VARIABLES, _CHECKPOINT, _MODEL = script_support.define_checkpoint_flags("Which network to use.")
_MODE = flags.DEFINE_enum("mode", "sliding", ["center", "sliding"], "Whole image or sliding window.")
_INPUT = flags.DEFINE_string("input", None, "Folder of images (jpg, jpeg, png).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write <name>_mask.png and <name>_overlay.png.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Mask opacity in the overlays.")

_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  cli.quiet_libraries()
  cli.quiet_orbax_leftovers()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from dgcl_jax import checkpointing, convert, evaluation, models  # pylint: disable=g-import-not-at-top
  from dgcl_jax import runtime, state, summaries  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if not _INPUT.value or not os.path.isdir(_INPUT.value):
    print(f"error: --input={_INPUT.value!r} is not a folder", file=sys.stderr)
    return 1
  if not _OUTPUT.value:
    print("error: --output is required", file=sys.stderr)
    return 1
  names = sorted(n for n in os.listdir(_INPUT.value) if n.lower().endswith(_EXTENSIONS))
  if not names:
    print(f"error: no images ({', '.join(_EXTENSIONS)}) in {_INPUT.value}", file=sys.stderr)
    return 1
  try:
    config = script_support.config_value(_CONFIG)
    replicated = NamedSharding(runtime.make_mesh(), P())
    variables, source = script_support.load_model_variables(
        config, replicated, workdir=_WORKDIR.value, variables_dir=_VARIABLES.value, checkpoint=_CHECKPOINT.value,
        model=_MODEL.value)
  except (script_support.SetupError, checkpointing.CheckpointError, convert.ConversionError, pipeline.DataError,
          OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"predicting with the {script_support.describe(source)}, float32", flush=True)
  module = models.build(state.teacher_model_config(config.model))  # float32, whichever network
  variables = jax.device_put(variables, replicated)
  predictor = evaluation.Predictor(module, variables, config.model.num_classes, config.data.val_crop_size)
  palette = np.asarray(pipeline.palette(config.model.num_classes))
  os.makedirs(_OUTPUT.value, exist_ok=True)
  for name in names:
    path = os.path.join(_INPUT.value, name)
    try:
      rgb = pipeline.load_image(path)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    image = pipeline.normalize(rgb, config)[None]
    logits = predictor.predict(image, mode=_MODE.value)
    mask = np.asarray(jax.device_get(logits)).argmax(-1)[0]
    colored = summaries.colorize(mask, palette)
    overlay = (1 - _ALPHA.value) * rgb.astype(np.float32) + _ALPHA.value * colored.astype(np.float32)
    stem = os.path.splitext(name)[0]
    Image.fromarray(colored).save(os.path.join(_OUTPUT.value, f"{stem}_mask.png"))
    Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(os.path.join(_OUTPUT.value, f"{stem}_overlay.png"))
    print(f"{name}: {os.path.join(_OUTPUT.value, stem)}_mask.png")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: cli.exit_with_status(main(argv)), flags_parser=script_support.parse_flags)
