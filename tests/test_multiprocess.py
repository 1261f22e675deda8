"""2 processes x 2 CPU devices (gloo collectives) match 1 process x 4 devices step for step; a 2-process
`dgcl_jax.main` run checkpoints every step, evaluates, and resumes."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  return env


def _result(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_two_processes_match_one_process():
  worker = os.path.join(_HERE, "multiprocess_worker.py")
  port = _free_port()
  single = subprocess.Popen([sys.executable, worker, "0", "1", "0"], env=_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  single_out, single_err = single.communicate(timeout=600)
  assert single.returncode == 0, single_err[-5000:]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-5000:]
  one = _result(single_out)
  assert one["devices"] == 4
  for out, _ in outs:
    two = _result(out)
    assert two["devices"] == 4
    # Step 0 sees the same parameters: only the order of the cross-device sums differs (gloo
    # between processes, in-process otherwise), so the losses agree to float rounding. The
    # gradients can differ by more than rounding (measured in this case with CutMix's coin off:
    # grad_norm 6e-5 apart at step 0, `sup` 4e-5 apart by step 2, also for self_training; the
    # first parameters to differ are those below the decoder's first dropout; no difference
    # with dropout off or with CutMix on): a data-dependent discontinuity, such as a ReLU or a
    # tie at zero, turns a rounding-level difference into different gradient entries. Both runs
    # are deterministic. Later steps are compared at 1e-3: far below what a wrong row split, an
    # unsynchronised bank or a per-process RNG would give.
    for step, (a, b) in enumerate(zip(one["history"], two["history"])):
      rtol = 1e-5 if step == 0 else 1e-3
      for key in ("sup", "unsup", "contrastive", "total"):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-6, err_msg=f"{key} at step {step}")
    np.testing.assert_array_equal(two["counts"], one["counts"])
    np.testing.assert_allclose(two["fts_sum"], one["fts_sum"], rtol=1e-3)
  # Both processes hold the same bank.
  first, second = (_result(out) for out, _ in outs)
  assert first["counts"] == second["counts"] and first["fts_sum"] == second["fts_sum"]


def _start_two(cmd, env, workdir, name):
  """Both processes of one run of `cmd` (argv without the distributed flags), output in files."""
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(workdir.parent / f"{name}.{i}.log", "w+")
    procs.append((subprocess.Popen([*cmd, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}", "--cpu_collectives=gloo"], env=env, cwd=_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, text=True), log))
  return procs


def _output(log):
  log.seek(0)
  return log.read()


def _watch(procs, done, timeout=300):
  """Waits for done(); fails at once where a process stopped with an error or printed its `error:`
  line (it may then wait for the others at jax's shutdown barrier)."""
  deadline = time.time() + timeout
  while not done():
    for i, (proc, log) in enumerate(procs):
      out = _output(log)
      stopped = proc.poll() is not None and proc.returncode != 0
      assert not stopped and not re.search(r"^error: ", out, re.M), f"process {i}:\n{out[-3000:]}"
    assert time.time() < deadline, f"not done after {timeout} s"
    time.sleep(0.1)


def _stop(procs):
  for proc, log in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    log.close()


@pytest.mark.slow
def test_two_process_training_saves_latest_and_best_of_one_step_then_resumes(tmp_path, env):
  """`dgcl_jax.main` on 2 processes (1 CPU device each, gloo), a checkpoint every step: each
  evaluation that improves writes the latest and the best checkpoint of its step at once. Orbax
  named both saves' barriers after the step folder alone, so the second save's barrier collided
  with the first's while one process had not reached it yet ("already ongoing" on the other, then
  orbax's barrier timeout). tests/fault_main.py slow_commit holds process 0's commits of step 2
  3 s before their barriers, as a busier primary host does, so that the collision happens every
  time instead of now and then. The run is killed after step 3's checkpoint and resumed."""
  from tests.test_e2e import TINY  # pylint: disable=g-import-not-at-top
  env = dict(env, XLA_FLAGS=env["XLA_FLAGS"].replace("device_count=2", "device_count=1"))
  workdir = tmp_path / "two"
  flags = [f"--config={_ROOT}/configs/synthetic.py:supervised", f"--workdir={workdir}", *TINY,
           "--config.num_epochs=3", "--config.steps_per_epoch=2", "--config.checkpoint_every_steps=1"]
  # Evaluations at steps 2, 4 and 6; the first one is always a new best.
  procs = _start_two([sys.executable, "tests/fault_main.py", "slow_commit", "2", *flags], env, workdir, "first")
  try:
    _watch(procs, lambda: all((workdir / "checkpoints" / d).is_dir() for d in ("3", "best/2")))
    assert all(proc.poll() is None for proc, _ in procs), "the run finished before it could be killed"
  finally:
    _stop(procs)

  procs = _start_two([sys.executable, "-m", "dgcl_jax.main", *flags], env, workdir, "resumed")
  try:
    _watch(procs, lambda: all(proc.poll() == 0 for proc, _ in procs))
    outs = [_output(log) for _, log in procs]
  finally:
    _stop(procs)
  for out in outs:
    resumed = re.search(r"Resumed from step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 3, out[-3000:]
    assert "step 6/6" in out and "final: student mIoU" in out
  meta = json.load(open(workdir / "checkpoints" / "6" / "meta" / "metadata"))
  assert [r["step"] for r in meta["history"]] == [2, 4, 6] and meta["final"]["step"] == 6
  assert meta["best_step"] in [int(n) for n in os.listdir(workdir / "checkpoints" / "best") if n.isdigit()]
