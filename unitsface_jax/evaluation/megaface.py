"""MegaFace Challenge 1: FaceScrub probes against up to 1M distractors.

Feature files use the MegaFace devkit's binary matrix format, as insightface
``recognition/_evaluation_/megaface/remove_noises.py`` reads and writes it: four little-endian
int32 ``rows, cols, element size (4), OpenCV type (5 = CV_32F)`` followed by rows*cols
float32 values, one file per image at ``<dir>/facescrub/<Name>/<image>_<algo>.bin`` and
``<dir>/megaface/<a>/<b>/<image>_<algo>.bin``.

Identification follows the devkit: for every FaceScrub identity, each of its images in turn
is the probe and each other image of the same identity is added to the distractor set; it
is a rank-1 hit when that image scores higher than every distractor. Verification: genuine
pairs are the FaceScrub same-identity pairs, impostor pairs are probe x distractor; TAR is
read at FAR 1e-6 from the highest impostor scores only, so 3.5e9 impostor pairs never sit in
memory. The published noise lists (``facescrub_noises.txt``, ``megaface_noises.txt``) drop
the listed images: insightface's cleaner overwrites them with class centres (FaceScrub) or
pushes them far away (MegaFace), which removes them from the ranking in the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from etils import epath

from unitsface_jax.evaluation import extract, metrics

_CV_32F = 5


def write_feature(path: str | epath.PathLike, feature: np.ndarray) -> None:
  """Writes one feature vector in the devkit format (rows = dim, cols = 1)."""
  feature = np.asarray(feature, "<f4").ravel()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(struct.pack("<4i", feature.size, 1, 4, _CV_32F) + feature.tobytes())


def read_feature(path: str | epath.PathLike) -> np.ndarray:
  """Reads one devkit feature file; float32 [rows * cols]."""
  data = epath.Path(path).read_bytes()
  if len(data) < 16:
    raise ValueError(f"{path}: {len(data)} bytes, shorter than the 16-byte header")
  rows, cols, elem, cv_type = struct.unpack("<4i", data[:16])
  if elem != 4 or cv_type != _CV_32F:
    raise ValueError(f"{path}: element size {elem}, type {cv_type}; expected 4 and 5 (CV_32F)")
  n = rows * cols
  if len(data) != 16 + 4 * n:
    raise ValueError(f"{path}: header says {rows}x{cols} floats, file has {len(data) - 16} bytes")
  return np.frombuffer(data, "<f4", count=n, offset=16).astype(np.float32)


def feature_path(feature_dir: str | epath.PathLike, kind: str, image_path: str,
                 algo: str) -> epath.Path:
  """Where the devkit keeps the feature of ``image_path`` (a line of its list file)."""
  parts = image_path.strip().split("/")
  keep = {"facescrub": 2, "megaface": 3}[kind]
  *dirs, name = parts[-keep:]
  return epath.Path(feature_dir) / kind / epath.Path(*dirs) / f"{name}_{algo}.bin"


def read_list(path: str | epath.PathLike) -> list[str]:
  """Image paths of a devkit list (one per line)."""
  return [ln.strip() for ln in epath.Path(path).read_text().splitlines() if ln.strip()]


def read_noise_list(path: str | epath.PathLike) -> set[str]:
  """A published noise list: '#' lines are comments; a tab-separated line keeps its 2nd field."""
  out = set()
  for ln in epath.Path(path).read_text().splitlines():
    ln = ln.strip()
    if not ln or ln.startswith("#"):
      continue
    fields = ln.split("\t")
    out.add(fields[1] if len(fields) > 1 else fields[0])
  return out


def load_features(feature_dir: str | epath.PathLike, kind: str, image_paths: Sequence[str],
                  algo: str) -> np.ndarray:
  """Stacks the feature files of ``image_paths`` into float32 [N, D]."""
  return np.stack([read_feature(feature_path(feature_dir, kind, p, algo)) for p in image_paths])


def facescrub_identity(image_path: str) -> str:
  """The FaceScrub identity of a list entry: its parent folder."""
  return image_path.strip().split("/")[-2]


def noise_masks(facescrub_paths: Sequence[str], megaface_paths: Sequence[str],
                facescrub_noises: set[str] | None, megaface_noises: set[str] | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Keep-masks for the two lists (FaceScrub noise lists name files, MegaFace ``a/b/file``)."""
  fs_keep = np.ones(len(facescrub_paths), bool)
  mf_keep = np.ones(len(megaface_paths), bool)
  if facescrub_noises:
    fs_keep = np.array([p.split("/")[-1] not in facescrub_noises for p in facescrub_paths])
  if megaface_noises:
    mf_keep = np.array(["/".join(p.split("/")[-3:]) not in megaface_noises
                        for p in megaface_paths])
  return fs_keep, mf_keep


def evaluate_features(probe_feats: np.ndarray, probe_ids: Sequence, distractor_feats: np.ndarray,
                      *, far: float = 1e-6, chunk: int = 65536) -> dict:
  """Rank-1 identification and TAR@FAR from probe and distractor features.

  Args:
    probe_feats: [N, D] FaceScrub features (normalised here).
    probe_ids: [N] identity of each probe.
    distractor_feats: [M, D] distractor features (normalised here).
    far: FAR for the verification reading.
    chunk: distractors per matrix product (memory is chunk x N floats).
  """
  probes = extract.l2_normalize(np.asarray(probe_feats, np.float32))
  ids = np.unique(np.asarray(probe_ids), return_inverse=True)[1]
  n, m = probes.shape[0], int(distractor_feats.shape[0])
  num_impostors = n * m
  keep = int(np.floor(far * num_impostors + 0.5)) + 1
  best = np.full(n, -np.inf, np.float32)
  top = np.empty(0, np.float32)
  for a in range(0, m, chunk):
    d = extract.l2_normalize(np.asarray(distractor_feats[a:a + chunk], np.float32))
    sim = probes @ d.T
    best = np.maximum(best, sim.max(1))
    flat = sim.ravel()
    if flat.size > keep:
      flat = np.partition(flat, flat.size - keep)[-keep:]
    top = np.concatenate([top, flat])
    if top.size > keep:
      top = np.partition(top, top.size - keep)[-keep:]
  sim_pp = probes @ probes.T
  same = ids[:, None] == ids[None, :]
  np.fill_diagonal(same, False)
  pi, gi = np.nonzero(same)
  genuine = sim_pp[pi, gi]
  rank1 = float(np.mean(genuine > best[pi])) if genuine.size else float("nan")
  upper = pi < gi  # each unordered genuine pair once for verification
  tar = metrics.tar_at_far_from_top_impostors(genuine[upper], top, num_impostors, far)
  return {"rank1": rank1, f"tar_at_far_{far:g}": tar, "num_probes": n,
          "num_distractors": m, "num_probe_pairs": int(pi.size)}


def evaluate_devkit(feature_dir: str | epath.PathLike, facescrub_list: str | epath.PathLike,
                    megaface_list: str | epath.PathLike, *, algo: str,
                    facescrub_noises: str | epath.PathLike | None = None,
                    megaface_noises: str | epath.PathLike | None = None,
                    num_distractors: int | None = None) -> dict:
  """Reads a devkit feature tree and evaluates it, honouring the noise lists when given."""
  fs_paths = read_list(facescrub_list)
  mf_paths = read_list(megaface_list)
  fs_keep, mf_keep = noise_masks(
      fs_paths, mf_paths,
      read_noise_list(facescrub_noises) if facescrub_noises else None,
      read_noise_list(megaface_noises) if megaface_noises else None)
  fs_paths = [p for p, k in zip(fs_paths, fs_keep) if k]
  mf_paths = [p for p, k in zip(mf_paths, mf_keep) if k]
  if num_distractors is not None:
    mf_paths = mf_paths[:num_distractors]
  probes = load_features(feature_dir, "facescrub", fs_paths, algo)
  distractors = load_features(feature_dir, "megaface", mf_paths, algo)
  res = evaluate_features(probes, [facescrub_identity(p) for p in fs_paths], distractors)
  res["removed_noise"] = {"facescrub": int((~fs_keep).sum()), "megaface": int((~mf_keep).sum())}
  return res
