"""5-point face alignment for the evaluation protocols (private to ``evaluation``).

insightface aligns a face by the similarity transform that maps its 5 landmarks onto the
ArcFace 112x112 template (Umeyama's least-squares estimate, as ``skimage``'s
``SimilarityTransform.estimate`` in ``eval_ijbc.py``), then warps with bilinear sampling and
a black border (``cv2.warpAffine``). This is a NumPy version of both, kept here until the
data package's alignment lands, so that evaluation needs neither OpenCV nor scikit-image.
"""

from __future__ import annotations

import numpy as np

# insightface eval_ijbc.py: the 96x112 template shifted right by 8 px for a 112x112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 similarity (rotation, uniform scale, translation) best mapping src onto dst.

  Umeyama, "Least-squares estimation of transformation parameters between two point
  patterns", PAMI 1991, eqs. 34-43 (with the reflection guard of eq. 39).
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s0, d0 = src - mu_s, dst - mu_d
  cov = d0.T @ s0 / src.shape[0]
  u, sig, vt = np.linalg.svd(cov)
  sign = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[-1] = -1
  rot = u @ np.diag(sign) @ vt
  var_s = (s0 ** 2).sum() / src.shape[0]
  scale = (sig * sign).sum() / var_s
  t = mu_d - scale * rot @ mu_s
  return np.concatenate([scale * rot, t[:, None]], axis=1)


def warp_affine(img: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """dst(x, y) = img(M^-1 (x, y)) with bilinear sampling and 0 outside (cv2 convention).

  Args:
    img: [H, W, C] uint8.
    m: 2x3 forward matrix (source -> destination pixel coordinates).
    size: (height, width) of the output.
  """
  full = np.vstack([m, [0.0, 0.0, 1.0]])
  inv = np.linalg.inv(full)[:2]
  h, w = size
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  x0 = np.floor(sx).astype(np.int64)
  y0 = np.floor(sy).astype(np.int64)
  fx = (sx - x0)[..., None]
  fy = (sy - y0)[..., None]
  src = img.astype(np.float32)
  ih, iw = img.shape[:2]

  def tap(yy, xx):
    inside = ((yy >= 0) & (yy < ih) & (xx >= 0) & (xx < iw))[..., None]
    return np.where(inside, src[np.clip(yy, 0, ih - 1), np.clip(xx, 0, iw - 1)], 0.0)

  out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
         + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def norm_crop(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
  """Aligns ``img`` by its 5 landmarks ([5, 2], x then y) to the ArcFace template."""
  template = ARCFACE_TEMPLATE * (image_size / 112.0)
  return warp_affine(img, similarity_transform(landmarks, template), (image_size, image_size))


def center_crop(img: np.ndarray, image_size: int = 112) -> np.ndarray:
  """The central 150/250 of an unaligned LFW image scaled to ``image_size``.

  On centred 250x250 LFW faces this is what ``norm_crop`` gives with the template mapped
  into the 250x250 frame (shared/data/formats/README.md, "LFW -> 112x112").
  """
  h, w = img.shape[:2]
  side = min(h, w) * 150.0 / 250.0
  s = image_size / side
  x0, y0 = (w - side) / 2.0, (h - side) / 2.0
  m = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s]])
  return warp_affine(img, m, (image_size, image_size))
