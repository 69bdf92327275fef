"""IJB-B / IJB-C: template-based 1:1 verification and 1:N identification.

The protocol is insightface ``recognition/arcface_torch/eval_ijbc.py`` (1:1) and
``recognition/_evaluation_/ijb/ijb_1n.py`` (1:N), on the ``IJB_release/IJB{B,C}`` layout:
``meta/<t>_face_tid_mid.txt`` (image, template, media), ``meta/<t>_name_5pts_score.txt``
(image, 5 landmarks, faceness), ``meta/<t>_template_pair_label.txt`` (tid1, tid2, label),
``loose_crop/<image>``, and for 1:N ``meta/<t>_1N_gallery_{G1,G2|S1,S2}.csv`` and
``meta/<t>_1N_probe_mixed.csv``. Image features follow the N/D/F switches (keep the norm,
weight by faceness, add the flipped image's feature); a template is the sum over its media
of the mean over each media's images, L2-normalised; a pair's score is the cosine.

Scoring is vectorised: template features are pooled by one sparse matrix product, pair
scores are read from one matrix product over the templates that the pairs use, and the ROC
comes from one SIMD sort (``metrics.roc``), so 15.7M IJB-C pairs take about a second and
bounded memory (benchmarks/ijb.py, BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from etils import epath

from unitsface_jax import errors
from unitsface_jax.data import loose_crops
from unitsface_jax.evaluation import extract, metrics


@dataclasses.dataclass
class IJBMeta:
  """The meta files of one IJB target, as arrays in file order."""
  target: str
  image_names: np.ndarray  # [N] str
  templates: np.ndarray  # [N] int64 template id of each image
  medias: np.ndarray  # [N] int64 media id of each image
  landmarks: np.ndarray  # [N, 5, 2] float32
  faceness: np.ndarray  # [N] float32
  pair_t1: np.ndarray  # [P] int64
  pair_t2: np.ndarray  # [P] int64
  pair_label: np.ndarray  # [P] int8
  gallery: tuple[np.ndarray, np.ndarray] | None = None  # (templates, subjects)
  probe: tuple[np.ndarray, np.ndarray] | None = None


class MetaError(errors.UserError, ValueError):
  """An IJB meta file the protocol cannot read; names the file (and the line)."""


def _load(path: epath.Path, dtype, columns: Sequence[int], **kw) -> np.ndarray:
  """Numeric ``columns`` of a meta file (NumPy's C parser: IJB-C's 15.66M pairs in ~1 s)."""
  try:
    with path.open("r") as f:
      # No comment character: IJB file names may hold '#'.
      return np.loadtxt(f, dtype=dtype, usecols=columns, ndmin=2, comments=None, **kw)
  except ValueError as e:  # UnicodeDecodeError included
    raise MetaError(f"{path}: {e}") from None


def _first_column(path: epath.Path) -> np.ndarray:
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise MetaError(f"{path}: {e}") from None
  return np.array([ln.split(None, 1)[0] for ln in text.splitlines() if ln.strip()])


def _read_1n_csv(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  # ijb_1n.py: header line, comma separated, TEMPLATE_ID and SUBJECT_ID first.
  ids = _load(path, np.int64, (0, 1), delimiter=",", skiprows=1)
  return ids[:, 0], ids[:, 1]


def read_meta(root: str | epath.PathLike, target: str = "IJBC") -> IJBMeta:
  """Reads the meta files of ``root`` (an ``IJB_release/IJBC``-style folder).

  Raises:
    MetaError: a meta file has a malformed line (named), or the image lists disagree.
    OSError: a meta file is missing.
  """
  if target not in ("IJBB", "IJBC"):
    raise ValueError(f"target must be IJBB or IJBC, got {target!r}")
  meta = epath.Path(root) / "meta"
  t = target.lower()
  tid_mid_path = meta / f"{t}_face_tid_mid.txt"
  lmk_path = meta / f"{t}_name_5pts_score.txt"
  names = _first_column(tid_mid_path)
  ids = _load(tid_mid_path, np.int64, (1, 2))
  values = _load(lmk_path, np.float32, range(1, 12))
  if len(names) != len(values):
    raise MetaError(f"{meta}: {len(names)} images in tid_mid, {len(values)} in 5pts_score")
  # eval_ijbc.py reads the two files in parallel by line; check that they agree.
  if (names != _first_column(lmk_path)).any():
    raise MetaError(f"{meta}: tid_mid and 5pts_score list images in different orders")
  pairs = _load(meta / f"{t}_template_pair_label.txt", np.int64, (0, 1, 2))
  gallery = probe = None
  g_names = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
  g_paths = [meta / f"{t}_1N_gallery_{g}.csv" for g in g_names]
  p_path = meta / f"{t}_1N_probe_mixed.csv"
  if all(p.exists() for p in g_paths) and p_path.exists():
    parts = [_read_1n_csv(p) for p in g_paths]
    gallery = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    probe = _read_1n_csv(p_path)
  return IJBMeta(
      target=target, image_names=names, templates=ids[:, 0], medias=ids[:, 1],
      landmarks=values[:, :10].reshape(-1, 5, 2), faceness=values[:, 10],
      pair_t1=pairs[:, 0], pair_t2=pairs[:, 1], pair_label=pairs[:, 2].astype(np.int8),
      gallery=gallery, probe=probe)


def aligned_crops(root: str | epath.PathLike, meta: IJBMeta, *, batch_size: int = 64,
                  image_size: int = 112, workers: int = 0, threads: int = 4,
                  cache_dir: str | epath.PathLike | None = None) -> Iterator[np.ndarray]:
  """Yields uint8 [<=batch_size, S, S, 3] crops of ``loose_crop`` images in meta order.

  Decoded (EXIF orientation applied, as cv2.imread) and aligned by the meta's landmarks in
  ``workers`` grain processes (0: ``threads`` threads here), or read from the crop cache in
  ``cache_dir`` (``data.loose_crops``) when an earlier run wrote it.
  """
  return loose_crops.cached_aligned_batches(
      epath.Path(root) / "loose_crop", meta.image_names, meta.landmarks, cache_dir=cache_dir,
      cache_prefix=meta.target.lower(), batch_size=batch_size, image_size=image_size,
      workers=workers, threads=threads)


def image_features(emb: np.ndarray, emb_flip: np.ndarray | None, faceness: np.ndarray, *,
                   use_norm_score: bool = True, use_detector_score: bool = True,
                   use_flip_test: bool = True) -> np.ndarray:
  """eval_ijbc.py's N/D/F switches applied to raw image features.

  F1: f(x) + f(flip x); N0: L2-normalise each image (N1 keeps the norm as a quality
  weight); D1: multiply by the detector's faceness score.
  """
  feats = np.asarray(emb, np.float32)
  if use_flip_test:
    if emb_flip is None:
      raise ValueError("use_flip_test needs the flipped features")
    feats = feats + emb_flip
  if not use_norm_score:
    feats = extract.l2_normalize(feats)
  if use_detector_score:
    feats = feats * np.asarray(faceness, np.float32)[:, None]
  return feats


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray, *,
                      image_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pools image features into L2-normalised template features (eval_ijbc.py pooling).

  template = sum over its media of (mean of that media's images). Each image therefore
  enters with weight 1 / (images of its (template, media)), so the pooling is one sparse
  [templates x images] matrix times the features (scipy CSR, float32): one pass over the
  features, no sort and no weighted copy (IJB-C's 469k x 512 in 0.1 s).

  Args:
    feats: [N, D] image features.
    templates, medias: [N] ids of each image.
    image_weights: optional [N] per-image factor (D1's faceness), folded into the matrix.

  Returns:
    ``(unique_templates, template_feats)``: sorted ids [T] and float32 [T, D].
  """
  import scipy.sparse  # pylint: disable=g-import-not-at-top  (0.2 s; IJB only)
  templates = np.asarray(templates, np.int64)
  medias = np.asarray(medias, np.int64)
  unique_t, t_idx = np.unique(templates, return_inverse=True)
  _, m_idx = np.unique(medias, return_inverse=True)
  # One int64 key per (template, media): 1-D unique is much faster than unique(axis=0).
  _, tm_idx, tm_count = np.unique(t_idx.astype(np.int64) * (int(m_idx.max()) + 1) + m_idx,
                                  return_inverse=True, return_counts=True)
  weight = (1.0 / tm_count[tm_idx]).astype(np.float32)
  if image_weights is not None:
    weight = weight * np.asarray(image_weights, np.float32)
  pool = scipy.sparse.csr_array((weight, (t_idx, np.arange(t_idx.size))),
                                shape=(unique_t.size, t_idx.size))
  pooled = pool @ np.asarray(feats, np.float32)
  norm = np.sqrt(np.einsum("ij,ij->i", pooled, pooled, dtype=np.float64))
  # sklearn normalize semantics (extract.l2_normalize): a zero template stays zero.
  return unique_t, (pooled / np.maximum(norm, 1e-12)[:, None]).astype(np.float32)


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, t1: np.ndarray,
                t2: np.ndarray, *, memory_bytes: int = 1 << 30) -> np.ndarray:
  """Cosine scores of template pairs, in bounded memory.

  When the pairs cover much of the grid of (first-side x second-side) templates they use,
  as IJB-B/C's do (every probe template against most gallery templates), the grid is one
  matrix product (BLAS; IJB-C: 3,531 x 19,593 x 512, 71 GFLOP, 277 MB) and each pair reads
  its entry, with the side the pair list is grouped by as the grid's rows; grids over
  ``memory_bytes`` are computed in row blocks. Sparse pair lists
  gather the two rows and dot them instead.

  Args:
    template_feats: [T, D] L2-normalised template features.
    unique_templates: [T] sorted template ids of the rows.
    t1, t2: [P] template ids.
    memory_bytes: budget for one block of the score grid.

  Returns:
    float32 [P] scores.
  """
  feats = np.asarray(template_feats, np.float32)
  if np.shape(t1) != np.shape(t2):
    raise ValueError(f"{np.size(t1)} first and {np.size(t2)} second templates: one of each "
                     "per pair")
  if np.size(t1) == 0:
    return np.zeros(0, np.float32)
  rows_of = _RowLookup(unique_templates)
  r1, r2 = rows_of(t1), rows_of(t2)
  if np.count_nonzero(r1[1:] != r1[:-1]) > np.count_nonzero(r2[1:] != r2[:-1]):
    # Pairs listed by their second template: that side indexes the grid's rows, so that
    # consecutive pairs read one row (a cosine is symmetric; on IJB-C-sized sets 2.4x
    # faster to gather).
    r1, r2 = r2, r1
  used1 = np.bincount(r1, minlength=unique_templates.size) > 0
  used2 = np.bincount(r2, minlength=unique_templates.size) > 0
  rows1, rows2 = np.flatnonzero(used1), np.flatnonzero(used2)
  n1, n2 = rows1.size, rows2.size
  scores = np.empty(r1.size, np.float32)
  if r1.size / (n1 * n2) < 0.02:
    step = max(1, memory_bytes // (8 * feats.shape[1] * 4))
    for a in range(0, r1.size, step):
      scores[a:a + step] = np.einsum("ij,ij->i", feats[r1[a:a + step]], feats[r2[a:a + step]])
    return scores
  # Position of each template among the used rows and columns of the grid.
  index = np.int32 if n1 * n2 < 2**31 else np.int64
  pos_of1 = np.cumsum(used1, dtype=index) - 1
  pos_of2 = np.cumsum(used2, dtype=index) - 1
  cols_t = np.ascontiguousarray(feats[rows2].T)
  rows_per_block = max(1, memory_bytes // (4 * n2))
  if rows_per_block >= n1:
    grid = (feats[rows1] @ cols_t).ravel()
    # Pairs in chunks whose index temporaries stay in the CPU cache: fresh 60-MB arrays
    # cost more in page faults than the gathers themselves.
    step = min(r1.size, _CHUNK)
    flat, other = np.empty(step, index), np.empty(step, index)
    for a in range(0, r1.size, step):
      n = min(step, r1.size - a)
      np.take(pos_of1, r1[a:a + n], out=flat[:n])
      flat[:n] *= n2
      flat[:n] += np.take(pos_of2, r2[a:a + n], out=other[:n])
      np.take(grid, flat[:n], out=scores[a:a + n])
    return scores
  pos1, pos2 = pos_of1[r1], pos_of2[r2]
  del r1, r2
  block = pos1 // rows_per_block
  n_blocks = int(block.max()) + 1
  # Few blocks: a stable sort on the small block index groups the pairs in linear time.
  order = np.argsort(block.astype(np.uint16 if n_blocks < 65536 else np.int64), kind="stable")
  bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
  for b in range(n_blocks):
    sel = order[bounds[b]:bounds[b + 1]]
    if sel.size == 0:
      continue
    lo = b * rows_per_block
    grid = feats[rows1[lo:lo + rows_per_block]] @ cols_t
    scores[sel] = grid[pos1[sel] - lo, pos2[sel]]
  return scores


_CHUNK = 1 << 18  # pairs per step of the index arithmetic (1 MB temporaries)


class _RowLookup:
  """Maps template ids to their rows in sorted ``unique_templates``.

  A dense table over the id range when it is compact (IJB-C's ids are below 200,000), so
  15.7M pair ids map in one gather instead of a binary search each; ``searchsorted``
  otherwise. Ids without a row raise, naming one.
  """

  def __init__(self, unique_templates: np.ndarray):
    self.ids = np.asarray(unique_templates, np.int64)
    self.lo = int(self.ids[0]) if self.ids.size else 0
    span = int(self.ids[-1]) - self.lo + 1 if self.ids.size else 0
    self.table = None
    if 0 < span <= 16 * self.ids.size + (1 << 20):
      self.table = np.full(span, -1, np.int32)
      self.table[self.ids - self.lo] = np.arange(self.ids.size, dtype=np.int32)

  def __call__(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
      return np.zeros(0, np.int32)
    if self.table is not None and ids.min() >= self.lo and ids.max() < self.lo + self.table.size:
      rows = np.empty(ids.size, np.int32)
      step = min(ids.size, _CHUNK)
      offset = np.empty(step, np.int64)
      for a in range(0, ids.size, step):
        n = min(step, ids.size - a)
        np.subtract(ids[a:a + n], self.lo, out=offset[:n])
        np.take(self.table, offset[:n], out=rows[a:a + n])
      bad = rows < 0 if rows.min() < 0 else np.zeros(0, bool)
    elif self.table is not None:
      offset = ids - self.lo
      inside = (offset >= 0) & (offset < self.table.size)
      rows = self.table[np.where(inside, offset, 0)]
      bad = ~inside | (rows < 0)
    else:
      rows = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
      bad = self.ids[rows] != ids
    if bad.any():
      raise ValueError(f"{int(bad.sum())} pairs name templates without images, e.g. "
                       f"{ids[np.flatnonzero(bad)[0]]}")
    return rows


def verification_metrics(scores: np.ndarray, labels: np.ndarray,
                         fars: Sequence[float] = metrics.IJB_FARS) -> dict:
  """TAR at each FAR (eval_ijbc.py's table), the AUC, and ROC points for the plot."""
  fpr, tpr, _ = metrics.roc(scores, labels)
  tars = metrics.read_tar_at_far(fpr, tpr, fars)
  plot_fpr, plot_tpr = metrics.roc_for_plot(fpr, tpr)
  return {"tar_at_far": {f"{far:g}": float(t) for far, t in zip(fars, tars)},
          "auc": float(np.trapezoid(tpr, fpr)), "num_pairs": int(np.size(scores)),
          "roc_fpr": plot_fpr, "roc_tpr": plot_tpr}


def identification_metrics(template_feats: np.ndarray, unique_templates: np.ndarray,
                           gallery: tuple[np.ndarray, np.ndarray],
                           probe: tuple[np.ndarray, np.ndarray],
                           fpirs: Sequence[float] = (0.01, 0.1)) -> dict:
  """1:N closed-set rank-k and TPIR at FPIR, as ijb_1n.py ``evaluation`` computes them.

  Gallery and probe are (template ids, subject ids); each subject must have one gallery
  template. TPIR@FPIR: the threshold is the ceil(n_probe * FPIR)-th highest non-mated
  similarity over all probe x gallery pairs; TPIR is the share of mated scores above it.
  """
  g_t, g_s = gallery
  p_t, p_s = probe
  g_t, first = np.unique(g_t, return_index=True)
  g_s = g_s[first]
  p_t, first = np.unique(p_t, return_index=True)
  p_s = p_s[first]
  subj, counts = np.unique(g_s, return_counts=True)
  if (counts != 1).any():
    raise ValueError("each gallery subject needs exactly one template")
  mate = np.searchsorted(subj, p_s)
  mate = np.minimum(mate, subj.size - 1)
  if (subj[mate] != p_s).any():
    raise ValueError("a probe subject has no gallery template")
  gal_row = np.argsort(g_s)[mate]  # gallery row of each probe's mate
  rows_of = _RowLookup(unique_templates)
  gf = template_feats[rows_of(g_t)]
  pf = template_feats[rows_of(p_t)]
  sim = pf @ gf.T
  n_probe = p_t.size
  mated = sim[np.arange(n_probe), gal_row].copy()
  # Rank of the mate: how many gallery entries score strictly higher, plus one.
  rank = (sim > mated[:, None]).sum(1) + 1
  res = {f"rank{k}": float(np.mean(rank <= k)) for k in (1, 5, 10)}
  sim[np.arange(n_probe), gal_row] = -np.inf
  nonmated = sim.ravel()
  need = [int(np.ceil(n_probe * f)) for f in fpirs]
  kmax = min(max(need), nonmated.size)
  top = np.sort(np.partition(nonmated, nonmated.size - kmax)[-kmax:])[::-1]
  res["tpir_at_fpir"] = {f"{f:g}": float(np.mean(mated > top[min(k, kmax) - 1]))
                         for f, k in zip(fpirs, need)}
  res["num_probes"], res["num_gallery"] = n_probe, int(g_t.size)
  return res


def evaluate_features(meta: IJBMeta, emb: np.ndarray, emb_flip: np.ndarray | None, *,
                      use_norm_score: bool = True, use_detector_score: bool = True,
                      use_flip_test: bool = True) -> dict:
  """1:1 (and 1:N when its meta files exist) from raw image features in meta order.

  Each stage's time is logged (absl INFO).
  """
  start = time.perf_counter()
  feats = image_features(emb, emb_flip, meta.faceness, use_norm_score=use_norm_score,
                         use_detector_score=False, use_flip_test=use_flip_test)
  unique_t, tfeats = template_features(
      feats, meta.templates, meta.medias,
      image_weights=meta.faceness if use_detector_score else None)
  del feats
  pooled = time.perf_counter()
  scores = pair_scores(tfeats, unique_t, meta.pair_t1, meta.pair_t2)
  scored = time.perf_counter()
  res = {"target": meta.target, "mode": _mode(use_norm_score, use_detector_score,
                                              use_flip_test),
         "verification": verification_metrics(scores, meta.pair_label)}
  done = time.perf_counter()
  logging.info("%s: %d images pooled into %d templates in %.2f s; %d pairs scored in %.2f s; "
               "ROC and TAR@FAR in %.2f s", meta.target, meta.image_names.size, unique_t.size,
               pooled - start, scores.size, scored - pooled, done - scored)
  if meta.gallery is not None and meta.probe is not None:
    res["identification"] = identification_metrics(tfeats, unique_t, meta.gallery, meta.probe)
    logging.info("%s: 1:N (%d probes, %d gallery templates) in %.2f s", meta.target,
                 res["identification"]["num_probes"], res["identification"]["num_gallery"],
                 time.perf_counter() - done)
  return res


def _mode(n: bool, d: bool, f: bool) -> str:
  return f"N{int(n)}D{int(d)}F{int(f)}"


def evaluate(apply_fn: extract.ApplyFn, root: str | epath.PathLike, target: str = "IJBC", *,
             batch_size: int = 128, use_norm_score: bool = True, use_detector_score: bool = True,
             use_flip_test: bool = True, workers: int = 0,
             cache_dir: str | epath.PathLike | None = None, progress: bool = True) -> dict:
  """Aligns, embeds and scores an IJB folder with ``apply_fn``.

  Args:
    apply_fn: the backbone as a pure function (``extract.nnx_apply_fn``).
    root: the ``IJB_release/IJBC``-style folder (local or gs://).
    target: IJBB or IJBC.
    batch_size: embedding batch.
    use_norm_score, use_detector_score, use_flip_test: eval_ijbc.py's N, D, F switches.
    workers: decode-and-align processes (0: threads in this process).
    cache_dir: where aligned crops are cached for the next evaluation (None: no cache).
    progress: one progress bar over the images (rate and time left).
  """
  meta = read_meta(root, target)
  # Closed on any exit: an error in the model must not leave the decode workers, or a
  # partial cache file, alive for as long as its traceback is kept.
  with contextlib.closing(aligned_crops(root, meta, batch_size=batch_size, workers=workers,
                                        cache_dir=cache_dir)) as crops:
    emb, emb_flip = extract.extract_raw(apply_fn, crops, num_images=meta.image_names.size,
                                        batch_size=batch_size, flip=use_flip_test,
                                        desc=target, progress=progress)
  return evaluate_features(meta, emb, emb_flip, use_norm_score=use_norm_score,
                           use_detector_score=use_detector_score, use_flip_test=use_flip_test)
