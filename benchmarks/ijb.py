r"""IJB-C-sized 1:1 scoring: this package against insightface's algorithm, same data, same run.

IJB-C 1:1 has 469,375 face images in 23,124 templates (3,531 gallery + 19,593 probe
templates) and 15,658,489 template pairs, all between the two sides. This script builds a
problem of exactly that size from random 512-d features (seeded), then runs, each in a fresh
child process so that peak memory (ru_maxrss) is measured per implementation:

  ours         unitsface_jax.evaluation.ijb: faceness weighting, template_features (one
               sparse product), pair_scores (one GEMM over the templates in use and a
               gather), verification_metrics (packed-key sort ROC, TAR at FAR 1e-6 ... 1e-1,
               AUC and the plot's points).
  insightface  the algorithm of insightface recognition/arcface_torch/eval_ijbc.py,
               reimplemented from its description: per-template np.where loop with
               per-media means (image2template_feature), float64 sklearn-normalize, scoring
               in batches of 100,000 pairs by gathering both feature rows
               (``verification``), then sklearn roc_curve and its nearest-FPR reading.

Both write their scores; the parent checks that scores and TAR agree and prints a table
("beside feats GB": the peak resident memory less the 0.96 GB of image features).

  python benchmarks/ijb.py            # full IJB-C size (needs ~4 GB, a few minutes)
  python benchmarks/ijb.py --scale=0.01   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

N_IMAGES, N_GALLERY, N_PROBE, N_PAIRS = 469_375, 3_531, 19_593, 15_658_489
DIM = 512
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def make_problem(scale: float, seed: int = 0):
  """Random IJB-C-shaped meta and features (float32, like eval_ijbc.py's img_feats)."""
  rng = np.random.default_rng(seed)
  n_gal = max(2, int(N_GALLERY * scale))
  n_prb = max(2, int(N_PROBE * scale))
  n_t = n_gal + n_prb
  n_img = max(n_t, int(N_IMAGES * scale))
  n_pairs = max(10, int(N_PAIRS * scale))
  tids = np.sort(rng.choice(200_000, n_t, replace=False)) + 1  # sparse ids, as in IJB-C
  gallery, probe = tids[:n_gal], tids[n_gal:]
  # Every template gets one image, the rest are spread at random; rows sorted by template
  # as in ijbc_face_tid_mid.txt; 1-4 media per template.
  t_of_img = np.sort(np.concatenate([np.arange(n_t), rng.integers(0, n_t, n_img - n_t)]))
  templates = tids[t_of_img]
  medias = templates * 4 + rng.integers(0, 4, n_img)
  faceness = rng.uniform(0.5, 1.0, n_img).astype(np.float32)
  feats = rng.standard_normal((n_img, DIM), dtype=np.float32)
  p1 = gallery[rng.integers(0, n_gal, n_pairs)]
  p2 = probe[rng.integers(0, n_prb, n_pairs)]
  label = (rng.random(n_pairs) < 19_557 / N_PAIRS).astype(np.int8)  # IJB-C's genuine share
  return feats, faceness, templates, medias, p1, p2, label


def run_ours(data):
  from unitsface_jax.evaluation import ijb
  feats, faceness, templates, medias, p1, p2, label = data
  data.clear()  # the caller's list no longer keeps the features alive
  t = {}
  t0 = time.perf_counter()
  # What ijb.evaluate_features does for N1 D1 on fused features: faceness enters the
  # pooling weights, so no weighted copy of the image features is made.
  uniq, tf = ijb.template_features(feats, templates, medias, image_weights=faceness)
  del feats
  t["pool_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  score = ijb.pair_scores(tf, uniq, p1, p2)
  t["score_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  tar = ijb.verification_metrics(score, label, FARS)["tar_at_far"]
  t["tar_s"] = time.perf_counter() - t0
  return score, [tar[f"{f:g}"] for f in FARS], t


def run_insightface(data):
  from sklearn.metrics import roc_curve
  from sklearn.preprocessing import normalize
  feats, faceness, templates, medias, p1, p2, label = data
  data.clear()
  t = {}
  t0 = time.perf_counter()
  x = feats * faceness[:, np.newaxis]
  del feats
  unique_templates = np.unique(templates)
  template_feats = np.zeros((len(unique_templates), x.shape[1]))
  for i, uqt in enumerate(unique_templates):
    (ind_t,) = np.where(templates == uqt)
    face_feats = x[ind_t]
    face_medias = medias[ind_t]
    unique_medias, counts = np.unique(face_medias, return_counts=True)
    media_feats = []
    for u, ct in zip(unique_medias, counts):
      (ind_m,) = np.where(face_medias == u)
      media_feats.append(face_feats[ind_m] if ct == 1
                         else np.mean(face_feats[ind_m], axis=0, keepdims=True))
    template_feats[i] = np.sum(np.array(media_feats), axis=0)
  template_norm_feats = normalize(template_feats)
  del x
  t["pool_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
  for i, uqt in enumerate(unique_templates):
    template2id[uqt] = i
  score = np.zeros((len(p1),))
  batch = 100_000
  for a in range(0, len(p1), batch):
    s = np.arange(a, min(a + batch, len(p1)))
    f1 = template_norm_feats[template2id[p1[s]]]
    f2 = template_norm_feats[template2id[p2[s]]]
    score[s] = np.sum(f1 * f2, -1).flatten()
  t["score_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  fpr, tpr, _ = roc_curve(label, score)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  tar = []
  for far in FARS:
    _, i = min(zip(abs(fpr - far), range(len(fpr))))
    tar.append(float(tpr[i]))
  t["tar_s"] = time.perf_counter() - t0
  return score, tar, t


def child(impl: str, scale: float, out: str) -> None:
  problem = list(make_problem(scale))
  n = {"images": int(problem[0].shape[0]), "templates": int(np.unique(problem[2]).size),
       "pairs": int(problem[4].size)}
  features_gb = problem[0].nbytes / 2**30
  fn = run_ours if impl == "ours" else run_insightface
  score, tar, t = fn(problem)
  np.save(out + ".npy", score)
  t["total_s"] = t["pool_s"] + t["score_s"] + t["tar_s"]
  t["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  t["features_gb"] = features_gb
  t["tar"] = tar
  t["n"] = n
  with open(out + ".json", "w") as f:
    json.dump(t, f)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C size")
  ap.add_argument("--child", choices=["ours", "insightface"], help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.child, args.scale, args.out)
    return
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in ("ours", "insightface"):
      out = os.path.join(tmp, impl)
      subprocess.run([sys.executable, __file__, f"--child={impl}", f"--scale={args.scale}",
                      f"--out={out}"], check=True, env=env)
      with open(out + ".json") as f:
        res[impl] = json.load(f)
    ours = np.load(os.path.join(tmp, "ours.npy"))
    ref = np.load(os.path.join(tmp, "insightface.npy"))
  n = res["ours"]["n"]
  print(f"IJB-C-sized scoring: {n['images']:,} images, {n['templates']:,} templates, "
        f"{n['pairs']:,} pairs, {DIM}-d random features")
  print(f"{'':12s}{'pool s':>9s}{'score s':>9s}{'TAR s':>9s}{'total s':>9s}{'peak GB':>9s}"
        f"{'beside feats GB':>16s}")
  for impl in ("ours", "insightface"):
    r = res[impl]
    print(f"{impl:12s}{r['pool_s']:9.2f}{r['score_s']:9.2f}{r['tar_s']:9.2f}"
          f"{r['total_s']:9.2f}{r['peak_rss_gb']:9.2f}"
          f"{r['peak_rss_gb'] - r['features_gb']:16.2f}")
  print(f"speed-up: scoring {res['insightface']['score_s'] / res['ours']['score_s']:.1f}x, "
        f"pool+score+TAR {res['insightface']['total_s'] / res['ours']['total_s']:.1f}x")
  print(f"max |score difference| {np.abs(ours - ref).max():.2e}; TAR ours "
        f"{np.round(res['ours']['tar'], 6).tolist()} insightface "
        f"{np.round(res['insightface']['tar'], 6).tolist()}")


if __name__ == "__main__":
  main()
