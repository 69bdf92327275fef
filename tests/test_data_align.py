"""Five-point alignment: Umeyama similarity and the bilinear warp, against real IJB-C crops."""

import numpy as np
import simplejpeg
from hypothesis import given, settings, strategies as st

from unitsface_jax.data import align, sources

# ijbc_mini landmarks (all images): the ArcFace template mapped into 250x250 by 50 + p*150/112.
IJBC_LANDMARKS = np.array([101.287, 119.236, 148.480, 118.975, 125.034, 146.076, 105.646,
                           173.704, 144.728, 173.488]).reshape(5, 2)


@settings(max_examples=50, deadline=None)
@given(st.floats(-np.pi, np.pi), st.floats(0.2, 5.0), st.floats(-100, 100),
       st.floats(-100, 100))
def test_umeyama_recovers_a_similarity(angle, scale, tx, ty):
  c, s = scale * np.cos(angle), scale * np.sin(angle)
  matrix = np.array([[c, -s, tx], [s, c, ty]])
  src = align.ARCFACE_TEMPLATE
  dst = src @ matrix[:, :2].T + matrix[:, 2]
  np.testing.assert_allclose(align.umeyama(src, dst), matrix, atol=1e-6 * max(1, scale) * 100)


def test_reflected_points_still_give_a_rotation():
  mirrored = align.ARCFACE_TEMPLATE * np.array([-1.0, 1.0])
  matrix = align.umeyama(mirrored, align.ARCFACE_TEMPLATE)
  assert np.linalg.det(matrix[:, :2]) > 0


def test_ijbc_landmarks_give_the_centre_crop_transform():
  s = 112 / 150
  np.testing.assert_allclose(align.estimate_transform(IJBC_LANDMARKS),
                             [[s, 0, -50 * s], [0, s, -50 * s]], atol=2e-3)


def test_warp_identity_and_shift():
  image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
  np.testing.assert_array_equal(align.warp_affine(image, np.eye(3)[:2], (5, 6)), image)
  shifted = align.warp_affine(image, [[1, 0, 1], [0, 1, 0]], (5, 6))  # dst x = src x + 1
  np.testing.assert_array_equal(shifted[:, 1:], image[:, :-1])
  assert (shifted[:, 0] == 0).all()


def test_aligned_loose_crop_matches_mxnet_record(data_dir):
  """ijbc_mini/27.jpg (= Andre_Agassi_0002) aligned by its five points equals record 32 of
  lfw62_112 (made with cv2.warpAffine, then JPEG) to within the README's tolerance."""
  loose = simplejpeg.decode_jpeg((data_dir / "ijbc_mini" / "27.jpg").read_bytes(),
                                 colorspace="RGB")
  aligned = align.align_face(loose, IJBC_LANDMARKS)
  record = sources.RecordIOSource(data_dir / "lfw62_112_head4")[31]
  assert record["label"] == 3
  reference = simplejpeg.decode_jpeg(record["image"], colorspace="RGB")
  assert aligned.shape == (112, 112, 3)
  assert np.abs(aligned.astype(int) - reference).mean() < 3.0
