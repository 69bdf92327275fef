"""The demo's smoke run with MobileFaceNet and a ViT: trains and reports held-out accuracy.

Each is a child process (``tests/train_run.py``, one device) of ``configs/demo.py:smoke`` with
``--config.model.name`` switched, width 4 and 32-d embeddings (the tests' tiny models) and an
evaluation of the held-out demo pairs after the last step.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_demo_smoke_trains_and_reports_held_out_accuracy(name, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "train_run.py"), "1", "--config=configs/demo.py:smoke",
       f"--workdir={tmp_path}", f"--config.model.name={name}", "--config.eval.every_steps=16",
       "--config.model.width=4", "--config.model.num_features=32",
       "--config.compilation_cache=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if l]
  losses = {m["step"]: m["s2c"] for m in lines if "loss" in m}
  assert sorted(losses) == list(range(1, 17)) and np.isfinite(list(losses.values())).all()
  # Epoch 0 (CosFace alone) lowers the loss on the real faces.
  assert np.mean([losses[s] for s in (6, 7, 8)]) < np.mean([losses[s] for s in (1, 2, 3)])
  accuracy = [m["eval/orl_val/accuracy"] for m in lines if "eval/orl_val/accuracy" in m]
  assert accuracy and 0.5 <= accuracy[-1] <= 1.0, lines
