"""PyTorch state dict -> Flax variables, orbax round trip, the conversion script, and its errors."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
torch = pytest.importorskip("torch")
import torch_reference as tr  # noqa: E402

from configs import cityscapes, pascal, synthetic  # noqa: E402
from dgcl_jax import convert  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "convert_torch_checkpoint.py")


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
  np.testing.assert_array_equal(p["decoder"]["cls_out"]["bias"], sd["decoder.classifier.8.bias"])
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
  assert "decoder.classifier.8.weight has 5 classes, config says 21" in msg


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
  assert script.main(["--input", str(tmp_path / "ckpt.pth"), "--output", out, "--config", cfg]) == 0
  loaded = convert.load_pretrained(out, _zeros(m))
  np.testing.assert_array_equal(loaded["params"]["decoder"]["cls1"]["conv"]["kernel"],
                                sd["decoder.classifier.0.weight"].transpose(2, 3, 1, 0))
  out_t = str(tmp_path / "teacher")
  assert script.main(["--input", str(tmp_path / "ckpt.pth"), "--output", out_t, "--config", cfg,
                      "--state", "teacher_state"]) == 0
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
