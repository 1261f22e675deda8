"""scripts/benchmark_step.py --compile-only: XLA's memory analysis and the buffers live at the peak."""
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "scripts"))
import benchmark_step  # noqa: E402

_LIVE_RANGE = """HloLiveRange (max 10):
  InstructionSequence:
    0:p0
  BufferLiveRange:
    p0{}:0-10
  Live ranges at 7 (peak):
    copy.3{}: 512 bytes (cumulative: 512 bytes)
    fusion.2{}: 4096 bytes (cumulative: 4608 bytes)
    p0{}: 64 bytes (cumulative: 4672 bytes)

  Stack trace breakdown for peak usage: 4672 bytes
"""

_HLO = """HloModule jit__train_step

%fused_computation.1 (param_0: f32[4,4]) -> f32[4,4] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,4]{1,0} tanh(%param_0), metadata={op_name="jit(_train_step)/jvp(DeepLabV3Plus)/backbone/layer3_5/bn2/tanh"}
}

ENTRY %main (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0), metadata={op_name="state.params"}
  %fusion.2 = f32[32,32]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.1
  ROOT %copy.3 = f32[8,16]{1,0} copy(%fusion.2)
}
"""


def test_report_names_the_largest_peak_buffers_and_their_producers(tmp_path):
  (tmp_path / "module_0001.jit__train_step.cpu_after_optimizations-live-range.txt").write_text(_LIVE_RANGE)
  (tmp_path / "module_0001.jit__train_step.cpu_after_optimizations.txt").write_text(_HLO)
  assert benchmark_step.peak_live_values(_LIVE_RANGE) == [("fusion.2", 4096), ("copy.3", 512), ("p0", 64)]
  lines = benchmark_step.report_peak_buffers(str(tmp_path), top=2)
  assert "3 buffers" in lines[0]
  # The fusion takes its fused computation's op name; the copy is named after what it copies.
  assert "fusion.2" in lines[1] and "f32[32,32]" in lines[1] and "backbone/layer3_5/bn2/tanh" in lines[1]
  assert "copy.3" in lines[2] and "<copy> of" in lines[2] and "layer3_5" in lines[2]
  assert len([l for l in lines if "fusion.2" in l or "copy.3" in l or " p0 " in l]) == 2   # top=2
  by_producer = lines[lines.index("live at the peak by producer:") + 1:]
  assert "student backbone/layer3 (forward)" in by_producer[0] and "state and inputs" in by_producer[1]


def test_report_without_a_dump_says_so(tmp_path):
  assert "unavailable" in benchmark_step.report_peak_buffers(str(tmp_path))[0]


@pytest.mark.slow
def test_compile_only_prints_memory_analysis_and_peak_buffers():
  sets = ["method=supervised", "batch_size=4", "num_slices=2", "data.crop_size=32", "model.base_width=8",
          "model.decoder_channels=16", "model.low_level_channels=8", "model.rep_dim=16", "model.remat=True"]
  cmd = [sys.executable, os.path.join(_ROOT, "scripts", "benchmark.py"), "step", "--config=configs/synthetic.py",
         "--compile-only", "--top=3"] + [f"--set={s}" for s in sets]
  out = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
  assert "remat=True" in out
  assert "memory analysis: temp " in out and "argument " in out and "alias " in out
  listed = out.split("the 3 largest:")[1].split("live at the peak by producer:")[0].strip().splitlines()
  assert len(listed) == 3 and all(" MiB " in line for line in listed)


@pytest.mark.slow
def test_timed_step_reports_and_a_repeat_loads_from_the_compilation_cache(tmp_path):
  sets = ["method=supervised", "batch_size=2", "num_slices=1", "data.crop_size=32", "model.base_width=8",
          "model.decoder_channels=16", "model.low_level_channels=8", "model.rep_dim=16",
          f"compilation_cache_dir={tmp_path / 'cache'}"]
  cmd = [sys.executable, os.path.join(_ROOT, "scripts", "benchmark.py"), "step", "--config=configs/synthetic.py",
         "--steps=1"] + [f"--set={s}" for s in sets]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  outs = [subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
          for _ in range(2)]
  assert "first step (compiled + run)" in outs[0]
  assert "first step (loaded from the compilation cache + run)" in outs[1]
  for out in outs:
    assert "step: median " in out and " images/s" in out and "peak process memory (max RSS): " in out
