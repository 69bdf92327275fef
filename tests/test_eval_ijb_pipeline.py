"""IJB images to crops in grain workers, the crop cache, the benchmark set and the command line.

The set comes from ``benchmarks/ijb_set.py`` (real LFW faces placed on IJB-like canvases), the
model from tests/data/checkpoint_v0 (IResNet-18, width 4).
"""

import json
import shutil

import numpy as np
import pytest

import command_lines
from benchmarks import ijb_set
from unitsface_jax.data import DataError, align, loose_crops, pixels
from unitsface_jax.evaluation import extract, ijb


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  """120 images in 6 templates, written in this process."""
  out = tmp_path_factory.mktemp("ijbset")
  counts = ijb_set.write_set(out, 120, 6, workers=1)
  return out / "IJBC", counts


def _direct_crops(root, meta):
  """Each image decoded and aligned on its own, by the functions the workers call."""
  return np.stack([align.align_face(pixels.decode_image(
      (root / "loose_crop" / n).read_bytes(), exif=True), lm)
                   for n, lm in zip(meta.image_names, meta.landmarks)])


def test_the_benchmark_set_has_ijbc_shape(small_set):
  root, counts = small_set
  meta = ijb.read_meta(root, "IJBC")
  assert meta.image_names.size == 120 and np.unique(meta.templates).size == 6
  g_t, g_s = meta.gallery
  p_t, p_s = meta.probe
  assert counts["gallery"] == np.unique(g_t).size == 2 and np.unique(p_t).size == 4
  # Every probe template meets its mate once and the same number of non-mates.
  subject = {**dict(zip(g_t, g_s)), **dict(zip(p_t, p_s))}
  for t in np.unique(p_t):
    rows = meta.pair_t2 == t
    assert meta.pair_label[rows].sum() == 1
    mate = meta.pair_t1[rows][meta.pair_label[rows] == 1][0]
    assert subject[mate] == subject[t]
    assert all(subject[g] != subject[t] for g in meta.pair_t1[rows][meta.pair_label[rows] == 0])
  assert counts["pairs"] == meta.pair_t1.size and counts["genuine"] == 4
  for name, lm in zip(meta.image_names[:20], meta.landmarks[:20]):
    h, w, _ = pixels.decode_image((root / "loose_crop" / name).read_bytes()).shape
    assert 32 <= max(h, w) <= 1000 and (lm >= 0).all() and (lm[:, 0] < w).all()
  # Deterministic: the same seed writes the same bytes.
  lay = ijb_set.layout(120, 6, seed=0)
  data, lm = ijb_set.make_image(7, int(lay["subject"][lay["t_of_img"][7]]), seed=0)
  assert data == (root / "loose_crop" / "8.jpg").read_bytes()
  np.testing.assert_allclose(lm, meta.landmarks[7], atol=1e-3)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_crops_from_workers_equal_the_direct_alignment(small_set, workers):
  root, _ = small_set
  meta = ijb.read_meta(root)
  batches = list(ijb.aligned_crops(root, meta, batch_size=32, workers=workers))
  assert [b.shape[0] for b in batches] == [32, 32, 32, 24]
  np.testing.assert_array_equal(np.concatenate(batches), _direct_crops(root, meta))


def test_the_crop_cache_is_read_instead_of_the_images(small_set, tmp_path):
  root, _ = small_set
  copy = tmp_path / "IJBC"
  shutil.copytree(root, copy)
  meta = ijb.read_meta(copy)
  cache = tmp_path / "cache"
  want = _direct_crops(copy, meta)
  first = np.concatenate(list(ijb.aligned_crops(copy, meta, batch_size=50, cache_dir=cache)))
  (path,) = list(cache.iterdir())
  assert path.name.startswith("ijbc_120_112_") and path.suffix == ".npy"
  np.testing.assert_array_equal(np.load(path), want)
  # The images are gone: the second run reads the cache.
  shutil.rmtree(copy / "loose_crop")
  again = np.concatenate(list(ijb.aligned_crops(copy, meta, batch_size=50, cache_dir=cache)))
  np.testing.assert_array_equal(first, want)
  np.testing.assert_array_equal(again, want)
  # Other landmarks are another cache file; with the images gone it cannot be made.
  meta.landmarks[0, 0, 0] += 1
  assert loose_crops.cache_path(cache, meta.image_names, meta.landmarks, prefix="ijbc") != path
  with pytest.raises(FileNotFoundError, match="loose_crop"):
    list(ijb.aligned_crops(copy, meta, cache_dir=cache))
  assert list(cache.iterdir()) == [path]  # the failed run left no partial file


def test_a_damaged_cache_is_rebuilt_and_an_interrupted_one_is_not_kept(small_set, tmp_path):
  root, _ = small_set
  meta = ijb.read_meta(root)
  cache = tmp_path / "cache"
  want = _direct_crops(root, meta)
  crops = ijb.aligned_crops(root, meta, batch_size=50, cache_dir=cache)
  next(crops)
  crops.close()  # the caller stopped after one batch
  assert list(cache.iterdir()) == []
  list(ijb.aligned_crops(root, meta, cache_dir=cache))
  (path,) = list(cache.iterdir())
  path.write_bytes(path.read_bytes()[:-100])  # truncated
  got = np.concatenate(list(ijb.aligned_crops(root, meta, cache_dir=cache)))
  np.testing.assert_array_equal(got, want)
  assert path.stat().st_size == 128 + want.nbytes  # written again, whole


@pytest.mark.slow  # starts grain worker processes
def test_an_undecodable_image_in_a_worker_is_named(small_set, tmp_path):
  root, _ = small_set
  copy = tmp_path / "IJBC"
  shutil.copytree(root, copy)
  (copy / "loose_crop" / "77.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  meta = ijb.read_meta(copy)
  with pytest.raises(DataError, match="77.jpg"):
    list(ijb.aligned_crops(copy, meta, batch_size=16, workers=2))


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  shutil.copytree(data_dir / "checkpoint_v0" / "checkpoints", workdir / "checkpoints")
  return workdir


@pytest.mark.slow  # a command line with grain worker processes
def test_the_command_line_evaluates_the_set_with_workers_and_the_cache(
    small_set, run_dir, tmp_path, capsys):
  """Two runs of --protocol=ijb over the images: the first decodes in two workers and
  writes the cache, the second reads it; both show one progress bar and give the numbers
  of the library on the same model."""
  from unitsface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  root, _ = small_set
  cache = tmp_path / "cache"
  results = []
  for run in range(2):
    out = tmp_path / f"out{run}"
    status = command_lines.run_main(
        "unitsface_jax.evaluate", "--protocol=ijb", f"--data={root}",
        f"--workdir={run_dir}", "--batch_size=16", "--decode_workers=2",
        f"--crop_cache={cache}", f"--out={out}")
    err = capsys.readouterr().err
    assert status == 0
    # One bar (one line of carriage-return updates) from 0 to all 120 images, with a rate.
    bars = [line for line in err.split("\n") if "img/s" in line or "it/s" in line]
    assert len(bars) == 1 and "0/120" in bars[0] and "120/120" in bars[0], err[-2000:]
    results.append(json.loads((out / "ijb.json").read_text()))
  assert len(list(cache.iterdir())) == 1
  assert results[0] == results[1]
  _, model = checkpoint.backbone_from_workdir(run_dir)
  want = ijb.evaluate(extract.nnx_apply_fn(model), root, batch_size=16, progress=False)
  got = results[0]
  assert got["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
  assert got["identification"]["rank1"] == want["identification"]["rank1"]


def test_images_and_crop_cache_on_gcs(gcs, data_dir):
  """An IJB folder and its crop cache in gs:// (the GCS server on 127.0.0.1): the first run
  reads the images from the bucket and uploads the cache, the second streams the cache."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  local = data_dir / "eval" / "ijbc_mini"
  root = epath.Path("gs://test/ijb_pipeline/IJBC")
  for path in sorted(local.rglob("*")):
    if path.is_file():
      (root / path.relative_to(local)).parent.mkdir(parents=True, exist_ok=True)
      (root / path.relative_to(local)).write_bytes(path.read_bytes())
  meta = ijb.read_meta(root)
  want = _direct_crops(local, meta)
  cache = epath.Path("gs://test/ijb_pipeline/cache")
  first = np.concatenate(list(ijb.aligned_crops(root, meta, batch_size=48, cache_dir=cache)))
  (path,) = list(cache.iterdir())
  for image in (root / "loose_crop").iterdir():
    image.unlink()
  again = np.concatenate(list(ijb.aligned_crops(root, meta, batch_size=48, cache_dir=cache)))
  np.testing.assert_array_equal(first, want)
  np.testing.assert_array_equal(again, want)
  assert path.stat().length == 128 + want.nbytes


def test_a_model_error_leaves_no_partial_cache_while_its_traceback_is_kept(small_set, tmp_path):
  root, _ = small_set
  cache = tmp_path / "cache"

  def broken(images):
    raise RuntimeError("model failed")

  with pytest.raises(RuntimeError, match="model failed") as kept:
    ijb.evaluate(broken, root, batch_size=16, cache_dir=cache, progress=False)
  assert kept.value is not None  # the exception (and its traceback) is still referenced
  assert list(cache.iterdir()) == []
