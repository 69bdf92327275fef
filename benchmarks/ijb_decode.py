r"""IJB decode and align: this package's grain workers against insightface's loop, same files.

On a set written by ``benchmarks/ijb_set.py`` (written here first when ``--data`` has none),
with the JPEGs read once beforehand so that every row reads them from the page cache:

  ours, N workers  ``ijb.aligned_crops(..., workers=N)``: grain worker processes, each
                   decoding (libjpeg-turbo via simplejpeg, EXIF orientation applied) and
                   aligning (``data.align``) whole batches of 64; the crops are drained.
                   Reported over the whole run and after the first batch (the workers'
                   start-up, about 2 s of importing grain and JAX, excluded).
  insightface      the per-image loop of insightface recognition/arcface_torch/eval_ijbc.py
                   restated from its description: ``cv2.imread``, skimage
                   ``SimilarityTransform().estimate`` to the ArcFace template,
                   ``cv2.warpAffine`` to 112x112 (border 0), BGR to RGB, and the flipped copy
                   stacked beside it, in one process.
  cache write/read ``aligned_crops(..., workers=N, cache_dir=...)`` twice: the first run
                   decodes and writes the crop cache, the second reads it.

It also reports how far our crops are from cv2's on the first 512 images (mean and largest
absolute difference in grey levels). opencv-python-headless and scikit-image are needed for
the insightface row only (``pip install opencv-python-headless scikit-image``).

  python benchmarks/ijb_decode.py --data=/tmp/ijb20k --images=20000

The last line is JSON with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ijb_set  # pylint: disable=g-import-not-at-top,wrong-import-position

from unitsface_jax.data import align  # pylint: disable=wrong-import-position
from unitsface_jax.evaluation import ijb  # pylint: disable=wrong-import-position


def ours(root: pathlib.Path, meta, workers: int, cache_dir=None
         ) -> tuple[float, float, np.ndarray]:
  """(seconds in all, seconds to the first batch, the first batch): the steady rate is
  the images after the first batch over the time after it (worker start-up excluded)."""
  start = time.perf_counter()
  n, first, first_s = 0, None, 0.0
  for batch in ijb.aligned_crops(root, meta, workers=workers, cache_dir=cache_dir):
    if first is None:
      first, first_s = batch.copy(), time.perf_counter() - start
    n += batch.shape[0]
  seconds = time.perf_counter() - start
  assert n == meta.image_names.size, n
  return seconds, first_s, first


def _cv2_crop(path: pathlib.Path, landmarks: np.ndarray) -> np.ndarray:
  """eval_ijbc.py's per-image work up to the RGB crop: cv2.imread, skimage's similarity
  estimate to the ArcFace template, cv2.warpAffine (border 0), BGR to RGB."""
  import cv2  # pylint: disable=g-import-not-at-top
  from skimage import transform  # pylint: disable=g-import-not-at-top
  img = cv2.imread(str(path))
  tform = transform.SimilarityTransform()
  tform.estimate(landmarks.astype(np.float32), align.ARCFACE_TEMPLATE.astype(np.float32))
  crop = cv2.warpAffine(img, tform.params[0:2, :], (112, 112), borderValue=0.0)
  return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def insightface_loop(root: pathlib.Path, meta) -> float:
  """The loop, with the flipped copy stacked beside each crop as eval_ijbc.py does."""
  start = time.perf_counter()
  for name, lmk in zip(meta.image_names, meta.landmarks):
    crop = _cv2_crop(root / "loose_crop" / name, lmk)
    blob = np.zeros((2, 3, 112, 112), np.uint8)
    blob[0] = np.transpose(crop, (2, 0, 1))
    blob[1] = np.transpose(np.fliplr(crop), (2, 0, 1))
  return time.perf_counter() - start


def cv2_difference(root: pathlib.Path, meta, crops: np.ndarray) -> tuple[float, int]:
  d = np.stack([np.abs(_cv2_crop(root / "loose_crop" / meta.image_names[i],
                                 meta.landmarks[i]).astype(int) - crops[i].astype(int))
                for i in range(crops.shape[0])])
  return float(d.mean()), int(d.max())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="folder holding IJBC/ (written if missing)")
  ap.add_argument("--images", type=int, default=20_000, help="images when writing the set")
  ap.add_argument("--workers", default="1,2", help="worker counts to time")
  ap.add_argument("--cache_dir", default=None, help="crop cache folder (default: a temp dir)")
  ap.add_argument("--no_insightface", action="store_true", help="skip the cv2 rows")
  args = ap.parse_args()
  root = pathlib.Path(args.data) / "IJBC"
  if not (root / "meta").exists():
    print(f"writing the set: {ijb_set.write_set(args.data, args.images)}", flush=True)
  meta = ijb.read_meta(root, "IJBC")
  n = meta.image_names.size
  size = sum(p.stat().st_size for p in (root / "loose_crop").iterdir())
  for p in (root / "loose_crop").iterdir():  # into the page cache
    p.read_bytes()
  res = {"images": n, "jpeg_mb": size / 1e6, "cpus": os.cpu_count()}
  first = None
  for w in [int(x) for x in args.workers.split(",")]:
    seconds, first_s, first = ours(root, meta, w)
    steady = (n - first.shape[0]) / (seconds - first_s)
    res[f"ours_{w}w_img_s"], res[f"ours_{w}w_steady_img_s"] = n / seconds, steady
    res[f"ours_{w}w_startup_s"] = first_s
    print(f"ours, {w} worker(s): {n / seconds:8.1f} img/s ({seconds:.1f} s); after the first "
          f"batch ({first_s:.1f} s) {steady:.1f} img/s", flush=True)
  if not args.no_insightface:
    seconds = insightface_loop(root, meta)
    res["insightface_img_s"] = n / seconds
    print(f"insightface loop:    {n / seconds:8.1f} img/s ({seconds:.1f} s)", flush=True)
    sample = np.concatenate([b for _, b in zip(range(8), ijb.aligned_crops(root, meta))])
    res["cv2_mean_abs_diff"], res["cv2_max_abs_diff"] = cv2_difference(root, meta, sample)
    print(f"vs cv2 on {sample.shape[0]} crops: mean |diff| {res['cv2_mean_abs_diff']:.3f}, "
          f"max {res['cv2_max_abs_diff']} grey levels", flush=True)
  w = max(int(x) for x in args.workers.split(","))
  tmp = tempfile.mkdtemp() if args.cache_dir is None else args.cache_dir
  try:
    write_s, _, a = ours(root, meta, w, cache_dir=tmp)
    read_s, _, b = ours(root, meta, w, cache_dir=tmp)
    assert np.array_equal(a, b)
    res.update(cache_write_s=write_s, cache_read_s=read_s,
               cache_gb=sum(p.stat().st_size for p in pathlib.Path(tmp).iterdir()) / 1e9)
    print(f"cache, {w} workers: first run {write_s:.1f} s (writing "
          f"{res['cache_gb']:.2f} GB), second run {read_s:.1f} s", flush=True)
  finally:
    if args.cache_dir is None:
      shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
