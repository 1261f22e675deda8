"""scripts/convert_torch_checkpoint.py reads a .pth with torch.load(weights_only=True): a pickled payload
is refused (never run) unless --trust_pickle; the reference's checkpoints and resnet101.pth need no flag."""
import collections
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
torch = pytest.importorskip("torch")
import torch_reference as tr  # noqa: E402

from configs import synthetic  # noqa: E402
from dgcl_jax import convert  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "convert_torch_checkpoint.py")
_CFG = os.path.join(_ROOT, "configs", "synthetic.py")
_TORCH_2_6 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
needs_torch_2_6 = pytest.mark.skipif(not _TORCH_2_6, reason="numpy scalars need (callable, name) safe globals")


def _script():
  spec = importlib.util.spec_from_file_location("convert_torch_checkpoint", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Payload:
  """Unpickling this calls open(marker, 'w'), creating the file: stands for any code a crafted .pth runs."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


class _Reduce:
  """Pickles as the given __reduce__ value (to write pickles numpy itself would not)."""

  def __init__(self, *value):
    self.value = value

  def __reduce__(self):
    return self.value


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(0)
  return tr.randomize_(tr.TorchSegModel(synthetic.get_config().model), 0)


def _reference_ckpt(model, best_miou=0.5, **extra):
  """A checkpoint as the reference's training writes it, with a real torch.optim.SGD state dict."""
  params = [p.detach().clone().requires_grad_() for p in model.parameters()]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
  for p in params:
    p.grad = torch.ones_like(p)
  opt.step()   # momentum buffers in its state
  student = {"module." + k: v for k, v in model.state_dict().items()}
  teacher = collections.OrderedDict(("module." + k, v * 2) for k, v in model.state_dict().items())
  return {"epoch": 3, "model_state": student, "teacher_state": teacher, "optimizer_state": opt.state_dict(),
          "best_miou": best_miou, **extra}


def _run(env, *args):
  return subprocess.run([sys.executable, _SCRIPT, *map(str, args), "--config", _CFG], env=env,
                        capture_output=True, text=True, timeout=600, cwd=_ROOT)


def _assert_refused(err, path, what):
  assert "\n" not in err
  assert err.startswith(f"error: {str(path)!r} holds objects that weights_only loading refuses (")
  assert what in err and "pass --trust_pickle to load it as a full pickle, only for files you trust" in err


def test_payload_is_refused_then_runs_only_with_trust_pickle(model, tmp_path, env):
  marker, ckpt = tmp_path / "payload_ran", tmp_path / "ckpt.pth"
  torch.save(_reference_ckpt(model, args=_Payload(marker)), ckpt)
  proc = _run(env, "--input", ckpt, "--output", tmp_path / "out")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert not marker.exists()   # the payload did not run
  assert not (tmp_path / "out").exists()
  lines = proc.stderr.strip().splitlines()
  _assert_refused(lines[-1], ckpt, "io.open")
  assert not any("Traceback" in l or "warning: --trust_pickle" in l for l in lines)

  # Opted in: the file is a full pickle, the payload runs, and the model in it converts.
  proc = _run(env, "--input", ckpt, "--output", tmp_path / "out", "--trust_pickle")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert marker.exists()
  assert any(l.startswith(f"warning: --trust_pickle: loading {str(ckpt)!r} as a full pickle")
             for l in proc.stderr.splitlines())
  assert "wrote full model from teacher_state" in proc.stdout
  bias = convert.load_variables(str(tmp_path / "out"))["params"]["decoder"]["cls_out"]["bias"]
  np.testing.assert_array_equal(np.asarray(bias), 2 * model.state_dict()["decoder.final.bias"].numpy())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_payload_in_a_state_dict_is_refused(tmp_path, capsys, legacy):
  marker, path = tmp_path / "payload_ran", tmp_path / "resnet101.pth"
  torch.save({"conv1.0.weight": torch.zeros(2), "x": _Payload(marker)}, path,
             _use_new_zipfile_serialization=not legacy)
  assert _script().main(["--input", str(path), "--output", str(tmp_path / "o"), "--config", _CFG]) == 1
  _assert_refused(capsys.readouterr().err.strip(), path, "io.open")
  assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_resnet101_style_state_dict_converts_without_the_flag(model, tmp_path, capsys, legacy):
  sd = model.encoder.state_dict()   # an OrderedDict with _metadata, as torchvision's files
  width = sd["layer4.0.conv3.weight"].shape[0]
  sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, width), torch.zeros(1000)   # the ImageNet classifier
  path = tmp_path / "resnet101.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)   # torchvision's resnet101 is legacy
  out = str(tmp_path / "backbone")
  assert _script().main(["--input", str(path), "--output", out, "--config", _CFG]) == 0
  captured = capsys.readouterr()
  assert captured.err == "" and "wrote backbone" in captured.out
  v = convert.load_variables(out)
  assert set(v["params"]) == {"backbone"}
  np.testing.assert_array_equal(np.asarray(v["batch_stats"]["backbone"]["stem1"]["bn"]["var"]),
                                sd["conv1.1.running_var"].numpy())


_BEST_MIOU = [pytest.param(0.5, id="float"),
              pytest.param(np.float64(0.5), id="numpy.float64", marks=needs_torch_2_6),
              pytest.param(np.float32(0.5), id="numpy.float32", marks=needs_torch_2_6)]


@pytest.mark.parametrize("best_miou", _BEST_MIOU)
def test_reference_training_checkpoint_converts_without_the_flag(model, tmp_path, capsys, best_miou):
  path = tmp_path / "ckpt.pth"
  extra = {"miou_history": [np.float64(0.25), np.int64(3), np.bool_(True)]} if _TORCH_2_6 else {}
  torch.save(_reference_ckpt(model, best_miou, **extra), path)
  script = _script()
  assert script.main(["--input", str(path), "--output", str(tmp_path / "t"), "--config", _CFG]) == 0
  captured = capsys.readouterr()
  assert captured.err == "" and "wrote full model from teacher_state" in captured.out
  left = [g for g in torch.serialization.get_safe_globals() if "numpy" in repr(g).lower()]
  assert not left   # the allow-list does not outlive the load
  loaded = script.load_checkpoint(str(path))
  assert loaded["best_miou"] == best_miou and type(loaded["best_miou"]) is type(best_miou)
  assert loaded["optimizer_state"]["param_groups"][0]["momentum"] == 0.9
  assert script.main(["--input", str(path), "--output", str(tmp_path / "s"), "--config", _CFG,
                      "--state", "model_state"]) == 0
  kernel = convert.load_variables(str(tmp_path / "s"))["params"]["decoder"]["cls_out"]["kernel"]
  np.testing.assert_array_equal(np.asarray(kernel)[0, 0], model.state_dict()["decoder.final.weight"].numpy()[:, :, 0, 0].T)


@needs_torch_2_6
def test_numpy_1_scalar_name_and_big_endian(tmp_path):
  """numpy 1.x pickles name numpy.core.multiarray.scalar (numpy 2.x: numpy._core...)."""
  scalar = np.float64(0.5).__reduce__()[0]
  path = tmp_path / "old.pth"
  torch.save({"best_miou": np.float64(0.5), "be": _Reduce(scalar, (np.dtype(">f8"), np.array([0.75], ">f8").tobytes()))},
             path, _use_new_zipfile_serialization=False)   # a plain pickle stream: names can be edited
  data = path.read_bytes()
  new = f"{scalar.__module__}\nscalar".encode()
  assert new in data
  path.write_bytes(data.replace(new, b"numpy.core.multiarray\nscalar"))
  assert b"numpy._core" not in path.read_bytes()
  loaded = _script().load_checkpoint(str(path))
  assert loaded == {"best_miou": 0.5, "be": 0.75} and type(loaded["best_miou"]) is np.float64


@needs_torch_2_6
@pytest.mark.parametrize("crafted,what", [
    # a long double whose dtype flags say NPY_USE_GETITEM: numpy's own scalar() crashes on it
    ((np.dtype, ("f16", False, True), (3, "<", None, None, None, -1, -1, -96)), "is not that of a plain"),
    ((np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)), "is not that of a plain"),
    ((np.dtype, ("O8", False, True)), "numpy.dtype('O8', False, True) is not a plain number type"),
    ((np.dtype, ("S8", False, True)), "is not a plain number type"),
], ids=["longdouble_flags", "float64_object_flags", "object_dtype", "bytes_dtype"])
def test_crafted_numpy_dtypes_are_refused(tmp_path, capsys, crafted, what):
  path = tmp_path / "crafted.pth"
  torch.save({"conv1.0.weight": torch.zeros(2), "best_miou": _Reduce(*crafted)}, path)
  assert _script().main(["--input", str(path), "--output", str(tmp_path / "o"), "--config", _CFG]) == 1
  _assert_refused(capsys.readouterr().err.strip(), path, what)


def test_numpy_arrays_and_other_objects_are_refused(tmp_path, capsys):
  import argparse
  path = tmp_path / "ckpt.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1), "a": np.zeros(2)}, path)
  assert _script().main(["--input", str(path), "--output", str(tmp_path / "o"), "--config", _CFG]) == 1
  _assert_refused(capsys.readouterr().err.strip(), path, "argparse.Namespace")


def test_help_documents_the_flag(capsys):
  with pytest.raises(SystemExit) as e:
    _script().main(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--trust_pickle" in text and "only for files you trust" in text
