"""Converts a PyTorch checkpoint of the reference into an orbax directory (config.model.pretrained, --variables).

  python scripts/convert_torch_checkpoint.py --input resnet101.pth --output /abs/or/rel/DIR \
      [--config configs/pascal.py[:arg]] [--state teacher_state|model_state|state_dict] [--trust_pickle]

A full model converted from a training checkpoint is evaluated with
  python scripts/evaluate.py --config=configs/pascal.py --variables=DIR

Accepts a flat state dict (e.g. the ImageNet backbone resnet101.pth) or a training checkpoint of the
reference ({'epoch', 'model_state', 'teacher_state', 'best_miou', 'optimizer_state'}, keys behind
'module.'): --state picks the entry; by default the first of teacher_state (the network the reference's
evaluation scores), model_state (the student), state_dict, model_ema, model that is present.
A backbone-only file writes only the 'backbone' variables (the trainer keeps its own decoder
init); a full model writes everything. Errors print one line and exit with status 1.

DINOv2 / UniMatch V2 (model.arch='dpt'): a DINOv2 release checkpoint (dinov2_vit{s,b,l}14_pretrain.pth)
converts to the ViT backbone of config.model.pretrained; a UniMatch V2 training checkpoint ({'model',
'model_ema', ...}, 'backbone.*' + 'head.*' behind 'module.'; model_ema by default) to a full DPT for
evaluation (DGCL's representation head, which UniMatch V2 lacks, initialized from seed 0). Without
--config the ViT's size (and a UniMatch V2 model's class count) are read from the file:
  python scripts/convert_torch_checkpoint.py --input dinov2_vits14_pretrain.pth --output pretrained/dinov2_small

Loading is safe for files from strangers: a .pth is a pickle, and a full unpickle can run any code the
file carries, so the file is read with torch.load(weights_only=True), which builds only tensors, the
plain Python containers and numbers, and the few types allowed below: numpy scalars of number types
(e.g. a best_miou saved as numpy.float64), rebuilt by this script's own checked stand-ins for
numpy.dtype and numpy's scalar reconstructor (with torch >= 2.6; older torch allows no extra types).
A file that needs any other object (a class of the reference's code, an argparse.Namespace, numpy
arrays, or a crafted payload) is refused with one line naming what torch refused; --trust_pickle loads
it as a full pickle instead, only for files you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position

_STATE_KEYS = ("teacher_state", "model_state", "state_dict", "model_ema", "model")
_VIT_SIZES = {384: "small", 768: "base", 1024: "large"}


class _Fail(Exception):
  pass


def load_config(spec: str):
  """'path/to/config.py[:arg]' -> get_config(arg)."""
  try:
    return config_base.load_config_file(spec)
  except config_base.ConfigError as e:
    raise _Fail(str(e)) from e


# ----------------------------------------------------------------------------- safe loading
#
# torch.load(weights_only=True) builds tensors, dict/list/tuple/set, str/bytes/int/float/bool/None,
# OrderedDict, torch.Size/device/dtypes and nothing else; a global outside its allow-list is refused
# before anything is called. The reference's training checkpoints and torchvision's resnet101.pth need
# nothing more, except that a checkpoint may hold numpy scalars (best_miou computed with numpy is a
# numpy.float64). A pickled numpy scalar is
#   numpy.core.multiarray.scalar(numpy.dtype('f8', False, True) + BUILD(dtype state), <its bytes>)
# and allowing numpy's own callables would let the file set a dtype's internal flags through
# dtype.__setstate__ (a long double marked NPY_USE_GETITEM crashes numpy when its scalar is built). So
# the names numpy.dtype and numpy[._]core.multiarray.scalar map to the two stand-ins below: they accept
# only a number type, check the state against that type's own, and build the scalar with
# numpy.frombuffer from the bytes; no numpy callable ever sees the file's arguments.

_SCALAR_NAMES = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")   # numpy 1.x, 2.x pickles
_TRUST_FLAG = "--trust_pickle"


class _NumpyNumberDType:
  """Stands in for numpy.dtype(spec, align, copy) in a weights_only load: a number type only (bool,
  [u]int, float, complex: spec like 'f8', 'i8', 'b1'); its BUILD state must be that type's own."""

  __slots__ = ("dtype",)

  def __new__(cls, spec=None, align=False, copy=False, *rest):
    import numpy as np
    if (not isinstance(spec, str) or not re.fullmatch(r"[biufc][0-9]{1,2}", spec) or rest
        or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int))):
      raise pickle.UnpicklingError(f"numpy.dtype{(spec, align, copy) + rest!r} is not a plain number type")
    try:
      dtype = np.dtype(spec)
    except TypeError as e:
      raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a numpy type") from e
    if dtype.kind not in "biufc" or dtype.str[1:] != spec:
      raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a plain number type")
    self = object.__new__(cls)
    self.dtype = dtype
    return self

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subdescr, names, fields, elsize, alignment, flags[, metadata]).
    canonical = self.dtype.__reduce__()[2]
    ok = (isinstance(state, tuple) and len(state) == len(canonical) and state[0] in (3, 4)
          and state[1] in ("<", ">", "|", "=") and state[2:] == canonical[2:])
    if not ok:
      raise pickle.UnpicklingError(f"numpy dtype state {state!r} is not that of a plain {self.dtype}")
    if state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  """Stands in for numpy.core.multiarray.scalar(dtype, bytes): a numpy number from its bytes."""
  import numpy as np
  if not isinstance(dtype, _NumpyNumberDType) or not hasattr(dtype, "dtype"):
    raise pickle.UnpicklingError(f"numpy scalar of {type(dtype).__name__}, not of a plain number dtype")
  if data is None:
    data = bytes(dtype.dtype.itemsize)
  if isinstance(data, str):   # Python 2 era pickles
    data = data.encode("latin1")
  if not isinstance(data, bytes) or len(data) < dtype.dtype.itemsize:
    raise pickle.UnpicklingError("numpy scalar without the bytes of its value")
  return np.frombuffer(data[:dtype.dtype.itemsize], dtype=dtype.dtype)[0]


def _allow_list(torch):
  """What weights_only loading may build beyond torch's defaults (as add_safe_globals entries)."""
  version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
  if not hasattr(torch.serialization, "safe_globals") or version < (2, 6):
    return []   # no (callable, name) entries before torch 2.6: numpy scalars are refused
  return [(_NumpyNumberDType, "numpy.dtype"), _NumpyNumberDType] + [(_numpy_scalar, n) for n in _SCALAR_NAMES]


def _refused(path: str, error: BaseException) -> str:
  """What torch's weights_only loader refused in `path`: the disallowed globals of a zip checkpoint,
  else the one its message names, else the message's gist (one line)."""
  import torch
  names = []
  try:
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:  # legacy (non-zip) files, old torch
    pass
  text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
  if not names:
    names = re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
  if names:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
  detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load")[0]
  detail = " ".join(detail.split()) or type(error).__name__
  return detail if len(detail) <= 200 else detail[:197] + "..."


def load_checkpoint(path: str, trust_pickle: bool = False):
  """torch.load of `path` with weights_only=True and the allow-list above; what that refuses raises
  _Fail naming --trust_pickle, or with trust_pickle is loaded as a full pickle (a warning line)."""
  import torch
  if not os.path.isfile(path):
    raise _Fail(f"input checkpoint {path!r} not found")
  allowed = _allow_list(torch)
  scope = torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext()
  try:
    with scope:
      try:
        return torch.load(path, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError as e:
        refused = _refused(path, e)
  except Exception as e:
    raise _Fail(f"cannot read {path!r} with torch.load: {_describe(e)}") from e
  if not trust_pickle:
    raise _Fail(f"{path!r} holds objects that weights_only loading refuses ({refused}); pass {_TRUST_FLAG} "
                f"to load it as a full pickle, only for files you trust")
  print(f"warning: {_TRUST_FLAG}: loading {path!r} as a full pickle, which runs any code the file carries "
        f"(weights_only loading refuses {refused})", file=sys.stderr, flush=True)
  try:
    return torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:
    raise _Fail(f"cannot read {path!r} as a full pickle: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
  """'Type: first line of the message' (or just the type)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_state_dict(path: str, state: str | None, trust_pickle: bool = False):
  """(the chosen state dict of a .pth file as {name: float32 numpy array}, its entry name or None)."""
  import torch
  obj = load_checkpoint(path, trust_pickle)
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


def vit_description(state_dict) -> tuple[int, str | None, int | None] | None:
  """(width, model.vit size or None, UniMatch V2 class count or None) if `state_dict` is a DINOv2 ViT
  (release checkpoint or UniMatch V2 model, optionally behind 'module.'), else None."""
  keys = {k[len("module."):] if k.startswith("module.") else k: k for k in state_dict}
  for prefix in ("", "backbone."):
    pos = keys.get(prefix + "pos_embed")
    if pos is not None and any(k.startswith(prefix + "blocks.") for k in keys):
      width = int(state_dict[pos].shape[-1])
      classes = keys.get("head.scratch.output_conv.2.weight")
      return width, _VIT_SIZES.get(width), (int(state_dict[classes].shape[0]) if classes else None)
  return None


def model_config_for(state_dict, config_spec: str | None):
  """The model config the weights must fit: --config's, or (no --config) pascal.py's for a ResNet file and
  a DPT of the file's own ViT size (and class count) for a DINOv2 / UniMatch V2 file."""
  vit = vit_description(state_dict)
  if config_spec is None:
    if vit is None:
      return load_config(os.path.join(_ROOT, "configs", "pascal.py")).model
    width, size, classes = vit
    if size is None:
      raise _Fail(f"the DINOv2 ViT in the file is {width} wide, not one of "
                  f"{', '.join(f'{w} ({n})' for w, n in _VIT_SIZES.items())}: give its config with --config")
    model = config_base.model_config()
    model.arch, model.vit = "dpt", size
    model.num_classes = classes or model.num_classes
    return model
  model = load_config(config_spec).model
  if vit is not None and model.get("arch", "deeplabv3plus") != "dpt":
    size = vit[1] or "small"
    raise _Fail(f"the file holds a DINOv2 ViT ({vit[1] or f'{vit[0]} wide'}) but --config={config_spec} builds "
                f"model.arch={model.get('arch', 'deeplabv3plus')!r}: give a DPT config (e.g. configs/pascal.py:732,"
                f"dinov2_{size}) or leave --config out")
  return model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="PyTorch .pth file")
  parser.add_argument("--output", required=True, help="orbax directory to write (must not exist)")
  parser.add_argument("--config", default=None,
                      help="config file[:arg] whose model section the weights must fit (default: configs/pascal.py, "
                           "or for a DINOv2 / UniMatch V2 file a DPT of the file's ViT size)")
  parser.add_argument("--state", default=None, help="entry of a training checkpoint to convert")
  parser.add_argument(_TRUST_FLAG, action="store_true",
                      help="load a file that weights_only loading refuses as a full pickle, which runs any "
                           "code it carries: only for files you trust")
  args = parser.parse_args(argv)
  from dgcl_jax import convert
  try:
    if os.path.exists(args.output):
      raise _Fail(f"output {args.output!r} already exists")
    state_dict, entry = read_state_dict(args.input, args.state, args.trust_pickle)
    model_config = model_config_for(state_dict, args.config)
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
