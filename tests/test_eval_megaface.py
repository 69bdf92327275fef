"""MegaFace Challenge 1: devkit feature files, rank-1, TAR@FAR from top impostors, noise lists."""

import struct

import numpy as np
import pytest

from unitsface_jax.evaluation import megaface, metrics


def test_feature_file_round_trip_and_header(tmp_path):
  vec = np.random.default_rng(0).normal(size=512).astype(np.float32)
  path = tmp_path / "facescrub" / "Adam_Brody" / "Adam_Brody_1.png_algo.bin"
  megaface.write_feature(path, vec)
  raw = path.read_bytes()
  assert struct.unpack("<4i", raw[:16]) == (512, 1, 4, 5) and len(raw) == 16 + 4 * 512
  np.testing.assert_array_equal(megaface.read_feature(path), vec)
  path.write_bytes(raw[:-4])
  with pytest.raises(ValueError, match="header says"):
    megaface.read_feature(path)
  path.write_bytes(struct.pack("<4i", 512, 1, 8, 6) + raw[16:])
  with pytest.raises(ValueError, match="CV_32F"):
    megaface.read_feature(path)


def brute_force_rank1(probes, ids, distractors):
  p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
  d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
  hits, total = 0, 0
  for i in range(len(ids)):
    dmax = max(float(p[i] @ x) for x in d)
    for j in range(len(ids)):
      if j != i and ids[j] == ids[i]:
        total += 1
        hits += float(p[i] @ p[j]) > dmax
  return hits / total


def test_rank1_and_tar_equal_brute_force():
  rng = np.random.default_rng(1)
  n_id, per, dim = 12, 4, 16
  centres = rng.normal(size=(n_id, dim))
  ids = np.repeat(np.arange(n_id), per)
  probes = centres[ids] + 0.9 * rng.normal(size=(n_id * per, dim))
  distractors = rng.normal(size=(700, dim))
  far = 1e-3
  res = megaface.evaluate_features(probes, ids, distractors, far=far, chunk=64)
  assert res["rank1"] == brute_force_rank1(probes, ids, distractors)
  assert 0.0 < res["rank1"] < 1.0
  # TAR from the kept top impostors equals the full-ROC reading over every score.
  p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
  d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
  iu = np.triu_indices(len(ids), 1)
  same = (ids[:, None] == ids[None, :])[iu]
  genuine = (p @ p.T)[iu][same]
  impostor = (p @ d.T).ravel()
  scores = np.concatenate([genuine, impostor])
  labels = np.r_[np.ones(genuine.size), np.zeros(impostor.size)]
  want = metrics.tar_at_far(scores, labels, [far], drop_intermediate=False)[0]
  assert res["tar_at_far_0.001"] == pytest.approx(want, abs=1e-12)


def test_devkit_tree_with_noise_lists(tmp_path):
  rng = np.random.default_rng(2)
  algo = "test"
  fs_list, mf_list = [], []
  for person in ("Ann_A", "Bob_B"):
    centre = rng.normal(size=8)
    for k in range(3):
      rel = f"facescrub_aligned/{person}/{person}_{k}.png"
      fs_list.append(rel)
      megaface.write_feature(megaface.feature_path(tmp_path, "facescrub", rel, algo),
                             centre + 0.1 * rng.normal(size=8))
  for k in range(20):
    rel = f"FlickrFinal2/{k % 3}/{k}/{k}_0.jpg"
    mf_list.append(rel)
    megaface.write_feature(megaface.feature_path(tmp_path, "megaface", rel, algo),
                           rng.normal(size=8))
  # A distractor copying Ann_A's image 0 breaks a rank-1 hit unless the noise list drops it.
  ann0 = megaface.read_feature(megaface.feature_path(tmp_path, "facescrub", fs_list[0], algo))
  megaface.write_feature(megaface.feature_path(tmp_path, "megaface", mf_list[5], algo), ann0)
  (tmp_path / "fs.lst").write_text("\n".join(fs_list) + "\n")
  (tmp_path / "mf.lst").write_text("\n".join(mf_list) + "\n")
  (tmp_path / "mf_noise.txt").write_text("# noisy distractors\n5\t2/5/5_0.jpg\n")
  (tmp_path / "fs_noise.txt").write_text("# none listed here\n")
  noisy = megaface.evaluate_devkit(tmp_path, tmp_path / "fs.lst", tmp_path / "mf.lst", algo=algo)
  clean = megaface.evaluate_devkit(tmp_path, tmp_path / "fs.lst", tmp_path / "mf.lst", algo=algo,
                                   megaface_noises=tmp_path / "mf_noise.txt",
                                   facescrub_noises=tmp_path / "fs_noise.txt")
  assert clean["removed_noise"] == {"facescrub": 0, "megaface": 1}
  assert clean["num_distractors"] == 19 and clean["num_probes"] == 6
  assert clean["rank1"] == 1.0 and noisy["rank1"] < 1.0
