"""The bundled ORL demo set: a RecordIO training set and a verification .bin, small enough."""

import pickle

import numpy as np
import simplejpeg

from unitsface_jax.data import demo, sources


def test_demo_training_set():
  src = sources.RecordIOSource(demo.demo_path())
  assert (len(src), src.num_classes, src.header_first) == (320, 40, True)
  labels = np.array([src[i]["label"] for i in range(len(src))])
  np.testing.assert_array_equal(np.bincount(labels), np.full(40, 8))
  image = simplejpeg.decode_jpeg(src[0]["image"], colorspace="RGB")
  assert image.shape == (112, 112, 3)


def test_demo_verification_bin_and_size():
  with open(demo.demo_bin_path(), "rb") as f:
    bins, issame = pickle.load(f)
  assert len(bins) == 2 * len(issame) == 160 and sum(issame) == 40
  assert simplejpeg.decode_jpeg(bins[0]).shape == (112, 112, 3)
  train = sources.RecordIOSource(demo.demo_path())
  held_out = {bytes(b) for b in bins}
  assert not held_out & {train[i]["image"] for i in range(len(train))}
  total = sum(p.stat().st_size for p in demo.demo_path().iterdir())
  assert total <= 3 * 1024 * 1024
