"""Converts a PyTorch checkpoint of the reference into an orbax directory (config.model.pretrained, --variables).

  python scripts/convert_torch_checkpoint.py --input resnet101.pth --output /abs/or/rel/DIR \
      [--config configs/pascal.py[:arg]] [--state teacher_state|model_state|state_dict]

A full model converted from a training checkpoint is evaluated with
  python scripts/evaluate.py --config=configs/pascal.py --variables=DIR

Accepts a flat state dict (e.g. the ImageNet backbone resnet101.pth) or a training checkpoint of the
reference ({'epoch', 'model_state', 'teacher_state', 'best_miou', 'optimizer_state'}, keys behind
'module.'): --state picks the entry; by default the first of teacher_state (the network the reference's
evaluation scores), model_state (the student), state_dict that is present.
A backbone-only file writes only the 'backbone' variables (the trainer keeps its own decoder
init); a full model writes everything. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position

_STATE_KEYS = ("teacher_state", "model_state", "state_dict")


class _Fail(Exception):
  pass


def load_config(spec: str):
  """'path/to/config.py[:arg]' -> get_config(arg)."""
  try:
    return config_base.load_config_file(spec)
  except config_base.ConfigError as e:
    raise _Fail(str(e)) from e


def read_state_dict(path: str, state: str | None):
  """(the chosen state dict of a .pth file as {name: float32 numpy array}, its entry name or None)."""
  import torch
  if not os.path.isfile(path):
    raise _Fail(f"input checkpoint {path!r} not found")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    # Old checkpoints may pickle non-tensor objects; weights_only cannot read them.
    print(f"note: {path} is not loadable with weights_only=True; loading it as a full pickle",
          file=sys.stderr)
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:
    raise _Fail(f"cannot read {path!r} with torch.load: {type(e).__name__}: {str(e).splitlines()[0]}")
  if not isinstance(obj, dict):
    raise _Fail(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  if state is not None:
    if state not in obj:
      raise _Fail(f"{path!r} has no {state!r} entry (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    obj = obj[state]
    if not isinstance(obj, dict):
      raise _Fail(f"{path!r}: entry {state!r} holds a {type(obj).__name__}, not a state dict")
  else:
    for key in _STATE_KEYS:
      if isinstance(obj.get(key), dict):
        obj, state = obj[key], key
        break
  tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  if not tensors or len(tensors) != len(obj):
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
    raise _Fail(f"{path!r} is not a state dict of tensors (non-tensor entries: {', '.join(others) or 'none'}; "
                f"pick one with --state)")
  return {str(k): v.detach().to(torch.float32).cpu().numpy() for k, v in tensors.items()}, state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="PyTorch .pth file")
  parser.add_argument("--output", required=True, help="orbax directory to write (must not exist)")
  parser.add_argument("--config", default=os.path.join(_ROOT, "configs", "pascal.py"),
                      help="config file[:arg] whose model section the weights must fit")
  parser.add_argument("--state", default=None, help="entry of a training checkpoint to convert")
  args = parser.parse_args(argv)
  from dgcl_jax import convert
  try:
    if os.path.exists(args.output):
      raise _Fail(f"output {args.output!r} already exists")
    model_config = load_config(args.config).model
    state_dict, entry = read_state_dict(args.input, args.state)
    variables, full = convert.convert_state_dict(state_dict, model_config)
    convert.save_variables(args.output, variables)
  except (_Fail, convert.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n = sum(v.size for c in variables.values() for v in _leaves(c))
  what = ("full model" if full else "backbone") + (f" from {entry}" if entry else "")
  print(f"wrote {what} ({n} values) to {args.output}")
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == "__main__":
  sys.exit(main())
