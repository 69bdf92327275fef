"""Five-point face alignment to the ArcFace 112x112 template, in NumPy.

A similarity transform (rotation, uniform scale, translation) is fitted from five detected
landmarks (eyes, nose tip, mouth corners) to the ArcFace template by least squares (Umeyama,
"Least-squares estimation of transformation parameters between two point patterns", PAMI 1991,
the estimate skimage's ``SimilarityTransform`` computes and insightface ``utils/face_align.py``
``estimate_norm`` uses), then the image is warped with bilinear interpolation like
``cv2.warpAffine(..., INTER_LINEAR, borderValue=0)`` (pixel centres at integer coordinates).
OpenCV is not needed.
"""

from __future__ import annotations

import functools

import numpy as np

# insightface recognition/arcface_torch (utils/face_align.py ``arcface_dst``), for 112x112.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float64)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

  Args:
    src: [N, 2] points.
    dst: [N, 2] points.

  Returns:
    The 2x3 matrix ``M`` with ``dst ~= M @ [x, y, 1]``.
  """
  src = np.asarray(src, dtype=np.float64)
  dst = np.asarray(dst, dtype=np.float64)
  n = src.shape[0]
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  cov = dst_c.T @ src_c / n
  u, s, vt = np.linalg.svd(cov)
  # Reflection guard (Umeyama eq. 39): force a proper rotation.
  d = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    d[-1] = -1.0
  rotation = u @ np.diag(d) @ vt
  src_var = (src_c ** 2).sum() / n
  scale = (s * d).sum() / src_var if src_var > 0 else 1.0
  matrix = np.empty((2, 3))
  matrix[:, :2] = scale * rotation
  matrix[:, 2] = dst_mean - scale * rotation @ src_mean
  return matrix


def estimate_transform(landmarks, image_size: int = 112) -> np.ndarray:
  """The 2x3 similarity taking five landmarks to the ArcFace template for ``image_size``.

  Sizes other than 112 scale the template, as insightface's ``estimate_norm`` does for
  multiples of 112 (and of 128, with its 8-pixel x shift).
  """
  landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
  if image_size % 112 == 0:
    template = ARCFACE_TEMPLATE * (image_size / 112.0)
  elif image_size % 128 == 0:
    template = ARCFACE_TEMPLATE * (image_size / 128.0) + np.array([8.0 * image_size / 128.0,
                                                                   0.0])
  else:
    raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
  return umeyama(landmarks, template)


@functools.lru_cache(maxsize=8)
def _output_grid(height: int, width: int) -> np.ndarray:
  grid = np.mgrid[0:height, 0:width].astype(np.float64)
  grid.flags.writeable = False
  return grid


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Warps ``image`` by the 2x3 forward ``matrix`` into an output of (height, width) ``size``.

  Bilinear sampling at the inverse-mapped pixel centres; outside the source is 0.
  """
  height, width = size
  image = np.asarray(image)
  squeeze = image.ndim == 2
  src = image[:, :, None] if squeeze else image
  full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
  inverse = np.linalg.inv(full)[:2]
  ys, xs = _output_grid(height, width)
  sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  x0, y0 = np.floor(sx).astype(np.int64).ravel(), np.floor(sy).astype(np.int64).ravel()
  fx, fy = sx.ravel() - x0, sy.ravel() - y0
  h, w = src.shape[:2]
  if h == 0 or w == 0 or height == 0 or width == 0:  # nothing to sample: all border
    out = np.zeros((height, width, src.shape[2]), image.dtype)
    return out[:, :, 0] if squeeze else out
  flat = np.ascontiguousarray(src).reshape(h * w, src.shape[2])
  # The four neighbours of each sample are gathered straight from the source (a 112x112
  # crop of a 1000x1000 photo reads 50k of its pixels, and nothing is copied or widened
  # beforehand); a neighbour outside the image is 0, as cv2's borderValue=0.
  inside = (y0.min() >= 0 and y0.max() + 1 < h and x0.min() >= 0 and x0.max() + 1 < w)
  base = y0 * w + x0

  def corner(dy: int, dx: int) -> np.ndarray:
    if inside:
      values = np.take(flat, base + (dy * w + dx), axis=0)
    else:
      yy, xx = y0 + dy, x0 + dx
      valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      values = np.take(flat, np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1), axis=0)
      values = np.where(valid[:, None], values, np.zeros((), values.dtype))
    # Channels first: the arithmetic below then runs over long contiguous rows.
    return values.T.astype(np.float64, order="C")

  gx, gy = 1 - fx, 1 - fy
  # c00 (1-fx)(1-fy) + c01 fx (1-fy) + c10 (1-fx) fy + c11 fx fy, left to right, in place.
  out = corner(0, 0)
  out *= gx
  out *= gy
  for dy, dx, wx, wy in ((0, 1, fx, gy), (1, 0, gx, fy), (1, 1, fx, fy)):
    term = corner(dy, dx)
    term *= wx
    term *= wy
    out += term
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    out = np.clip(np.rint(out, out=out), info.min, info.max, out=out)
  out = np.ascontiguousarray(out.astype(image.dtype).T).reshape(height, width, src.shape[2])
  return out[:, :, 0] if squeeze else out


def align_face(image: np.ndarray, landmarks, image_size: int = 112) -> np.ndarray:
  """Aligns a face: five landmarks ([5, 2], x then y, in ``image`` pixels) -> square crop."""
  matrix = estimate_transform(landmarks, image_size)
  return warp_affine(image, matrix, (image_size, image_size))


def center_crop(image: np.ndarray, image_size: int = 112) -> np.ndarray:
  """The central 150/250 of an unaligned LFW-style image, scaled to ``image_size``.

  On centred 250x250 LFW faces this approximates ``align_face`` with the template mapped into
  the 250x250 frame (shared/data/formats/README.md, "LFW -> 112x112"); for pairs lists over
  image folders without landmarks.
  """
  h, w = np.asarray(image).shape[:2]
  side = min(h, w) * 150.0 / 250.0
  s = image_size / side
  x0, y0 = (w - side) / 2.0, (h - side) / 2.0
  matrix = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s]])
  return warp_affine(image, matrix, (image_size, image_size))
