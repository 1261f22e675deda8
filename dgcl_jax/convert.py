"""PyTorch (reference) state dicts -> Flax variables, and orbax save/load of pretrained weights.

Key mapping (torch prefix -> Flax module path; `bb` = 'encoder.' in a full model, '' in a
backbone-only resnet101.pth; an optional leading 'module.' is dropped, num_batches_tracked ignored).
The names are the reference's own (REFERENCE.md section 1); tests/test_convert.py checks them
against every key of its full Pascal and Cityscapes models (tests/data/reference_state_dict_keys.json):

  bb conv1.0 / conv1.1             backbone/stem1/{conv, bn}    conv3x3 s2, BN (ReLU = conv1.2)
  bb conv1.3 / conv1.4             backbone/stem2/{conv, bn}    (ReLU = conv1.5)
  bb conv1.6 / bn1                 backbone/stem3/{conv, bn}
  bb layerI.J.conv{1,2,3}          backbone/layerI_J/conv{1,2,3}
  bb layerI.J.bn{1,2,3}            backbone/layerI_J/bn{1,2,3}
  bb layerI.0.downsample.{0,1}     backbone/layerI_0/downsample_{conv,bn}
  decoder.aspp.conv1.{1,2}         decoder/aspp/pool/{conv, bn}   (conv1.0 = AdaptiveAvgPool2d)
  decoder.aspp.conv2.{0,1}         decoder/aspp/conv1x1/{conv, bn}
  decoder.aspp.conv{3,4,5}.{0,1}   decoder/aspp/atrous{1,2,3}/{conv, bn}
  decoder.head.{0,1}               decoder/head/{conv, bn}      (2 ReLU, 3 Dropout2d)
  decoder.low_conv.{0,1}           decoder/low/{conv, bn}       conv with bias
  decoder.classifier.{0,1}         decoder/cls1/{conv, bn}      (2 ReLU, 3 Dropout2d)
  decoder.classifier.{4,5}         decoder/cls2/{conv, bn}      (6 ReLU, 7 Dropout2d -> fts)
  decoder.final                    decoder/cls_out              1x1 conv -> pred (a module of its own)
  decoder.representation.{0,1,3}  decoder/{rep_fc1, rep_bn, rep_fc2}   (2 ReLU)
  auxor.aux.{0,1,4}                aux/{block/conv, block/bn, out}     (2 ReLU, 3 Dropout2d)

Tensors: conv weight OIHW -> kernel HWIO, Linear weight [out, in] -> kernel [in, out], bias ->
bias; BN weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var. Backbone-only
files may also hold the ImageNet classifier 'fc.weight'/'fc.bias', which is ignored. Anything
else that is missing, unexpected or mis-shaped raises ConversionError (one line).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dgcl_jax import models
from dgcl_jax.models.resnet import STAGE_BLOCKS

_MAX_LISTED = 5


class ConversionError(ValueError):
  """A state dict or checkpoint that does not fit the model configuration."""


def listing(items, max_listed=_MAX_LISTED):
  items = list(items)
  shown = ", ".join(items[:max_listed])
  return shown + (f" (+{len(items) - max_listed} more)" if len(items) > max_listed else "")


def place_like(value, like):
  """`value` as an array of `like`'s dtype, on `like`'s devices and sharding when it is a jax.Array."""
  value = jnp.asarray(value, dtype=like.dtype)
  return jax.device_put(value, like.sharding) if isinstance(like, jax.Array) else value


def key_problems(missing, unexpected) -> list[str]:
  """The 'missing N keys: ...' and 'unexpected N keys: ...' parts of a conversion error."""
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} keys: {listing(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} keys: {listing(unexpected)}")
  return problems


def torch_layout(model_config, full: bool = True):
  """[(torch module prefix, Flax module path tuple, kind)], kind in conv|conv_bias|bn|linear."""
  m = model_config
  bb = "encoder." if full else ""
  rows = [(bb + "conv1.0", ("backbone", "stem1", "conv"), "conv"),
          (bb + "conv1.1", ("backbone", "stem1", "bn"), "bn"),
          (bb + "conv1.3", ("backbone", "stem2", "conv"), "conv"),
          (bb + "conv1.4", ("backbone", "stem2", "bn"), "bn"),
          (bb + "conv1.6", ("backbone", "stem3", "conv"), "conv"),
          (bb + "bn1", ("backbone", "stem3", "bn"), "bn")]
  for i, n in enumerate(STAGE_BLOCKS[m.depth]):
    for j in range(n):
      tp, fp = f"{bb}layer{i + 1}.{j}", ("backbone", f"layer{i + 1}_{j}")
      for k in (1, 2, 3):
        rows.append((f"{tp}.conv{k}", fp + (f"conv{k}",), "conv"))
        rows.append((f"{tp}.bn{k}", fp + (f"bn{k}",), "bn"))
      if j == 0:   # every stage's first block projects (channels change: 2b -> 4b, 4b -> 8b, ...)
        rows.append((f"{tp}.downsample.0", fp + ("downsample_conv",), "conv"))
        rows.append((f"{tp}.downsample.1", fp + ("downsample_bn",), "bn"))
  if not full:
    return rows
  aspp = ("decoder", "aspp")
  rows += [("decoder.aspp.conv1.1", aspp + ("pool", "conv"), "conv"),
           ("decoder.aspp.conv1.2", aspp + ("pool", "bn"), "bn"),
           ("decoder.aspp.conv2.0", aspp + ("conv1x1", "conv"), "conv"),
           ("decoder.aspp.conv2.1", aspp + ("conv1x1", "bn"), "bn")]
  for b in (1, 2, 3):
    rows += [(f"decoder.aspp.conv{b + 2}.0", aspp + (f"atrous{b}", "conv"), "conv"),
             (f"decoder.aspp.conv{b + 2}.1", aspp + (f"atrous{b}", "bn"), "bn")]
  rows += [("decoder.head.0", ("decoder", "head", "conv"), "conv"),
           ("decoder.head.1", ("decoder", "head", "bn"), "bn"),
           ("decoder.low_conv.0", ("decoder", "low", "conv"), "conv_bias"),
           ("decoder.low_conv.1", ("decoder", "low", "bn"), "bn"),
           ("decoder.classifier.0", ("decoder", "cls1", "conv"), "conv_bias"),
           ("decoder.classifier.1", ("decoder", "cls1", "bn"), "bn"),
           ("decoder.classifier.4", ("decoder", "cls2", "conv"), "conv_bias"),
           ("decoder.classifier.5", ("decoder", "cls2", "bn"), "bn"),
           ("decoder.final", ("decoder", "cls_out"), "conv_bias"),
           ("decoder.representation.0", ("decoder", "rep_fc1"), "linear"),
           ("decoder.representation.1", ("decoder", "rep_bn"), "bn"),
           ("decoder.representation.3", ("decoder", "rep_fc2"), "linear")]
  if m.aux:
    rows += [("auxor.aux.0", ("aux", "block", "conv"), "conv_bias"),
             ("auxor.aux.1", ("aux", "block", "bn"), "bn"),
             ("auxor.aux.4", ("aux", "out"), "conv_bias")]
  return rows


_KIND_TENSORS = {  # torch suffix -> (collection, flax leaf name, transform)
    "conv": [("weight", "params", "kernel", "oihw")],
    "conv_bias": [("weight", "params", "kernel", "oihw"), ("bias", "params", "bias", None)],
    "linear": [("weight", "params", "kernel", "linear"), ("bias", "params", "bias", None)],
    "bn": [("weight", "params", "scale", None), ("bias", "params", "bias", None),
           ("running_mean", "batch_stats", "mean", None), ("running_var", "batch_stats", "var", None)],
}


def _to_flax(array, transform):
  if transform == "oihw":
    return np.transpose(array, (2, 3, 1, 0))
  if transform == "linear":
    return np.transpose(array, (1, 0))
  return array


def _to_torch_shape(shape, transform):
  if transform == "oihw":
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return (shape[1], shape[0])
  return tuple(shape)


_TEMPLATES = {}


def variable_shapes(model_config):
  """{'params', 'batch_stats'} of ShapeDtypeStructs for models.build(model_config) (traced, not run)."""
  key = repr(sorted(model_config.items()))
  if key not in _TEMPLATES:
    module = models.build(model_config)
    _TEMPLATES[key] = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0)))
  return _TEMPLATES[key]


def _is_dpt(model_config) -> bool:
  return model_config.get("arch", "deeplabv3plus") == "dpt"


def _convert_dpt(state_dict, model_config, init_variables=None, rng=None):
  """convert_state_dict for model.arch='dpt' (convert_vit.py): a DINOv2 release checkpoint gives the
  'backbone' params alone; a UniMatch V2 model gives every variable, DGCL's rep head (which it lacks)
  from `init_variables`, else initialized from `rng` (default PRNGKey(0))."""
  from dgcl_jax import convert_vit  # pylint: disable=g-import-not-at-top
  converted, unimatch = convert_vit.convert_vit_state_dict(state_dict, variable_shapes(model_config))
  if not unimatch:
    return traverse_util.unflatten_dict({("params",) + path: value for path, value in converted.items()}), False
  if init_variables is None:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    init_variables = models.init_variables(models.build(model_config), rng)
  variables = convert_vit.from_torch_vit(state_dict, init_variables)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, True


def _template(model_config):
  """Flattened {(collection, *path): ShapeDtypeStruct} of the module's variables."""
  return traverse_util.flatten_dict(_plain(variable_shapes(model_config)))


def _clean(state_dict):
  out = {}
  for key, value in state_dict.items():
    key = str(key)
    if key.startswith("module."):
      key = key[len("module."):]
    if key.endswith("num_batches_tracked"):
      continue
    out[key] = value
  return out


def _depth_hint(keys, prefix, depth):
  blocks = {int(m.group(1)) for k in keys for m in [re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k)] if m}
  if not blocks:
    return ""
  n = max(blocks) + 1
  for d, stages in STAGE_BLOCKS.items():
    if stages[2] == n and d != depth:
      return f" (the state dict has {n} blocks in layer3, as ResNet depth {d}; config says depth {depth})"
  return ""


def convert_state_dict(state_dict: Mapping[str, Any], model_config):
  """Converts the tensors only: ({'params': ..., 'batch_stats': ...} of the parts present, full).

  `full` is True for a full reference model ('encoder.'/'decoder.'/'auxor.' keys), in which case
  every variable of the module is returned; else only the 'backbone' subtrees. With
  model_config.arch='dpt' the state dict is a DINOv2 release checkpoint (backbone only) or a UniMatch
  V2 model (full; DGCL's rep head, which it lacks, initialized from PRNGKey(0)): convert_vit.py.
  """
  if _is_dpt(model_config):
    return _convert_dpt(state_dict, model_config)
  sd = _clean(state_dict)
  full = any(k.startswith(("encoder.", "decoder.", "auxor.")) for k in sd)
  template = _template(model_config)
  rows = torch_layout(model_config, full)
  converted, missing, wrong, classes = {}, [], [], []
  used = set()
  for tprefix, fpath, kind in rows:
    for suffix, collection, leaf, transform in _KIND_TENSORS[kind]:
      key = f"{tprefix}.{suffix}"
      path = (collection,) + fpath + (leaf,)
      want = _to_torch_shape(template[path].shape, transform)
      if key not in sd:
        missing.append(key)
        continue
      used.add(key)
      array = np.asarray(sd[key], dtype=np.float32)
      if tuple(array.shape) != want:
        if tprefix in ("decoder.final", "auxor.aux.4") and array.ndim == len(want) and \
            array.shape[1:] == want[1:]:
          classes.append(f"{key} has {array.shape[0]} classes, config says {model_config.num_classes}")
        else:
          wrong.append(f"{key} {tuple(array.shape)} (expected {want})")
        continue
      converted[path] = _to_flax(array, transform)
  ignored = {"fc.weight", "fc.bias"} if not full else set()
  unexpected = sorted(k for k in sd if k not in used and k not in ignored)
  problems = list(classes) + key_problems(missing, unexpected)
  if wrong:
    problems.append(f"{len(wrong)} mis-shaped: {listing(wrong, 3)}")
  if problems:
    kind = "full model" if full else "backbone-only"
    hint = _depth_hint(sd, "encoder." if full else "", model_config.depth)
    raise ConversionError(f"cannot convert {kind} state dict ({len(sd)} tensors) to depth={model_config.depth}, "
                          f"num_classes={model_config.num_classes}, aux={model_config.aux}: "
                          + "; ".join(problems) + hint)
  expected = {p for p in template if full or p[1] == "backbone"}
  unfilled = sorted("/".join(p) for p in expected - set(converted))
  if unfilled:   # the layout table and the module disagree: a bug here, not in the file
    raise ConversionError(f"internal: {len(unfilled)} variables not filled: {listing(unfilled)}")
  return traverse_util.unflatten_dict(converted), full


def from_torch(state_dict: Mapping[str, Any], model_config, init_variables=None, rng=None):
  """Reference state dict (name -> numpy array) -> {'params', 'batch_stats'} of models.build(model_config).

  A full reference model fills every variable. A backbone-only file fills 'backbone'; the decoder
  (and aux head) keep `init_variables` if given, else are initialized from `rng`
  (default jax.random.PRNGKey(0)). Raises ConversionError on any mismatch. model_config.arch='dpt':
  a DINOv2 release checkpoint fills the backbone, a UniMatch V2 model everything but DGCL's rep head.
  """
  if _is_dpt(model_config):
    converted, full = _convert_dpt(state_dict, model_config, init_variables, rng)
    if full:
      return converted
    if init_variables is None:
      rng = jax.random.PRNGKey(0) if rng is None else rng
      init_variables = models.init_variables(models.build(model_config), rng)
    return merge_variables(init_variables, converted)
  converted, full = convert_state_dict(state_dict, model_config)
  if full:
    return converted
  if init_variables is None:
    module = models.build(model_config)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    init_variables = jax.jit(module.init, static_argnames="train")(
        rng, jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)
  return merge_variables(init_variables, converted)


def merge_variables(init_variables, loaded):
  """`init_variables` with every leaf of `loaded` substituted; strict about structure and shapes.

  Each top-level module ('backbone', 'decoder', 'aux') present in `loaded` must be complete
  (a ResNet-50 backbone cannot silently fill half of a ResNet-101).
  """
  init_flat = traverse_util.flatten_dict(_plain(init_variables))
  new_flat = traverse_util.flatten_dict(_plain(loaded))
  tops = {p[1] for p in new_flat if len(p) > 1}
  unexpected = sorted("/".join(p) for p in new_flat if p not in init_flat)
  missing = sorted("/".join(p) for p in init_flat if len(p) > 1 and p[1] in tops and p not in new_flat)
  wrong = []
  for path, value in new_flat.items():
    if path in init_flat and tuple(np.shape(value)) != tuple(np.shape(init_flat[path])):
      wrong.append(f"{'/'.join(path)} {tuple(np.shape(value))} (expected {tuple(np.shape(init_flat[path]))})")
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} variables of {'/'.join(sorted(tops))}: {listing(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} variables: {listing(unexpected)}")
  if wrong:
    problems.append(f"{len(wrong)} mis-shaped: {listing(wrong, 3)}")
  if problems:
    raise ConversionError("pretrained variables do not fit the model: " + "; ".join(problems))
  out = dict(init_flat)
  for path, value in new_flat.items():
    out[path] = place_like(value, init_flat[path])
  return traverse_util.unflatten_dict(out)


def _plain(tree):
  """FrozenDict / Mapping -> nested plain dicts."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def save_variables(directory: str, variables, force: bool = False) -> None:
  """Writes `variables` (a pytree of arrays) as an orbax StandardCheckpointer directory."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, _plain(variables), force=force)
  checkpointer.wait_until_finished()


def load_variables(directory: str):
  """Reads a directory written by save_variables: nested dicts of arrays."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise ConversionError(f"pretrained checkpoint directory {directory!r} does not exist "
                          "(write one with scripts/convert_torch_checkpoint.py)")
  try:
    return ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax raises several types for a foreign or broken directory
    raise ConversionError(f"cannot read an orbax checkpoint from {directory!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_pretrained(directory: str, init_variables):
  """`init_variables` with every leaf present in the checkpoint at `directory` replaced.

  A backbone-only checkpoint fills the backbone, a full one everything; shapes must match.
  """
  return merge_variables(init_variables, load_variables(directory))
