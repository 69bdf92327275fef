"""Reports (table, JSON, ROC PNG) and the ``python -m unitsface_jax.evaluate`` command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from unitsface_jax.evaluation import ijb, report, verification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_json_and_png(tmp_path):
  rows = {"lfw": {"accuracy": 0.99567, "std": 0.0031, "name": "x"}, "cfp_fp": {"accuracy": 0.9}}
  table = report.format_table(rows, ["accuracy", "std"])
  lines = table.splitlines()
  assert "accuracy" in lines[0] and "99.57" in lines[2] and lines[3].rstrip().endswith("-")
  path = report.write_json(tmp_path, "verification",
                           {"lfw": {"acc": np.float64(0.5), "thr": np.arange(3)}})
  assert json.loads(path.read_text()) == {"lfw": {"acc": 0.5, "thr": [0, 1, 2]}}
  png = report.plot_roc({"a": (np.array([0, 1e-5, 1e-3, 1.0]), np.array([0, 0.5, 0.9, 1.0]))},
                        tmp_path / "roc.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "unitsface_jax.evaluate", *args], env=env,
                        capture_output=True, text=True, timeout=180, cwd=REPO)


def test_cli_verification_and_ijb_from_features(data_dir, tmp_path):
  rng = np.random.default_rng(0)
  bin_path = data_dir / "eval" / "lfw_fold1.bin"
  _, issame = verification.read_bin(bin_path)
  emb = rng.normal(size=(1200, 16)).astype(np.float32)
  emb[1::2][issame] = emb[0::2][issame] + 0.8 * rng.normal(size=(300, 16))
  np.savez(tmp_path / "lfw.npz", embeddings=emb)
  out = tmp_path / "out"
  proc = _run_cli("--protocol=verification", f"--data={bin_path}",
                  f"--features={tmp_path / 'lfw.npz'}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((out / "verification.json").read_text())["lfw_fold1"]
  want = verification.verification_metrics(emb, issame)
  assert got["accuracy"] == want["accuracy"] and got["std"] == want["std"]
  assert "lfw_fold1" in proc.stdout and (out / "verification_roc.png").exists()

  root = data_dir / "eval" / "ijbc_mini"
  meta = ijb.read_meta(root)
  feats = rng.normal(size=(130, 16)).astype(np.float32)
  np.savez(tmp_path / "ijb.npz", embeddings=feats, embeddings_flip=feats[::-1].copy())
  proc = _run_cli("--protocol=ijb", f"--data={root}", f"--features={tmp_path / 'ijb.npz'}",
                  f"--out={out}", "--nodetector_score")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((out / "ijb.json").read_text())
  want = ijb.evaluate_features(meta, feats, feats[::-1].copy(), use_detector_score=False)
  assert got["mode"] == "N1D0F1"
  assert got["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
  assert (out / "ijbc_roc.png").exists()

  proc = _run_cli("--protocol=verification", f"--data={bin_path}")
  assert proc.returncode != 0 and "--params" in proc.stderr


def test_cli_params_path_runs_a_real_backbone(data_dir, tmp_path):
  """--params: the backbone stored in a weight file embeds the .bin images end to end."""
  from unitsface_jax import export, models
  from unitsface_jax.evaluation import extract

  model = models.create("iresnet18", rngs=nnx.Rngs(3), width=16)  # the file carries the width
  weights = tmp_path / "w.npz"
  export.save_params(weights, model, "iresnet18")
  bin_path = data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin"
  out = tmp_path / "out"
  proc = _run_cli("--protocol=verification", f"--data={bin_path}", f"--params={weights}",
                  f"--out={out}", "--batch_size=40", "--nfolds=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((out / "verification.json").read_text())
  (result,) = got.values()
  # The same numbers from the library with the same weights.
  model.eval()
  sets = verification.load_sets([bin_path])
  want = verification.evaluate_sets(extract.nnx_apply_fn(model), sets, batch_size=40,
                                    nfolds=2)
  (expected,) = want.values()
  assert result["accuracy"] == pytest.approx(expected["accuracy"])
  proc = _run_cli("--protocol=verification", f"--data={bin_path}",
                  f"--params={tmp_path / 'nope.npz'}", f"--out={out}")
  assert proc.returncode != 0 and "nope.npz" in proc.stderr
