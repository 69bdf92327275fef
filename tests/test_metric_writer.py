"""The metric writer (``unitsface_jax/metric_writer.py``): TensorBoard events without loading
torch, and torch still importable after. (metrics.jsonl on gs:// is in tests/test_gcs.py.)"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from unitsface_jax import metric_writer
writer = metric_writer.MetricWriter(sys.argv[1])
writer.write(3, {"loss": 0.5})
writer.close()
loaded = "torch" in sys.modules
import torch  # the installed torch, as if nothing had happened
print(json.dumps({"torch_loaded_by_writer": loaded, "torch": torch.__version__}))
"""


def test_tensorboard_events_are_written_without_loading_torch(tmp_path):
  pytest.importorskip("torch")
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  assert out["torch_loaded_by_writer"] is False and out["torch"]
  events = list((tmp_path / "tensorboard").iterdir())
  assert len(events) == 1 and events[0].stat().st_size > 0
  assert [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5]
