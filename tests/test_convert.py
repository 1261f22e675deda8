"""PyTorch state dict -> Flax variables, orbax round trip, the conversion script, and its errors."""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
torch = pytest.importorskip("torch")
import torch_reference as tr  # noqa: E402
from test_data import _write_list, _write_pascal  # noqa: E402

from configs import cityscapes, pascal, synthetic  # noqa: E402
from dgcl_jax import config_base, convert, evaluation, models  # noqa: E402
from dgcl_jax.data import pipeline  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "convert_torch_checkpoint.py")
_REFERENCE_KEYS = os.path.join(os.path.dirname(__file__), "data", "reference_state_dict_keys.json")


def _script():
  spec = importlib.util.spec_from_file_location("convert_torch_checkpoint", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _zeros(m, fill=0.0):
  """Stand-in init variables (shapes from eval_shape; no init compile)."""
  return jax.tree_util.tree_map(lambda s: jnp.full(s.shape, fill, s.dtype), convert.variable_shapes(m))


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


@pytest.fixture(scope="module")
def small():
  m = synthetic.get_config().model
  torch.manual_seed(0)
  model = tr.randomize_(tr.TorchSegModel(m), 0)
  return m, model, tr.state_dict_numpy(model)


def test_full_model_values_and_layout(small):
  m, model, sd = small
  v = convert.from_torch({"module." + k: a for k, a in sd.items()}, m)
  p, s = v["params"], v["batch_stats"]
  np.testing.assert_array_equal(p["backbone"]["stem1"]["conv"]["kernel"],
                                sd["encoder.conv1.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["backbone"]["stem3"]["bn"]["scale"], sd["encoder.bn1.weight"])
  np.testing.assert_array_equal(s["backbone"]["layer4_0"]["downsample_bn"]["var"],
                                sd["encoder.layer4.0.downsample.1.running_var"])
  np.testing.assert_array_equal(p["decoder"]["aspp"]["pool"]["conv"]["kernel"][0, 0],
                                sd["decoder.aspp.conv1.1.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(s["decoder"]["aspp"]["atrous3"]["bn"]["mean"], sd["decoder.aspp.conv5.1.running_mean"])
  np.testing.assert_array_equal(p["decoder"]["cls_out"]["bias"], sd["decoder.final.bias"])
  np.testing.assert_array_equal(p["decoder"]["rep_fc2"]["kernel"], sd["decoder.representation.3.weight"].T)
  np.testing.assert_array_equal(s["decoder"]["rep_bn"]["var"], sd["decoder.representation.1.running_var"])
  shapes = convert.variable_shapes(m)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, shapes))


def test_backbone_only_keeps_decoder_init(small):
  m, model, sd = small
  backbone = {k[len("encoder."):]: a for k, a in sd.items() if k.startswith("encoder.")}
  backbone["fc.weight"] = np.zeros((1000, 512), np.float32)   # ImageNet classifier: ignored
  backbone["fc.bias"] = np.zeros((1000,), np.float32)
  init = _zeros(m, 7.0)
  v = convert.from_torch(backbone, m, init_variables=init)
  np.testing.assert_array_equal(v["params"]["backbone"]["layer2_0"]["conv2"]["kernel"],
                                sd["encoder.layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  assert all(np.all(np.asarray(x) == 7.0) for x in jax.tree_util.tree_leaves(v["params"]["decoder"]))
  assert all(np.all(np.asarray(x) == 7.0) for x in jax.tree_util.tree_leaves(v["batch_stats"]["decoder"]))


def test_resnet50_keys_into_resnet101_config():
  m = pascal.get_config().model
  r50 = tr.ResNet(depth=50)
  sd = {k: v.numpy() for k, v in r50.state_dict().items()}
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch(sd, m)
  msg = _one_line(e)
  assert "backbone-only" in msg and "missing 255 keys" in msg and "layer3.6.conv1.weight" in msg
  assert "(+250 more)" in msg and "ResNet depth 50" in msg and "unexpected" not in msg


def test_random_dict_and_mis_shaped():
  m = synthetic.get_config().model
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch({"foo": np.zeros(3, np.float32), "conv1.0.weight": np.zeros((2, 3, 3, 3))}, m)
  msg = _one_line(e)
  assert "unexpected 1 keys: foo" in msg and "missing" in msg
  assert "conv1.0.weight (2, 3, 3, 3) (expected (16, 3, 3, 3))" in msg


def test_num_classes_mismatch(small):
  _, model, sd = small
  m = synthetic.get_config().model
  m.num_classes = 21
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch(sd, m)
  msg = _one_line(e)
  assert "decoder.final.weight has 5 classes, config says 21" in msg


def test_aux_mismatch(small):
  _, model, sd = small
  m = synthetic.get_config().model
  m.aux = True
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch(sd, m)
  assert "missing 8 keys: auxor.aux.0.weight" in _one_line(e)


def test_orbax_round_trip_and_load_pretrained(small, tmp_path):
  m, model, sd = small
  v = convert.from_torch(sd, m)
  convert.save_variables(str(tmp_path / "full"), v)
  loaded = convert.load_pretrained(str(tmp_path / "full"), _zeros(m))
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(convert.ConversionError) as e:
    convert.load_pretrained(str(tmp_path / "nowhere"), _zeros(m))
  assert "does not exist" in _one_line(e)
  other = synthetic.get_config().model
  other.rep_dim = 32
  with pytest.raises(convert.ConversionError) as e:
    convert.load_pretrained(str(tmp_path / "full"), _zeros(other))
  msg = _one_line(e)
  assert "8 mis-shaped" in msg and "batch_stats/decoder/rep_bn/mean (64,) (expected (32,))" in msg


def test_script_full_and_backbone(small, tmp_path):
  m, model, sd = small
  script = _script()
  ckpt = {"model_state": {"module." + k: v for k, v in model.state_dict().items()},
          "teacher_state": {"module." + k: v * 0 for k, v in model.state_dict().items()}, "epoch": 3}
  torch.save(ckpt, tmp_path / "ckpt.pth")
  cfg = os.path.join(_ROOT, "configs", "synthetic.py")
  out = str(tmp_path / "full")
  assert script.main(["--input", str(tmp_path / "ckpt.pth"), "--output", out, "--config", cfg,
                      "--state", "model_state"]) == 0
  loaded = convert.load_pretrained(out, _zeros(m))
  np.testing.assert_array_equal(loaded["params"]["decoder"]["cls1"]["conv"]["kernel"],
                                sd["decoder.classifier.0.weight"].transpose(2, 3, 1, 0))
  out_t = str(tmp_path / "teacher")   # by default the teacher, as the reference's evaluation
  assert script.main(["--input", str(tmp_path / "ckpt.pth"), "--output", out_t, "--config", cfg]) == 0
  assert np.all(np.asarray(convert.load_pretrained(out_t, _zeros(m, 1.0))["params"]["decoder"]["cls_out"]["bias"]) == 0)
  # Backbone-only file: only the backbone is written and filled.
  torch.save(model.encoder.state_dict(), tmp_path / "resnet.pth")
  out_b = str(tmp_path / "backbone")
  assert script.main(["--input", str(tmp_path / "resnet.pth"), "--output", out_b, "--config", cfg]) == 0
  assert set(convert.load_variables(out_b)["params"]) == {"backbone"}
  loaded = convert.load_pretrained(out_b, _zeros(m, 3.0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["stem1"]["bn"]["var"],
                                sd["encoder.conv1.1.running_var"])
  assert np.all(np.asarray(loaded["params"]["decoder"]["head"]["conv"]["kernel"]) == 3.0)
  # A backbone of another depth cannot half-fill this one.
  with pytest.raises(convert.ConversionError) as e:
    convert.load_pretrained(out_b, _zeros(cityscapes.get_config().model))
  assert "mis-shaped" in _one_line(e)


def test_script_errors(tmp_path, capsys):
  script = _script()
  cfg = os.path.join(_ROOT, "configs", "synthetic.py")
  missing = str(tmp_path / "resnet101.pth")
  assert script.main(["--input", missing, "--output", str(tmp_path / "o"), "--config", cfg]) == 1
  err = capsys.readouterr().err.strip()
  assert err == f"error: input checkpoint {missing!r} not found"
  torch.save([1, 2, 3], tmp_path / "list.pth")
  assert script.main(["--input", str(tmp_path / "list.pth"), "--output", str(tmp_path / "o"), "--config", cfg]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "holds a list, not a state dict" in err
  torch.save({"epoch": 1, "best": 0.5}, tmp_path / "meta.pth")
  assert script.main(["--input", str(tmp_path / "meta.pth"), "--output", str(tmp_path / "o"), "--config", cfg]) == 1
  assert "not a state dict of tensors" in capsys.readouterr().err
  torch.save({"conv1.0.weight": torch.zeros(16, 3, 3, 3)}, tmp_path / "partial.pth")
  assert script.main(["--input", str(tmp_path / "partial.pth"), "--output", str(tmp_path / "o"), "--config", cfg]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error: cannot convert backbone-only state dict") and "missing" in err
  assert not os.path.exists(tmp_path / "o")


def test_old_classifier_8_name_is_reported(small):
  m, _, sd = small
  sd = dict(sd)
  sd["decoder.classifier.8.weight"] = sd.pop("decoder.final.weight")
  sd["decoder.classifier.8.bias"] = sd.pop("decoder.final.bias")
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torch(sd, m)
  msg = _one_line(e)
  assert "missing 2 keys: decoder.final.weight, decoder.final.bias" in msg
  assert "unexpected 2 keys: decoder.classifier.8.bias, decoder.classifier.8.weight" in msg


@functools.lru_cache(maxsize=None)
def _reference_keys():
  """{model name: {key: shape}} of the reference's own state dicts (tests/data/README.md)."""
  with open(_REFERENCE_KEYS) as f:
    return json.load(f)


_FULL_MODELS = [("pascal_full_model", pascal), ("cityscapes_full_model", cityscapes)]


@pytest.mark.parametrize("name,cfg", _FULL_MODELS)
def test_torch_test_model_has_the_reference_keys(name, cfg):
  with torch.device("meta"):   # full size, no memory
    model = tr.TorchSegModel(cfg.get_config().model)
  got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
  assert got == list(_reference_keys()[name].items())


@pytest.mark.parametrize("name,cfg", _FULL_MODELS)
def test_every_reference_key_converts_at_full_size(name, cfg):
  m = cfg.get_config().model
  zero = np.zeros((), np.float32)   # broadcast views: the 60M values are never allocated
  sd = {"module." + k: np.broadcast_to(zero, shape) for k, shape in _reference_keys()[name].items()}
  variables, full = convert.convert_state_dict(sd, m)   # raises on any unused key or unfilled variable
  assert full
  got = jax.tree_util.tree_map(np.shape, variables)
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), convert._plain(convert.variable_shapes(m)))
  assert got == want


def _tiny_pascal_tree(tmp_path, ids, val_crop):
  """A Pascal-layout tree (JPEGImages/, SegmentationClassAug/, lists) and a config file for it."""
  rng = np.random.default_rng(2)
  sizes = [(int(rng.integers(30, val_crop + 1)), int(rng.integers(30, val_crop + 1))) for _ in ids]
  _write_pascal(tmp_path / "voc", ids, sizes)
  lst = _write_list(tmp_path / "ids.txt", ids)
  small = synthetic.get_config().model
  small.base_width, small.decoder_channels, small.low_level_channels, small.rep_dim = 8, 16, 8, 16
  lines = ["from configs import pascal", "", "", "def get_config():", "  c = pascal.get_config('732')"]
  lines += [f"  c.model.{k} = {v!r}" for k, v in small.items()]
  lines += ["  c.model.dtype = 'float32'", "  c.model.pretrained = 'none'",
            f"  c.data.root = {str(tmp_path / 'voc')!r}", f"  c.data.val_crop_size = {val_crop}",
            f"  c.data.class_names = {tuple(f'c{i}' for i in range(small.num_classes))!r}"]
  lines += [f"  c.data.{k} = {lst!r}" for k in ("labeled_list", "unlabeled_list", "val_list")]
  lines += ["  c.data.num_workers = 0", f"  c.batch_size = {len(ids)}", "  c.num_slices = 1", "  return c", ""]
  (tmp_path / "tiny_pascal.py").write_text("\n".join(lines))
  return str(tmp_path / "tiny_pascal.py")


def _torch_miou(model, config):
  """The scoring of evaluate.py's centre protocol with the torch network on the pipeline's inputs."""
  k, vc = config.model.num_classes, config.data.val_crop_size
  conf = np.zeros((k, k), np.int64)
  for item in pipeline.create_val_iterator(config, mode="center", batch_size=1):
    if not item["valid"][0]:
      continue
    with torch.no_grad():
      logits = model(torch.from_numpy(np.asarray(item["image"])).permute(0, 3, 1, 2))["pred"]
      logits = torch.nn.functional.interpolate(logits, size=(vc, vc), mode="bilinear", align_corners=True)
    conf += np.asarray(evaluation.confusion_matrix(logits.argmax(1).numpy(), np.asarray(item["label"]), k))
  return evaluation.miou_from_confusion(conf)


@pytest.mark.slow
def test_reference_training_checkpoint_converts_and_evaluates(tmp_path):
  """A reference training checkpoint -> convert_torch_checkpoint.py --state -> evaluate.py --variables."""
  ids = [f"2007_{i:06d}" for i in range(4)]
  cfg_file = _tiny_pascal_tree(tmp_path, ids, val_crop=56)
  config = config_base.load_config_file(cfg_file)
  m = config.model
  nets = {}
  for seed, state in enumerate(("model_state", "teacher_state")):
    torch.manual_seed(seed)
    nets[state] = tr.randomize_(tr.TorchSegModel(m), seed).eval()
  student = nets["model_state"]
  momentum = {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(student.parameters())}
  torch.save({"epoch": 79, "best_miou": 0.5,
              "model_state": {"module." + k: v for k, v in student.state_dict().items()},
              "teacher_state": {"module." + k: v for k, v in nets["teacher_state"].state_dict().items()},
              "optimizer_state": {"state": momentum, "param_groups": [
                  {"lr": 1e-3, "momentum": 0.9, "params": list(momentum)}]}}, tmp_path / "ckpt_best.pth")
  module = models.build(m)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  x = torch.randn(2, 3, 41, 41)
  for state, net in nets.items():
    out = str(tmp_path / state)
    assert _script().main(["--input", str(tmp_path / "ckpt_best.pth"), "--output", out, "--config", cfg_file,
                           "--state", state]) == 0
    with torch.no_grad():
      ref = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in net(x).items()}
    got = apply(convert.load_variables(out), x.numpy().transpose(0, 2, 3, 1))
    assert set(got) == set(ref)
    for k in ref:   # as tests/test_models.py's parity tests
      err = np.abs(np.asarray(got[k]) - ref[k]).max()
      assert err <= 1e-4 * np.abs(ref[k]).max(), (state, k, err)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = tmp_path / "eval.json"
  proc = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "evaluate.py"), f"--config={cfg_file}",
                         f"--variables={tmp_path / 'teacher_state'}", f"--output_json={result}"],
                        env=env, capture_output=True, text=True, timeout=600, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(result) as f:
    scored = json.load(f)
  miou, iou = _torch_miou(nets["teacher_state"], config)
  assert 0 < miou < 1
  np.testing.assert_allclose(list(scored["per_class_iou"].values()), iou, atol=1e-9)
  np.testing.assert_allclose(scored["miou"], miou, atol=1e-9)
