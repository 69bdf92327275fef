r"""Writes an IJB-C-shaped evaluation set: loose-crop JPEGs, landmarks and the meta files.

The layout is insightface ``eval_ijbc.py``'s ``IJB_release/IJBC``: ``loose_crop/<i>.jpg``;
``meta/ijbc_face_tid_mid.txt`` (image, template, media); ``meta/ijbc_name_5pts_score.txt``
(image, five landmarks, faceness); ``meta/ijbc_template_pair_label.txt`` (1:1 pairs);
``meta/ijbc_1N_gallery_G1.csv``, ``_G2.csv`` and ``ijbc_1N_probe_mixed.csv`` (1:N). The
shape follows IJB-C: 469,375 images in 23,124 templates, 3,531 gallery templates (one per
subject, split in two galleries) and 19,593 probe templates; every probe meets its mate and
about 798 of the 3,531 gallery templates (15.66M pairs at full size, 0.125 % genuine), so
at N images the counts scale by N / 469,375. Images per template follow a heavy tail (every
template has one; the rest by Pareto weights); a template's images are stills (their own
media) or frames of up to three videos (shared media).

Each image is a real LFW face (the 130 images of tests/data/eval/ijbc_mini, 16 people,
subject k drawn from person k mod 16) placed by a random similarity transform on a canvas
whose long side is log-uniform in 80-1000 px and aspect ratio 0.75-1.33, over another
photo's blurred pixels, saved as JPEG at quality 75-95; its landmarks are the source's
moved by the same transform plus up to 1 px of jitter. The identity structure is thin
(16 people), so the set measures speed, not accuracy.

  python benchmarks/ijb_set.py --out=/tmp/ijb20k --images=20000
  python benchmarks/ijb_set.py --out=/tmp/ijbfull --images=469375 --templates=23124 \
      --meta_only --features     # full-size meta plus an .npz of 512-d features

``--features`` writes ``features.npz`` (``embeddings`` [N, 512] float32: the subject's centre
plus noise) for ``python -m unitsface_jax.evaluate --protocol=ijb --features=...``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pathlib
import time

import numpy as np
from PIL import Image, ImageFilter

N_IMAGES, N_TEMPLATES, N_GALLERY, N_PROBE, N_PAIRS = 469_375, 23_124, 3_531, 19_593, 15_658_489
SOURCE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "eval" / "ijbc_mini"


def layout(n_images: int, n_templates: int | None = None, seed: int = 0) -> dict:
  """Templates, media, subjects, pairs and 1:N lists of an IJB-C-shaped set (arrays)."""
  rng = np.random.default_rng(seed)
  n_t = n_templates or max(4, round(n_images * N_TEMPLATES / N_IMAGES))
  if n_images < n_t:
    raise ValueError(f"{n_images} images cannot fill {n_t} templates")
  n_gal = max(2, round(n_t * N_GALLERY / N_TEMPLATES))
  n_probe = n_t - n_gal
  tids = np.sort(rng.choice(max(10 * n_t, 200_000), n_t, replace=False)) + 1
  subject = np.concatenate([np.arange(n_gal), rng.integers(0, n_gal, n_probe)])
  weights = rng.pareto(1.2, n_t) + 1.0
  extra = rng.multinomial(n_images - n_t, weights / weights.sum())
  per_t = 1 + extra
  t_of_img = np.repeat(np.arange(n_t), per_t)
  # Media: each image is a still (own media) or a frame of one of the template's videos.
  video = rng.integers(0, 3, n_images)
  still = rng.random(n_images) < 0.4
  media_key = np.where(still, 3 * n_t + np.arange(n_images), 3 * t_of_img + video)
  _, medias = np.unique(media_key, return_inverse=True)
  medias = medias + 10_000
  # 1:1: each probe against its mate and a random share of the other gallery templates.
  k = min(n_gal - 1, max(1, round((N_PAIRS / N_PROBE - 1) * n_gal / N_GALLERY)))
  probes = np.arange(n_gal, n_t)
  mate = subject[probes]
  # k + 1 consecutive entries of one random order of the gallery from a random start; the
  # mate is dropped if drawn, else the last entry.
  order = rng.permutation(n_gal)
  window = order[(rng.integers(0, n_gal, n_probe)[:, None] + np.arange(k + 1)) % n_gal]
  drop = np.where((window == mate[:, None]).any(1), (window == mate[:, None]).argmax(1), k)
  keep = np.ones_like(window, bool)
  keep[np.arange(n_probe), drop] = False
  nonmates = window[keep].reshape(n_probe, k)
  g = np.concatenate([mate[:, None], nonmates], axis=1)
  p = np.repeat(probes[:, None], k + 1, axis=1)
  pairs = np.stack([tids[g.ravel()], tids[p.ravel()],
                    (g == mate[:, None]).ravel().astype(np.int64)], axis=1)
  return {"tids": tids, "subject": subject, "t_of_img": t_of_img, "medias": medias,
          "n_gallery": n_gal, "pairs": pairs}


def _sources():
  rows = [ln.split("\t") for ln in (SOURCE / "source_map.tsv").read_text().splitlines()[1:]]
  person = {r[0]: int(r[4]) for r in rows}
  lmk = {}
  for line in (SOURCE / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines():
    if line.strip():
      name, *values = line.split()
      lmk[name] = np.array(values[:10], float).reshape(5, 2)
  by_person: dict[int, list[str]] = {}
  for name in lmk:  # file order
    by_person.setdefault(person[name], []).append(name)
  return by_person, lmk


_BY_PERSON, _LMK, _IMAGES = None, None, {}


def _image(name: str) -> Image.Image:
  if name not in _IMAGES:
    _IMAGES[name] = Image.open(SOURCE / "loose_crop" / name).convert("RGB")
  return _IMAGES[name]


def make_image(i: int, subject: int, seed: int) -> tuple[bytes, np.ndarray]:
  """JPEG bytes and [5, 2] landmarks of image ``i`` (deterministic in (seed, i))."""
  global _BY_PERSON, _LMK
  if _BY_PERSON is None:
    _BY_PERSON, _LMK = _sources()
  rng = np.random.default_rng([seed, 1, i])
  people = sorted(_BY_PERSON)
  choices = _BY_PERSON[people[subject % len(people)]]
  name = choices[rng.integers(len(choices))]
  face = _image(name)
  long_side = float(np.exp(rng.uniform(np.log(80), np.log(1000))))
  aspect = rng.uniform(0.75, 1.33)
  w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
  w, h = max(32, int(w)), max(32, int(h))
  everyone = sorted(_LMK)
  background = _image(everyone[rng.integers(len(everyone))])
  canvas = background.resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(3))
  # The face's 250-px frame covers 0.6-1.1 of the short side, turned by up to 15 degrees,
  # centred anywhere that keeps the landmarks inside.
  scale = rng.uniform(0.6, 1.1) * min(w, h) / 250.0
  angle = np.deg2rad(rng.uniform(-15, 15))
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  centre = np.array([w, h]) * rng.uniform(0.4, 0.6, 2)
  shift = centre - rot @ np.array([125.0, 125.0])
  inverse = np.linalg.inv(np.vstack([np.c_[rot, shift], [0, 0, 1]]))[:2]
  warped = face.transform((w, h), Image.AFFINE, inverse.ravel().tolist(), Image.BILINEAR)
  mask = Image.new("L", face.size, 255).transform((w, h), Image.AFFINE,
                                                   inverse.ravel().tolist(), Image.BILINEAR)
  canvas.paste(warped, (0, 0), mask)
  buf = io.BytesIO()
  canvas.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
  landmarks = _LMK[name] @ rot.T + shift + rng.uniform(-1, 1, (5, 2))
  return buf.getvalue(), landmarks


def _write_images(args) -> np.ndarray:
  folder, first, subjects, seed = args
  out = np.empty((len(subjects), 5, 2))
  for j, subject in enumerate(subjects):
    data, out[j] = make_image(first + j, int(subject), seed)
    (pathlib.Path(folder) / f"{first + j + 1}.jpg").write_bytes(data)
  return out


def write_set(out: str | os.PathLike, n_images: int, n_templates: int | None = None, *,
              meta_only: bool = False, features: bool = False, seed: int = 0,
              workers: int | None = None) -> dict:
  """Writes the set under ``out/IJBC`` and returns its counts."""
  root = pathlib.Path(out) / "IJBC"
  (root / "meta").mkdir(parents=True, exist_ok=True)
  lay = layout(n_images, n_templates, seed)
  tids, t_of_img, subject = lay["tids"], lay["t_of_img"], lay["subject"]
  img_subject = subject[t_of_img]
  names = [f"{i + 1}.jpg" for i in range(n_images)]
  rng = np.random.default_rng([seed, 0, 1])
  faceness = np.round(rng.uniform(0.5, 1.0, n_images), 3)
  if meta_only:
    landmarks = np.tile(np.array([[101.3, 119.2], [148.5, 119.0], [125.0, 146.1],
                                  [105.6, 173.7], [144.7, 173.5]]), (n_images, 1, 1))
  else:
    folder = root / "loose_crop"
    folder.mkdir(exist_ok=True)
    step = 500
    jobs = [(str(folder), a, img_subject[a:a + step], seed) for a in range(0, n_images, step)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:  # in this process (a caller that has started JAX must not fork)
      landmarks = np.concatenate([_write_images(job) for job in jobs])
    else:
      with multiprocessing.get_context("fork").Pool(workers) as pool:
        landmarks = np.concatenate(pool.map(_write_images, jobs))
  t = "ijbc"
  with open(root / "meta" / f"{t}_face_tid_mid.txt", "w") as f:
    f.writelines(f"{n} {tids[ti]} {m}\n" for n, ti, m in zip(names, t_of_img, lay["medias"]))
  with open(root / "meta" / f"{t}_name_5pts_score.txt", "w") as f:
    f.writelines(f"{n} {' '.join(f'{v:.3f}' for v in lm.ravel())} {s:.3f}\n"
                 for n, lm, s in zip(names, landmarks, faceness))
  pairs = lay["pairs"]
  with open(root / "meta" / f"{t}_template_pair_label.txt", "w") as f:
    for a in range(0, len(pairs), 1 << 20):
      f.write("".join(f"{x} {y} {z}\n" for x, y, z in pairs[a:a + (1 << 20)].tolist()))
  n_gal = lay["n_gallery"]
  gal = t_of_img < n_gal
  half = t_of_img < n_gal // 2
  lists = {"gallery_G1": gal & half, "gallery_G2": gal & ~half, "probe_mixed": ~gal}
  for kind, sel in lists.items():
    with open(root / "meta" / f"{t}_1N_{kind}.csv", "w") as f:
      f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
      f.writelines(f"{tids[ti]},{s + 1},{n}\n" for ti, s, n, keep in
                   zip(t_of_img, img_subject, names, sel) if keep)
  if features:
    centres = rng.standard_normal((n_gal, 512), dtype=np.float32)
    emb = centres[img_subject]
    emb += 4.0 * rng.standard_normal(emb.shape, dtype=np.float32)
    np.savez(root / "features.npz", embeddings=emb)
  return {"images": n_images, "templates": int(tids.size), "gallery": int(n_gal),
          "pairs": int(len(pairs)), "genuine": int(pairs[:, 2].sum())}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="the set goes to OUT/IJBC")
  ap.add_argument("--images", type=int, default=20_000)
  ap.add_argument("--templates", type=int, default=None,
                  help="default: images x 23,124 / 469,375")
  ap.add_argument("--meta_only", action="store_true", help="meta files only, no JPEGs")
  ap.add_argument("--features", action="store_true", help="also write features.npz")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workers", type=int, default=None,
                  help="processes writing JPEGs (default: one per CPU core)")
  args = ap.parse_args()
  start = time.perf_counter()
  counts = write_set(args.out, args.images, args.templates, meta_only=args.meta_only,
                     features=args.features, seed=args.seed, workers=args.workers)
  print(f"wrote {pathlib.Path(args.out) / 'IJBC'}: {counts} in "
        f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
