"""PyTorch DINOv2 / UniMatch V2 state dicts (name -> numpy array) -> Flax variables of models.DPTSegmenter.

Two sources, told apart by their keys (an optional leading 'module.' is dropped, num_batches_tracked
ignored, as convert.py does):
  (a) a DINOv2 release checkpoint (dinov2_vit{s,b,l}14_pretrain.pth: cls_token, pos_embed, mask_token,
      patch_embed.proj.*, blocks.N.*, norm.*): fills the 'backbone' only;
  (b) a UniMatch V2 model ('backbone.*' + 'head.*'; its training checkpoint's 'model' or 'model_ema'
      entry): fills the backbone and the DPT head.
DGCL's representation head (head/rep_fc1, rep_bn, rep_fc2) has no torch counterpart and keeps the
values of the `variables` given, as does everything a source does not cover.

Names (torch -> Flax; `bb` = '' for a release checkpoint, 'backbone.' for UniMatch V2):
  bb cls_token / pos_embed            backbone/cls_token, pos_embed (as they are)
  bb patch_embed.proj                 backbone/patch_embed              conv 14x14
  bb blocks.N.{norm1,norm2}           backbone/blocks_N/{norm1,norm2}   LayerNorm
  bb blocks.N.attn.{qkv,proj}         backbone/blocks_N/attn/{qkv,proj} Linear
  bb blocks.N.mlp.{fc1,fc2}           backbone/blocks_N/mlp/{fc1,fc2}   Linear
  bb blocks.N.{ls1,ls2}.gamma         backbone/blocks_N/{ls1,ls2}/gamma
  bb norm                             backbone/norm
  head.projects.I                     head/projects_I                   conv 1x1
  head.resize_layers.{0,1}            head/resize_layers_{0,1}          ConvTranspose [in, out, k, k]
  head.resize_layers.3                head/resize_layers_3              conv 3x3 stride 2
  head.scratch.layerK_rn              head/layerK_rn                    conv 3x3, no bias
  head.scratch.refinenetK.<rest>      head/refinenetK/<rest>            out_conv, resConfUnit{1,2}.conv{1,2}
  head.scratch.output_conv.{0,2}      head/output_conv_{0,2}
Tensors: conv OIHW -> HWIO, ConvTranspose IOHW -> HWIO, Linear [out, in] -> [in, out], LayerNorm
weight -> scale. Read and dropped: mask_token (masked pretraining only) and
head.scratch.refinenet4.resConfUnit1.* (UniMatch V2 builds it, its forward never calls it).
Anything else missing, unexpected or mis-shaped raises convert.ConversionError (a ValueError), one line.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from dgcl_jax.convert import ConversionError, key_problems, listing, place_like

_DROPPED = (re.compile(r"backbone\.mask_token$"), re.compile(r"head\.scratch\.refinenet4\.resConfUnit1\."))
_SCRATCH = re.compile(r"^(layer\d_rn|refinenet\d|output_conv_\d)$")
_INDEXED = re.compile(r"^(blocks|projects|resize_layers|output_conv)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}
_VIT_DIMS = {48: "tiny", 384: "small", 768: "base", 1024: "large"}


def torch_name(path: tuple) -> Optional[tuple]:
  """Flax params path ('backbone' | 'head', ..., leaf) -> (torch key with 'backbone.'/'head.', transform),
  transform in None | 'linear' | 'oihw' | 'iohw'; None for DGCL's rep head (no torch counterpart)."""
  top, *modules, leaf = path
  if top == "head" and modules and modules[0].startswith("rep_"):
    return None
  if top == "backbone" and not modules:            # cls_token, pos_embed
    return f"backbone.{leaf}", None
  names = [_INDEXED.sub(r"\1.\2", m) for m in modules]
  if top == "backbone" and modules == ["patch_embed"]:
    names = ["patch_embed", "proj"]
  if top == "head" and _SCRATCH.match(modules[0]):
    names = ["scratch"] + names
  transform = None
  if leaf == "kernel":
    transform = "linear" if top == "backbone" and modules != ["patch_embed"] else "oihw"
    if modules[0] in ("resize_layers_0", "resize_layers_1"):
      transform = "iohw"
  return ".".join([top] + names + [_LEAVES[leaf]]), transform


def _to_flax(array, transform):
  if transform == "linear":
    return np.transpose(array, (1, 0))
  if transform == "oihw":
    return np.transpose(array, (2, 3, 1, 0))
  if transform == "iohw":
    return np.transpose(array, (2, 3, 0, 1))
  return array


def _torch_shape(shape, transform):
  s = tuple(shape)
  if transform == "linear":
    return (s[1], s[0])
  if transform == "oihw":
    return (s[3], s[2], s[0], s[1])
  if transform == "iohw":
    return (s[2], s[3], s[0], s[1])
  return s


def _clean(state_dict: Mapping[str, Any]):
  """Drops 'module.' and num_batches_tracked; a release checkpoint's keys get 'backbone.' (see _shown)."""
  sd = {}
  for key, value in state_dict.items():
    key = str(key)
    key = key[len("module."):] if key.startswith("module.") else key
    if not key.endswith("num_batches_tracked"):
      sd[key] = value
  unimatch = any(k.startswith(("backbone.", "head.")) for k in sd)
  if not unimatch:
    sd = {"backbone." + k: v for k, v in sd.items()}
  return sd, unimatch


def _hint(sd, flat_params, unimatch):
  """' (...)' naming the ViT size/depth of the state dict when it differs from the model's."""
  pos, blocks = sd.get("backbone.pos_embed"), {int(m.group(1)) for k in sd
                                              for m in [re.match(r"backbone\.blocks\.(\d+)\.", k)] if m}
  model_dim = flat_params[("backbone", "pos_embed")].shape[-1]
  model_depth = len({p[1] for p in flat_params if p[0] == "backbone" and p[1].startswith("blocks_")})
  notes = []
  if pos is not None and np.shape(pos)[-1] != model_dim:
    dim = np.shape(pos)[-1]
    notes.append(f"the state dict is a ViT of width {dim} ({_VIT_DIMS.get(dim, '?')}), the model "
                 f"{model_dim} ({_VIT_DIMS.get(model_dim, '?')}): check model.vit")
  elif blocks and max(blocks) + 1 != model_depth:
    notes.append(f"the state dict has {max(blocks) + 1} blocks, the model {model_depth}")
  return f" ({'; '.join(notes)})" if notes else ""


def convert_vit_state_dict(state_dict: Mapping[str, Any], variables):
  """({flax params path: float32 numpy array} of what the state dict covers, unimatch: bool).

  `variables` gives the expected shapes ({'params': ...}; arrays or ShapeDtypeStructs).
  """
  sd, unimatch = _clean(state_dict)
  flat = traverse_util.flatten_dict(_plain(variables["params"]))
  shown = (lambda k: k) if unimatch else (lambda k: k[len("backbone."):])
  converted, missing, wrong, used = {}, [], [], set()
  for path, leaf in flat.items():
    if path[0] not in ("backbone", "head") or (path[0] == "head" and not unimatch):
      continue
    name = torch_name(path)
    if name is None:
      continue
    key, transform = name
    want = _torch_shape(leaf.shape, transform)
    if key not in sd:
      missing.append(shown(key))
      continue
    used.add(key)
    array = np.asarray(sd[key], dtype=np.float32)
    if tuple(array.shape) != want:
      wrong.append(f"{shown(key)} has shape {tuple(array.shape)}, the model expects {want}")
      continue
    converted[path] = _to_flax(array, transform)
  unexpected = sorted(shown(k) for k in sd if k not in used and not any(p.match(k) for p in _DROPPED))
  problems = ([listing(wrong, 2)] if wrong else []) + key_problems(missing, unexpected)
  if problems:
    kind = "UniMatch V2" if unimatch else "DINOv2 release (backbone-only)"
    raise ConversionError(f"cannot convert {kind} state dict ({len(sd)} tensors): " + "; ".join(problems)
                          + _hint(sd, flat, unimatch))
  return converted, unimatch


def from_torch_vit(state_dict: Mapping[str, Any], variables):
  """`variables` ({'params', 'batch_stats', ...} of models.DPTSegmenter, e.g. models.init_variables)
  with every tensor the state dict covers replaced: a DINOv2 release checkpoint fills the backbone, a
  UniMatch V2 one ('module.' prefix allowed) the backbone and the DPT head; the rep head and
  batch_stats stay. Raises convert.ConversionError (ValueError, one line) on any mismatch."""
  converted, _ = convert_vit_state_dict(state_dict, variables)
  params = traverse_util.flatten_dict(_plain(variables["params"]))
  for path, value in converted.items():
    params[path] = place_like(value, params[path])
  out = dict(_plain(variables))
  out["params"] = traverse_util.unflatten_dict(params)
  return out


def unimatch_state_dict(checkpoint: Mapping[str, Any], ema: bool = False):
  """The model's state dict from a UniMatch V2 training checkpoint ({'model', 'model_ema', 'optimizer',
  ...}); a plain state dict is returned as it is."""
  entry = "model_ema" if ema else "model"
  if entry in checkpoint and isinstance(checkpoint[entry], Mapping):
    return checkpoint[entry]
  if ema:
    raise ConversionError(f"the checkpoint has no 'model_ema' entry (entries: {listing(sorted(checkpoint))})")
  return checkpoint


def read_torch_state_dict(path: str):
  """{name: numpy array} from a .npz, or from a torch file (needs torch: pip install '.[convert]')."""
  if str(path).endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"reading {path!r} needs PyTorch (pip install torch), or pass a .npz") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  return _numpy_tree(obj)


def _numpy_tree(obj):
  if isinstance(obj, Mapping):
    return {k: _numpy_tree(v) for k, v in obj.items()}
  if hasattr(obj, "detach"):
    return obj.detach().float().numpy()
  return obj


def load_dinov2_backbone(source, variables):
  """`variables` with the backbone from a DINOv2 release checkpoint (a path or a state dict)."""
  state_dict = read_torch_state_dict(source) if isinstance(source, str) else source
  _, unimatch = _clean(state_dict)
  if unimatch:
    raise ConversionError("expected a DINOv2 release checkpoint (keys without 'backbone.'), got a UniMatch V2 "
                          "model: use load_unimatch_v2")
  return from_torch_vit(state_dict, variables)


def load_unimatch_v2(source, variables, ema: bool = False):
  """`variables` with backbone and DPT head from a UniMatch V2 checkpoint (path, checkpoint dict or
  state dict); `ema` picks its 'model_ema' entry."""
  checkpoint = read_torch_state_dict(source) if isinstance(source, str) else source
  state_dict = unimatch_state_dict(checkpoint, ema)
  if not _clean(state_dict)[1]:
    raise ConversionError("expected a UniMatch V2 model (keys 'backbone.*', 'head.*'), got "
                          f"{listing(sorted(state_dict), 3)}: a DINOv2 release checkpoint goes to load_dinov2_backbone")
  return from_torch_vit(state_dict, variables)


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree
