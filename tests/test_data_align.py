"""Five-point alignment: Umeyama similarity and the bilinear warp, against real IJB-C crops."""

import numpy as np
import pytest
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


def _reference_warp(image, matrix, size):
  """Float64 bilinear warp by explicit loops, cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT=0)
  semantics: output pixel (x, y) reads the source at inverse(matrix) @ (x, y, 1), pixel
  centres at integer coordinates, neighbours outside the source count as 0."""
  (a, b, tx), (c, d, ty) = np.asarray(matrix, np.float64)
  det = a * d - b * c
  src = np.asarray(image, np.float64)
  src = src[:, :, None] if src.ndim == 2 else src
  h, w = src.shape[:2]

  def pixel(y, x):
    return src[y, x] if 0 <= y < h and 0 <= x < w else np.zeros(src.shape[2])

  out = np.zeros((size[0], size[1], src.shape[2]))
  for y in range(size[0]):
    for x in range(size[1]):
      # The inverse of [[a, b], [c, d]] applied to (x - tx, y - ty).
      sx = (d * (x - tx) - b * (y - ty)) / det
      sy = (-c * (x - tx) + a * (y - ty)) / det
      x0, y0 = int(np.floor(sx)), int(np.floor(sy))
      fx, fy = sx - x0, sy - y0
      out[y, x] = ((1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1))
                   + fy * ((1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)))
  return out[:, :, 0] if np.ndim(image) == 2 else out


def _rotation(degrees, centre_src, centre_dst, scale=1.0):
  """The forward 2x3 matrix rotating by ``degrees`` about ``centre_src`` onto ``centre_dst``."""
  t = np.deg2rad(degrees)
  rot = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  return np.c_[rot, np.asarray(centre_dst) - rot @ np.asarray(centre_src)]


# A non-square 37x53 source (rows x columns) into square and non-square outputs.
_WARPS = {
    "rot17": (_rotation(17, (26, 18), (47.5, 55.5), scale=1.8), (112, 96)),
    "rot-17_scaled": (_rotation(-17, (26, 18), (30, 40), scale=1.3), (64, 80)),
    "rot90": (_rotation(90, (26, 18), (40, 30)), (60, 70)),
    "rot135": (_rotation(135, (20, 10), (56, 56), scale=2.0), (112, 112)),
    "scale_translate": (np.array([[1.9, 0.0, 4.3], [0.0, 2.6, -7.6]]), (112, 96)),
    "swap_xy": (np.array([[0.0, 1.0, 2.5], [1.0, 0.0, -1.25]]), (60, 40)),
    "shear": (np.array([[1.1, 0.35, -3.0], [-0.2, 0.9, 6.0]]), (50, 70)),
}


@pytest.mark.parametrize("name", sorted(_WARPS))
def test_warp_equals_float64_bilinear_reference(name):
  matrix, size = _WARPS[name]
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (37, 53, 3))
  got = align.warp_affine(image, matrix, size)
  want = _reference_warp(image, matrix, size)
  assert got.shape == (*size, 3) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
  # Most of the output samples the source and some of it the border.
  assert 0.3 < np.count_nonzero(want) / want.size < 0.95
  # Grey images and uint8 (rounded to nearest, like cv2) take the same path.
  np.testing.assert_allclose(align.warp_affine(image[:, :, 1], matrix, size), want[:, :, 1],
                             rtol=0, atol=1e-9)
  u8 = image.astype(np.uint8)
  got, want = align.warp_affine(u8, matrix, size), _reference_warp(u8, matrix, size)
  assert got.dtype == np.uint8
  # Values within rounding error of a .5 tie may round either way; all others to nearest.
  clear = np.abs(want - np.floor(want) - 0.5) > 1e-9
  np.testing.assert_array_equal(got[clear], np.rint(want[clear]))
  assert np.abs(got.astype(float) - want).max() <= 0.5 + 1e-9


def test_warp_entirely_inside_the_source_equals_the_reference():
  """The path that gathers without border checks (every neighbour inside the image)."""
  matrix = _rotation(23, (26, 18), (15, 12), scale=0.9)
  image = np.random.default_rng(1).integers(0, 256, (37, 53, 3)).astype(np.uint8)
  want = _reference_warp(image, matrix, (24, 30))
  assert np.count_nonzero(want) == want.size
  got = align.warp_affine(image, matrix, (24, 30))
  clear = np.abs(want - np.floor(want) - 0.5) > 1e-9
  np.testing.assert_array_equal(got[clear], np.rint(want[clear]))
  np.testing.assert_array_equal(align.warp_affine(image[:, :, 2], matrix, (24, 30)),
                                got[:, :, 2])


def test_an_empty_source_or_output_is_all_border():
  matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  assert not align.warp_affine(np.zeros((0, 5, 3), np.uint8), matrix, (4, 4)).any()
  assert align.warp_affine(np.ones((5, 5), np.uint8), matrix, (0, 4)).shape == (0, 4)


def test_quarter_turn_and_axis_swap_are_pixel_permutations():
  """Matrices that map the pixel grid onto itself move pixels without blending."""
  image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  h, w = image.shape[:2]
  # dst (x, y) = (y, w - 1 - x): counter-clockwise quarter turn, output w x h.
  turned = align.warp_affine(image, [[0, 1, 0], [-1, 0, w - 1]], (w, h))
  np.testing.assert_array_equal(turned, np.rot90(image))
  swapped = align.warp_affine(image, [[0, 1, 0], [1, 0, 0]], (w, h))
  np.testing.assert_array_equal(swapped, image.transpose(1, 0, 2))
  # A half-pixel shift blends neighbours equally; the last column blends with the 0 border.
  half = align.warp_affine(image.astype(np.float64), [[1, 0, -0.5], [0, 1, 0]], (h, w))
  np.testing.assert_allclose(half[:, :-1], (image[:, :-1] + image[:, 1:].astype(float)) / 2)
  np.testing.assert_allclose(half[:, -1], image[:, -1] / 2)
