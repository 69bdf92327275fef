"""Reports (table, JSON, ROC PNG) and the ``python -m unitsface_jax.evaluate`` command line."""

import json
import os
import shutil
import subprocess
import sys

import command_lines
import numpy as np
import pytest
from absl import app, flags
from flax import nnx
from test_eval_ijb import SUBJECTS, direct_from_images, noisy_identity_features, write_1n_copy
from test_eval_megaface import brute_force_rank1 as megaface_brute_force_rank1
from test_eval_verification import lfw_layout

from unitsface_jax import checkpoint
from unitsface_jax.evaluation import extract, ijb, megaface, report, verification

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


def _evaluate(*args):
  return command_lines.run_main("unitsface_jax.evaluate", *args)


def _fails_naming(capsys, name, *args):
  """The command line stops on a bad input: exit status 2, one line on stderr naming
  ``name``."""
  status, err = command_lines.run_main_stderr(capsys, "unitsface_jax.evaluate", *args)
  assert status == 2 and err.startswith("error: ") and "\n" not in err, (args, status, err)
  assert str(name) in err, (args, err)


def test_cli_verification_and_ijb_from_features(data_dir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  bin_path = data_dir / "eval" / "lfw_fold1.bin"
  _, issame = verification.read_bin(bin_path)
  emb = rng.normal(size=(1200, 16)).astype(np.float32)
  emb[1::2][issame] = emb[0::2][issame] + 0.8 * rng.normal(size=(300, 16))
  np.savez(tmp_path / "lfw.npz", embeddings=emb)
  out = tmp_path / "out"
  assert _evaluate("--protocol=verification", f"--data={bin_path}",
                   f"--features={tmp_path / 'lfw.npz'}", f"--out={out}") == 0
  got = json.loads((out / "verification.json").read_text())["lfw_fold1"]
  want = verification.verification_metrics(emb, issame)
  assert got["accuracy"] == want["accuracy"] and got["std"] == want["std"]
  assert "lfw_fold1" in capsys.readouterr().out and (out / "verification_roc.png").exists()

  root = data_dir / "eval" / "ijbc_mini"
  meta = ijb.read_meta(root)
  feats = rng.normal(size=(130, 16)).astype(np.float32)
  np.savez(tmp_path / "ijb.npz", embeddings=feats, embeddings_flip=feats[::-1].copy())
  assert _evaluate("--protocol=ijb", f"--data={root}", f"--features={tmp_path / 'ijb.npz'}",
                   f"--out={out}", "--nodetector_score") == 0
  got = json.loads((out / "ijb.json").read_text())
  want = ijb.evaluate_features(meta, feats, feats[::-1].copy(), use_detector_score=False)
  assert got["mode"] == "N1D0F1"
  assert got["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
  assert (out / "ijbc_roc.png").exists()

  with pytest.raises(app.UsageError, match="--params"):
    _evaluate("--protocol=verification", f"--data={bin_path}")


def test_cli_params_path_runs_a_real_backbone(data_dir, tmp_path, capsys):
  """--params: the backbone stored in a weight file embeds the .bin images end to end (the
  tests' own backbone, tests/tiny_backbone.py: the file names it and carries its width)."""
  import tiny_backbone  # pylint: disable=g-import-not-at-top
  from unitsface_jax import export, models
  from unitsface_jax.evaluation import extract

  model = models.create(tiny_backbone.NAME, rngs=nnx.Rngs(3), width=16)
  weights = tmp_path / "w.npz"
  export.save_params(weights, model, tiny_backbone.NAME)
  bin_path = data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin"
  out = tmp_path / "out"
  assert _evaluate("--protocol=verification", f"--data={bin_path}", f"--params={weights}",
                   f"--out={out}", "--batch_size=40", "--nfolds=2") == 0
  got = json.loads((out / "verification.json").read_text())
  (result,) = got.values()
  # The same numbers from the library with the same weights.
  model.eval()
  sets = verification.load_sets([bin_path])
  want = verification.evaluate_sets(extract.nnx_apply_fn(model), sets, batch_size=40,
                                    nfolds=2)
  (expected,) = want.values()
  assert result["accuracy"] == pytest.approx(expected["accuracy"])
  _fails_naming(capsys, tmp_path / "nope.npz", "--protocol=verification", f"--data={bin_path}",
                f"--params={tmp_path / 'nope.npz'}", f"--out={out}")


@pytest.mark.slow
def test_python_m_exits_2_with_the_one_line_error(tmp_path):
  """``python -m unitsface_jax.evaluate`` passes main's status to the shell."""
  proc = _run_cli("--protocol=verification", f"--data={tmp_path / 'lfw.bin'}",
                  f"--features={tmp_path / 'missing.npz'}", "--nocpu_tuning")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "missing.npz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
  """A training run's workdir: tests/data/checkpoint_v0 (IResNet-18, width 4, 32-d)."""
  workdir = tmp_path_factory.mktemp("run")
  shutil.copytree(data_dir / "checkpoint_v0" / "checkpoints", workdir / "checkpoints")
  return workdir


def test_cli_pairs_folder_with_a_workdir(data_dir, run_dir, tmp_path):
  """--pairs over LFW folders, --folds=2 of a two-fold pairs.txt, the run's backbone."""
  people = lfw_layout(data_dir, tmp_path / "lfw")
  names = sorted(people)
  lines = ["2\t4"]
  for group in (names[:8], names[8:]):
    lines += [f"{p}\t{people[p][0]}\t{people[p][1]}" for p in group[:4]]
    lines += [f"{a}\t{people[a][2]}\t{b}\t{people[b][2]}" for a, b in zip(group[:4], group[4:])]
  (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  assert _evaluate("--protocol=verification", f"--data={tmp_path / 'lfw'}",
                   f"--pairs={tmp_path / 'pairs.txt'}", "--folds=2", "--nfolds=2",
                   f"--workdir={run_dir}", "--batch_size=8", f"--out={out}") == 0
  got = json.loads((out / "verification.json").read_text())["lfw"]
  # The same numbers from the library: fold 2's 8 pairs, centre crops, the step-12 backbone.
  _, model = checkpoint.backbone_from_workdir(run_dir)
  data = verification.load_pairs(tmp_path / "lfw", tmp_path / "pairs.txt", folds=[2])
  assert data.issame.tolist() == [True] * 4 + [False] * 4
  want = verification.evaluate_set(extract.nnx_apply_fn(model), data, batch_size=8, nfolds=2,
                                   progress=False)
  for key in ("accuracy", "std", "xnorm", "tar_at_far_0.001"):
    assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key
  np.testing.assert_array_equal(got["fold_accuracies"], want["fold_accuracies"])
  assert 0.0 < got["xnorm"]


def _megaface_tree(root, rng, algo):
  """A devkit feature tree: 3 FaceScrub identities (11 images) and 60 distractors."""
  fs, mf = [], []
  for person, n in (("Ann_A", 4), ("Bob_B", 3), ("Cy_C", 4)):
    centre = rng.normal(size=16)
    for k in range(n):
      fs.append(f"facescrub_aligned/{person}/{person}_{k}.png")
      megaface.write_feature(megaface.feature_path(root, "facescrub", fs[-1], algo),
                             centre + 0.7 * rng.normal(size=16))
  for k in range(60):
    mf.append(f"FlickrFinal2/{k % 5}/{k}/{k}_0.jpg")
    megaface.write_feature(megaface.feature_path(root, "megaface", mf[-1], algo),
                           rng.normal(size=16))
  (root / "fs.lst").write_text("\n".join(fs) + "\n")
  (root / "mf.lst").write_text("\n".join(mf) + "\n")
  return fs, mf


def test_cli_megaface_devkit_tree(tmp_path):
  """--protocol=megaface with noise lists and --num_distractors, against loops over the
  files that stay: rank-1 (each probe against the others of its identity and every
  distractor) and TAR at FAR 1e-6 (below one impostor in 400: above the highest impostor)."""
  fs, mf = _megaface_tree(tmp_path, np.random.default_rng(9), "r18")
  (tmp_path / "fs_noise.txt").write_text("# noisy\nBob_B_2.png\n")
  (tmp_path / "mf_noise.txt").write_text("# noisy\n8\t3/8/8_0.jpg\n")
  out = tmp_path / "out"
  assert _evaluate("--protocol=megaface", f"--data={tmp_path}",
                   f"--facescrub_list={tmp_path / 'fs.lst'}",
                   f"--megaface_list={tmp_path / 'mf.lst'}", "--algo=r18",
                   f"--facescrub_noises={tmp_path / 'fs_noise.txt'}",
                   f"--megaface_noises={tmp_path / 'mf_noise.txt'}", "--num_distractors=40",
                   f"--out={out}") == 0
  got = json.loads((out / "megaface.json").read_text())
  probes = [p for p in fs if not p.endswith("Bob_B_2.png")]
  distractors = [d for d in mf if d != mf[8]][:40]
  p = np.stack([megaface.read_feature(megaface.feature_path(tmp_path, "facescrub", x, "r18"))
                for x in probes]).astype(np.float64)
  d = np.stack([megaface.read_feature(megaface.feature_path(tmp_path, "megaface", x, "r18"))
                for x in distractors]).astype(np.float64)
  ids = [megaface.facescrub_identity(x) for x in probes]
  rank1 = megaface_brute_force_rank1(p, ids, d)
  p /= np.linalg.norm(p, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  top_impostor = max(float(a @ b) for a in p for b in d)
  genuine = [float(p[i] @ p[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))
             if ids[i] == ids[j]]
  tar = sum(g > top_impostor for g in genuine) / len(genuine)
  assert got["rank1"] == rank1 and 0 < rank1 < 1
  assert got["tar_at_far_1e-06"] == tar and 0 < tar < 1
  assert got["num_probes"] == 10 and got["num_distractors"] == 40
  assert got["removed_noise"] == {"facescrub": 1, "megaface": 1}


def test_cli_ijbb_target_with_1n_lists(data_dir, tmp_path, capsys):
  """--target=IJBB reads ijbb_* meta files and the S1/S2 gallery lists."""
  root = data_dir / "eval" / "ijbc_mini"
  meta = ijb.read_meta(root)
  copy = write_1n_copy(root, tmp_path / "IJBB", "IJBB", subject_of=SUBJECTS)
  emb, flip = noisy_identity_features(root, meta)
  np.savez(tmp_path / "f.npz", embeddings=emb, embeddings_flip=flip)
  out = tmp_path / "out"
  assert _evaluate("--protocol=ijb", "--target=IJBB", f"--data={copy}",
                   f"--features={tmp_path / 'f.npz'}", f"--out={out}") == 0
  got = json.loads((out / "ijb.json").read_text())
  assert got["target"] == "IJBB" and got["mode"] == "N1D1F1"
  assert "IJBB-N1D1F1" in capsys.readouterr().out and (out / "ijbb_roc.png").exists()
  want = direct_from_images(root, meta, emb, flip)
  for key in ("rank1", "rank5", "rank10", "tpir_at_fpir"):
    assert got["identification"][key] == want[key], key
  # 1:1 is the fixture's: the same numbers as the same features on the IJB-C original.
  same = ijb.evaluate_features(meta, emb, flip)["verification"]
  assert got["verification"]["tar_at_far"] == same["tar_at_far"]
  # The IJB-C folder has no IJB-B files: the first one missing is named.
  _fails_naming(capsys, root / "meta" / "ijbb_face_tid_mid.txt", "--protocol=ijb",
                "--target=IJBB", f"--data={root}", f"--features={tmp_path / 'f.npz'}",
                f"--out={out}")


def test_cli_errors_name_the_missing_input(data_dir, run_dir, tmp_path, capsys):
  bin_path = data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin"
  missing = tmp_path / "missing"
  runs = [
      (missing / "run", "--protocol=verification", f"--data={bin_path}",
       f"--workdir={missing / 'run'}"),
      (missing / "lfw.bin", "--protocol=verification", f"--data={missing / 'lfw.bin'}",
       f"--workdir={run_dir}"),
      (missing / "f.npz", "--protocol=verification", f"--data={bin_path}",
       f"--features={missing / 'f.npz'}"),
      (missing / "pairs.txt", "--protocol=verification", f"--data={data_dir / 'lfw' / 'images'}",
       f"--pairs={missing / 'pairs.txt'}", f"--workdir={run_dir}"),
      (missing / "fs.lst", "--protocol=megaface", f"--data={tmp_path}",
       f"--facescrub_list={missing / 'fs.lst'}", f"--megaface_list={missing / 'mf.lst'}"),
      (missing / "IJBC", "--protocol=ijb", f"--data={missing / 'IJBC'}",
       f"--workdir={run_dir}"),
  ]
  for name, *args in runs:
    _fails_naming(capsys, name, *args, f"--out={tmp_path / 'out'}")
  assert not (tmp_path / "out").exists()
  with pytest.raises(flags.IllegalFlagValueError, match="bogus"):
    _evaluate("--protocol=bogus", f"--data={bin_path}")


@pytest.mark.parametrize("name, line, text", [
    ("ijbc_name_5pts_score.txt", 2, "2.jpg 101.2 119.2 148.4\n"),  # columns missing
    ("ijbc_face_tid_mid.txt", 4, "4.jpg 208 x64198\n"),  # not a number
    ("ijbc_template_pair_label.txt", 3, "208 526\n"),  # no label
    ("ijbc_1N_probe_mixed.csv", 2, "oops\n"),
])
def test_cli_names_the_malformed_ijb_meta_file(data_dir, tmp_path, capsys, name, line, text):
  root = write_1n_copy(data_dir / "eval" / "ijbc_mini", tmp_path / "IJBC")
  path = root / "meta" / name
  lines = path.read_text().splitlines(keepends=True)
  lines[line - 1] = text
  path.write_text("".join(lines))
  np.savez(tmp_path / "f.npz", embeddings=np.ones((130, 4), np.float32))
  _fails_naming(capsys, path, "--protocol=ijb", f"--data={root}",
                f"--features={tmp_path / 'f.npz'}", f"--out={tmp_path / 'out'}")
