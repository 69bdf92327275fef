"""The benchmark scripts run end to end and end with the JSON line BENCHMARKS.md relies on.

Timing is not tested here (BENCHMARKS.md holds the measurements); what breaks silently when
the package changes under the scripts is: a mesh axis renamed, a worker that no longer
starts, a key missing from the result. A tiny iresnet18 run (a quarter-width trunk for the
train step and the extraction), one round each.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import tiny_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the [torch] extra is not installed")
# Each runs a benchmark script in a child process.
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, compare_torch: bool = True, model: str = "iresnet18",
         env=None) -> dict:
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / script), f"--model={model}",
       "--rounds=1", *(["--compare_torch"] if compare_torch else []), *args],
      capture_output=True, text=True, timeout=900, cwd=ROOT, check=False, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_torch
def test_train_step_benchmark_reports_ratio_and_mfu():
  result = _run("train_step.py", "--batch=2", "--classes=16", "--steps=2", "--width=16")
  for key in ("jax_img_s", "torch_img_s", "ratio", "mfu", "matmul_ceiling_flop_s"):
    assert result[key] > 0, (key, result)
  assert result["steps_per_round"] == 2
  # On the CPU the compiled step's cost analysis agrees with the analytic count.
  assert result["mfu_flops"] == "cost_analysis"
  ratio = result["flops_per_2_steps"] / result["analytic_flops_per_2_steps"]
  assert 0.8 < ratio < 1.1, ratio
  assert result["ratio"] == pytest.approx(result["jax_img_s"] / result["torch_img_s"],
                                          rel=1e-2)
  # The worker tuned itself for the CPU (cpu_tuning.enable() in its main()).
  assert YNN_FLAG in result["xla_flags"]["jax"].split(), result["xla_flags"]


@needs_torch
def test_embed_benchmark_reports_ratio_and_mfu():
  result = _run("embed.py", "--batch=2", "--width=16")
  for key in ("jax_img_s", "torch_img_s", "ratio", "mfu"):
    assert result[key] > 0, (key, result)
  assert result["flip"] is True and result["width"] == 16


def test_strided_gradients_benchmark_compiles_two_different_steps():
  # Two train steps to compile: the tests' IResNet of one block a stage (registered in the
  # script's process by tests/launch_site/sitecustomize.py), whose stages each have the
  # strided convolutions the rewrite changes, instead of iresnet18's two blocks a stage.
  env = dict(os.environ, PYTHONPATH=tiny_backbone.CHILD_PYTHONPATH)
  result = _run("strided_gradients.py", "--width=8", "--batch=2", "--classes=16",
                compare_torch=False, model=tiny_backbone.IRESNET_NAME, env=env)
  assert set(result["seconds"]) == {"rewrite", "xla"}
  assert all(len(v) == 1 and v[0] > 0 for v in result["seconds"].values()), result
  # The two programs differ: XLA's cost analysis counts the rewritten gradients differently
  # (the rewrite was on while tracing one of them and off for the other).
  assert result["flops"]["rewrite"] != result["flops"]["xla"], result["flops"]
  assert YNN_FLAG in result["xla_flags"].split(), result["xla_flags"]
