"""DGCL on the DINOv2 ViT + DPT (model.arch='dpt'): config fields and their validation, the recipes, the
memory bank's dims, the converter's dispatch and scripts/convert_torch_checkpoint.py on DINOv2 and
UniMatch V2 files, and the whole-image prediction rule. The network itself: tests/test_vit.py;
training end to end: tests/test_e2e_dpt.py."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dgcl_jax import config_base, convert, convert_vit, evaluation, models, ops
from dgcl_jax import state as state_lib
from tests.tiny import load_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_dpt(method="dgcl"):
  return load_config("synthetic", f"dpt,{method}")


# ----------------------------------------------------------------------------- configs


def test_dinov2_recipes_validate_with_unimatch_v2_values():
  for size in ("small", "base", "large"):
    c = load_config("pascal", f"732,dinov2_{size}")
    config_base.validate(c)
    assert (c.model.arch, c.model.vit, c.model.pretrained) == ("dpt", size, f"pretrained/dinov2_{size}")
    assert (c.data.crop_size, c.data.val_crop_size, c.batch_size, c.num_slices, c.num_epochs) == (518, 518, 16, 4, 60)
    o = c.optim
    assert (o.name, o.base_lr, o.decoder_lr_mult, o.weight_decay, tuple(o.betas), o.poly_power) == \
        ("adamw", 5e-6, 40.0, 0.01, (0.9, 0.999), 0.9)
    assert not c.model.aux and not c.loss.ohem and c.model.remat
    # DGCL's own settings are unchanged.
    plain = load_config("pascal", "732")
    assert c.ema.to_dict() == plain.ema.to_dict() and c.dgcl.to_dict() == plain.dgcl.to_dict()
    assert c.data.labeled_list == plain.data.labeled_list and c.sup_only_epochs == plain.sup_only_epochs
  for arg, lists in (("372,dinov2_small", "cityscapes"), ("372,u2pl,dinov2_base", "cityscapes-u2pl")):
    c = load_config("cityscapes", arg)
    config_base.validate(c)
    assert c.model.arch == "dpt" and c.data.labeled_list.endswith(os.path.join(lists, "372", "labeled.txt"))
    assert (c.data.crop_size, c.data.val_crop_size, c.batch_size, c.num_slices, c.num_epochs) == (798, 798, 8, 4, 180)
    assert c.loss.ohem and c.loss.ohem_min_kept == 200000 and not c.model.aux
    assert (c.evaluation.mode, c.optim.name, c.optim.decoder_lr_mult) == ("sliding", "adamw", 40.0)
  for name, arg in (("pascal", "732,dinov2_huge"), ("cityscapes", "372,resnet")):
    with pytest.raises(ValueError, match="unknown variant"):
      load_config(name, arg)
  c = _synthetic_dpt("self_training")
  config_base.validate(c)
  assert (c.method, c.model.arch, c.model.vit, c.data.crop_size % 14) == ("self_training", "dpt", "tiny", 0)
  # The default network is still DeepLabV3+ with SGD.
  c = load_config("pascal", "732")
  assert (c.model.arch, c.optim.name) == ("deeplabv3plus", "sgd")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.model.update({"arch": "unet"}), "config.model.arch='unet': expected one of"),
    (lambda c: c.model.update({"vit": "huge"}), "config.model.vit='huge': expected one of"),
    (lambda c: c.data.update({"crop_size": 64}),
     "config.data.crop_size=64: model.arch='dpt' needs a multiple of the ViT's 14-pixel patch (e.g. 56 or 70)"),
    (lambda c: c.data.update({"val_crop_size": 513}), "config.data.val_crop_size=513: model.arch='dpt' needs"),
    (lambda c: c.model.update({"aux": True}), "config.model.aux=True: the auxiliary head"),
    (lambda c: c.model.update({"dpt_out_channels": (8, 16)}), "config.model.dpt_out_channels=(8, 16): expected 4"),
    (lambda c: c.model.update({"dpt_out_channels": ("a",)}), "config.model.dpt_out_channels=('a',)"),
    (lambda c: c.model.update({"dpt_features": -1}), "config.model.dpt_features=-1"),
    (lambda c: c.optim.update({"name": "adam"}), "config.optim.name='adam': expected one of"),
    (lambda c: c.optim.update({"betas": (0.9, 1.0)}), "config.optim.betas=(0.9, 1.0): each must lie in [0, 1)"),
    (lambda c: c.optim.update({"eps": 0.0}), "config.optim.eps=0.0: must be positive"),
])
def test_bad_dpt_values_are_one_line_naming_the_field(mutate, message):
  config = _synthetic_dpt()
  mutate(config)
  with pytest.raises(config_base.ConfigError) as excinfo:
    config_base.validate(config)
  assert "\n" not in str(excinfo.value)
  assert message in str(excinfo.value)


def test_deeplab_configs_ignore_the_patch_rule():
  config = load_config("synthetic", "dgcl")
  config.data.crop_size = 64   # not a multiple of 14: fine for the ResNet
  config_base.validate(config)


# ----------------------------------------------------------------------------- memory bank


@pytest.mark.parametrize("size,features,override", [("tiny", 16, 0), ("small", 64, 0), ("base", 128, 0),
                                                    ("tiny", 24, 24)])
def test_memory_bank_dims_follow_the_dpt_outputs(size, features, override):
  config = _synthetic_dpt()
  config.model.vit, config.model.dpt_features = size, override
  config.dgcl.bank_capacity = 8
  bank = state_lib.empty_memory_bank(config)
  # What the network gives, traced (no compile): fts is the DPT's `features` wide, rep rep_dim.
  module = models.build(config.model)
  out = jax.eval_shape(lambda: module.apply(models.init_variables(module, jax.random.PRNGKey(0)),
                                            jnp.zeros((1, 28, 28, 3)), train=False))
  assert out["fts"].shape[-1] == features and out["rep"].shape[-1] == config.model.rep_dim
  assert bank.fts.shape[-1] == features and bank.rep.shape[-1] == config.model.rep_dim
  assert models.feature_dims(config.model) == (features, config.model.rep_dim)
  deeplab = load_config("synthetic", "dgcl")
  assert models.feature_dims(deeplab.model) == (deeplab.model.decoder_channels, deeplab.model.rep_dim)


# ----------------------------------------------------------------------------- conversion


def _torch_state_dict(model_config, release: bool, fill=None):
  """A state dict with the torch names and shapes of `model_config`'s DPT (convert_vit.torch_name's mapping,
  checked against UniMatch V2's own key list in tests/test_vit.py): the backbone alone as a DINOv2 release
  names it (plus its mask_token), or 'backbone.' + 'head.' as UniMatch V2 does. Values: distinct per key."""
  shapes = traverse_util.flatten_dict(convert.variable_shapes(model_config)["params"])
  rng = np.random.default_rng(0)
  sd = {}
  for path, s in shapes.items():
    name = convert_vit.torch_name(path)
    if name is None or (release and path[0] != "backbone"):
      continue
    key, transform = name
    sd[key[len("backbone."):] if release else key] = rng.normal(size=convert_vit._torch_shape(s.shape, transform)).astype(
        np.float32)
  dim = shapes[("backbone", "pos_embed")].shape[-1]
  sd["mask_token" if release else "backbone.mask_token"] = np.zeros((1, dim), np.float32)
  return sd


def test_convert_dispatches_release_and_unimatch_files_for_dpt():
  m = _synthetic_dpt().model
  release = _torch_state_dict(m, release=True)
  variables, full = convert.convert_state_dict(release, m)
  assert not full and set(variables) == {"params"} and set(variables["params"]) == {"backbone"}
  np.testing.assert_array_equal(variables["params"]["backbone"]["blocks_2"]["mlp"]["fc1"]["kernel"],
                                release["blocks.2.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(variables["params"]["backbone"]["patch_embed"]["kernel"],
                                release["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  # from_torch fills the backbone into a given init and keeps the head.
  init = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 3.0, s.dtype), convert.variable_shapes(m))
  merged = convert.from_torch(release, m, init_variables=init)
  np.testing.assert_array_equal(merged["params"]["backbone"]["pos_embed"], release["pos_embed"])
  assert np.all(np.asarray(merged["params"]["head"]["output_conv_2"]["kernel"]) == 3.0)
  # A UniMatch V2 model (behind 'module.') converts whole; DGCL's rep head comes from the init.
  unimatch = {"module." + k: v for k, v in _torch_state_dict(m, release=False).items()}
  full_vars, full = convert.convert_state_dict(unimatch, m)
  assert full and set(full_vars) == {"params", "batch_stats"}
  np.testing.assert_array_equal(full_vars["params"]["head"]["output_conv_2"]["bias"],
                                unimatch["module.head.scratch.output_conv.2.bias"])
  assert set(full_vars["params"]["head"]) >= {"rep_fc1", "rep_bn", "rep_fc2"}
  # A ResNet file given to a DPT config: one line naming what is missing.
  with pytest.raises(convert.ConversionError) as excinfo:
    convert.convert_state_dict({"conv1.0.weight": np.zeros((16, 3, 3, 3), np.float32)}, m)
  assert "\n" not in str(excinfo.value) and "missing" in str(excinfo.value) and "conv1.0.weight" in str(excinfo.value)


def _script():
  spec = importlib.util.spec_from_file_location("convert_torch_checkpoint",
                                                os.path.join(_ROOT, "scripts", "convert_torch_checkpoint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_script_reads_the_vit_size_and_classes_from_the_file():
  script = _script()
  stub = lambda width, classes=None: dict(
      {"pos_embed": np.zeros((1, 1370, width)), "blocks.0.norm1.weight": np.zeros((width,))},
      **({} if classes is None else {"head.scratch.output_conv.2.weight": np.zeros((classes, 64, 1, 1))}))
  assert script.vit_description(stub(384)) == (384, "small", None)
  assert script.vit_description(stub(768)) == (768, "base", None)
  unimatch = {"module.backbone." + k if not k.startswith("head.") else "module." + k: v
              for k, v in stub(1024, 19).items()}
  assert script.vit_description(unimatch) == (1024, "large", 19)
  assert script.vit_description({"conv1.0.weight": np.zeros((64, 3, 3, 3))}) is None
  m = script.model_config_for(stub(768), None)
  assert (m.arch, m.vit, m.num_classes) == ("dpt", "base", 21)
  assert script.model_config_for({"conv1.0.weight": np.zeros((64, 3, 3, 3))}, None).arch == "deeplabv3plus"
  with pytest.raises(script._Fail, match=r"the file holds a DINOv2 ViT \(small\) but --config=.*pascal.py builds "
                                         r"model.arch='deeplabv3plus': give a DPT config \(e.g. configs/pascal.py:732,"
                                         r"dinov2_small\)"):
    script.model_config_for(stub(384), os.path.join(_ROOT, "configs", "pascal.py"))
  with pytest.raises(script._Fail, match="the DINOv2 ViT in the file is 48 wide, not one of 384 .small."):
    script.model_config_for(stub(48), None)


def test_script_converts_release_and_unimatch_checkpoints(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  script = _script()
  config_file = tmp_path / "synthetic_dpt.py"
  config_file.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('s', "
                         f"{os.path.join(_ROOT, 'configs', 'synthetic.py')!r})\nmod = importlib.util.module_from_spec(spec)\n"
                         "spec.loader.exec_module(mod)\n\n\ndef get_config():\n  return mod.get_config('dpt')\n")
  m = _synthetic_dpt().model
  release = _torch_state_dict(m, release=True)
  torch.save({k: torch.from_numpy(v) for k, v in release.items()}, tmp_path / "dinov2.pth")
  out = str(tmp_path / "backbone")
  assert script.main(["--input", str(tmp_path / "dinov2.pth"), "--output", out, "--config", str(config_file)]) == 0
  assert "wrote backbone" in capsys.readouterr().out
  init = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 2.0, s.dtype), convert.variable_shapes(m))
  loaded = convert.load_pretrained(out, init)   # what config.model.pretrained does at a run's start
  np.testing.assert_array_equal(loaded["params"]["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"],
                                release["blocks.3.attn.qkv.weight"].T)
  np.testing.assert_array_equal(loaded["params"]["backbone"]["cls_token"], release["cls_token"])
  assert np.all(np.asarray(loaded["params"]["head"]["layer1_rn"]["kernel"]) == 2.0)
  # UniMatch V2's training checkpoint: model_ema (its teacher) by default, --state model for the student.
  student = {"module." + k: torch.from_numpy(v) for k, v in _torch_state_dict(m, release=False).items()}
  ckpt = {"model": student, "model_ema": {k: v + 1.0 for k, v in student.items()}, "epoch": 3,
          "previous_best": 50.0}
  torch.save(ckpt, tmp_path / "latest.pth")
  for state, offset in ((None, 1.0), ("model", 0.0)):
    out = str(tmp_path / f"full_{state}")
    args = ["--input", str(tmp_path / "latest.pth"), "--output", out, "--config", str(config_file)]
    assert script.main(args + ([] if state is None else ["--state", state])) == 0
    assert f"wrote full model from {state or 'model_ema'}" in capsys.readouterr().out
    variables = convert.load_variables(out)
    np.testing.assert_allclose(variables["params"]["head"]["refinenet1"]["out_conv"]["bias"],
                               student["module.head.scratch.refinenet1.out_conv.bias"].numpy() + offset)
  # A wrong size is one line naming the mismatch.
  torch.save({k: torch.zeros(v.shape[:-1] + (v.shape[-1] * 2,)) if k == "norm.weight" else torch.from_numpy(v)
              for k, v in release.items()}, tmp_path / "bad.pth")
  assert script.main(["--input", str(tmp_path / "bad.pth"), "--output", str(tmp_path / "bad"),
                      "--config", str(config_file)]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "norm.weight has shape (96,), the model expects (48,)" in err
  assert not os.path.exists(tmp_path / "bad")


# ----------------------------------------------------------------------------- whole-image prediction


def test_center_prediction_resizes_to_whole_patches_as_unimatch_v2():
  m = _synthetic_dpt().model
  module = models.build(m)
  variables = models.init_variables(module, jax.random.PRNGKey(0))
  assert models.input_multiple(module) == 14 and models.input_multiple(models.build(load_config("synthetic").model)) == 1
  image = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 40, 30, 3)))
  got = evaluation.Predictor(module, variables, m.num_classes, 56).center(image)
  # UniMatch V2's rule: int(side / 14 + 0.5) * 14, i.e. 40 -> 42 and 30 -> 28, bilinear align_corners both ways.
  resized = ops.resize_bilinear_align_corners(jnp.asarray(image), (42, 28))
  want = ops.resize_bilinear_align_corners(jax.jit(module.apply)(variables, resized)["pred"], (40, 30))
  assert got.shape == (1, 40, 30, m.num_classes)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="multiples of 14"):   # what center() spares the caller
    jax.eval_shape(module.apply, variables, jnp.asarray(image))
