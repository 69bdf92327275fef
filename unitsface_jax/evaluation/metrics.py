"""ROC maths shared by the protocols: TAR at fixed FAR, and ROC points for plots.

The reading of TAR at a FAR follows insightface ``recognition/arcface_torch/eval_ijbc.py``:
build the ROC of ``sklearn.metrics.roc_curve(labels, scores)``, flip it so the largest TPR
comes first at equal FPR, and take the TPR of the point whose FPR is nearest the target.
Here the ROC is computed from one sort (of packed score-label keys for float32 scores), in
memory linear in the number of pairs, so tens of millions of pairs need no sklearn and no
pair loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc(scores: np.ndarray, labels: np.ndarray, drop_intermediate: bool = True
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The ROC: one point per distinct score, plus the (0, 0) start.

  Equals ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)``: a pair is
  accepted when its score is >= the threshold, thresholds descend. Dropping the collinear
  points changes which point is nearest a target FAR, so TAR readings depend on it; the
  default matches eval_ijbc.py, which calls roc_curve with its defaults.

  Args:
    scores: [P] similarity (higher means same identity).
    labels: [P] 1/True for genuine pairs, 0/False for impostors.
    drop_intermediate: drop points collinear with their neighbours (sklearn's default).

  Returns:
    ``(fpr, tpr, thresholds)``, float64, float64 and the score dtype.
  """
  scores = np.asarray(scores).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"ROC needs genuine and impostor pairs; got {n_pos} and {n_neg}")
  sorted_scores, sorted_labels = _sort_descending(scores, labels)
  # 32-bit counts where they fit: half the memory traffic over tens of millions of pairs.
  count = np.int32 if scores.size < 2**31 else np.int64
  tps_all = np.cumsum(sorted_labels, dtype=count)
  del sorted_labels
  # The last index of each run of equal scores closes one threshold.
  last = np.flatnonzero(np.diff(sorted_scores)) if sorted_scores.size > 1 else np.zeros(0, int)
  last = np.append(last, sorted_scores.size - 1).astype(count)
  tps = tps_all[last]
  del tps_all
  fps = last - tps
  fps += 1
  if drop_intermediate and fps.size > 2:
    # sklearn _ranking.roc_curve: keep the ends and every point where the slope changes
    # (a non-zero second difference: two successive first differences that differ).
    step_f, step_t = np.diff(fps), np.diff(tps)
    turn = step_f[1:] != step_f[:-1]
    turn |= step_t[1:] != step_t[:-1]
    del step_f, step_t
    keep = np.flatnonzero(np.r_[True, turn, True])
    last, tps, fps = last[keep], tps[keep], fps[keep]
  fpr = np.concatenate([[0.0], fps / n_neg])
  tpr = np.concatenate([[0.0], tps / n_pos])
  thresholds = np.concatenate([[np.inf], sorted_scores[last]]).astype(
      np.result_type(sorted_scores.dtype, np.float32))
  return fpr, tpr, thresholds


def _sort_descending(scores: np.ndarray, labels: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """``scores`` in descending order and ``labels`` in the same order; ties in any order.

  The ROC reads only the last position of each run of equal scores, so the order inside a
  run does not matter. For float32 (or narrower) scores, each label rides in the lowest
  mantissa bit of the score's exact float64 value: a float32 widened to float64 has 29 zero
  low bits, so the packed keys order as the scores do and differ within a tie only by the
  label. One SIMD ``np.sort`` of those keys replaces an argsort and two gathers: 15.7M IJB-C
  scores sort in 0.2 s instead of 2-4 s (benchmarks/ijb.py).
  """
  # An infinite score with the bit set would read as NaN: those take the argsort.
  if scores.dtype.kind == "f" and scores.dtype.itemsize <= 4 and np.isfinite(scores).all():
    keys = scores.astype(np.float64)
    keys.view(np.uint64)[...] |= labels.view(np.uint8).astype(np.uint64)
    keys.sort()
    bits = keys.view(np.uint64)[::-1]
    sorted_labels = (bits & np.uint64(1)).astype(bool)
    bits &= ~np.uint64(1)
    return keys[::-1].astype(scores.dtype), sorted_labels
  order = np.argsort(scores, kind="stable")[::-1]
  return scores[order], labels[order]


def read_tar_at_far(fpr: np.ndarray, tpr: np.ndarray,
                    fars: Sequence[float] = IJB_FARS) -> np.ndarray:
  """TPR at the ROC point whose FPR is nearest each target (eval_ijbc.py's reading).

  ``eval_ijbc.py`` flips the ascending ROC and takes the first minimum of |fpr - far|; in
  ascending order that is the LAST minimum, the highest TPR among equally near points.
  """
  fpr = np.asarray(fpr, np.float64)
  out = np.empty(len(fars))
  for i, far in enumerate(fars):
    dist = np.abs(fpr - far)
    out[i] = tpr[np.flatnonzero(dist == dist.min())[-1]]
  return out


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = IJB_FARS,
               drop_intermediate: bool = True) -> np.ndarray:
  """TAR at each FAR in ``fars`` for similarity ``scores`` of pairs with ``labels``."""
  fpr, tpr, _ = roc(scores, labels, drop_intermediate)
  return read_tar_at_far(fpr, tpr, fars)


def tar_at_far_from_top_impostors(genuine: np.ndarray, top_impostors: np.ndarray,
                                  num_impostors: int, far: float) -> float:
  """TAR at ``far`` when only the highest impostor scores are kept (MegaFace-sized sets).

  With distinct scores, the ROC has one point per count k of accepted impostors, at FPR
  k / num_impostors; the nearest to ``far`` is k = round(far * num_impostors) (ties to the
  larger k, as :func:`read_tar_at_far`), and its best TPR accepts every genuine score above
  the (k+1)-th highest impostor. ``top_impostors`` must hold at least the k+1 highest.

  Args:
    genuine: [G] genuine scores.
    top_impostors: the highest impostor scores, any order.
    num_impostors: the total number of impostor pairs.
    far: target false accept rate.
  """
  exact = far * num_impostors
  k = int(np.floor(exact + 0.5))
  top = np.sort(np.asarray(top_impostors, np.float64))[::-1]
  if k >= num_impostors:
    return float(np.mean(np.asarray(genuine) >= top[-1])) if num_impostors else 1.0
  if top.size < k + 1:
    raise ValueError(f"need the {k + 1} highest impostor scores, got {top.size}")
  return float(np.mean(np.asarray(genuine, np.float64) > top[k]))


def roc_for_plot(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 2000,
                 min_fpr: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
  """Thins an ROC to about ``max_points`` points, log-spaced in FPR, keeping the envelope."""
  fpr = np.asarray(fpr)
  if fpr.size <= max_points:
    return fpr, np.asarray(tpr)
  grid = np.unique(np.concatenate([[0.0], np.logspace(np.log10(min_fpr), 0, max_points)]))
  # The highest TPR at or below each grid FPR (the ROC is monotone, so this is a step read).
  idx = np.searchsorted(fpr, grid, side="right") - 1
  idx = np.unique(idx[idx >= 0])
  return fpr[idx], np.asarray(tpr)[idx]
