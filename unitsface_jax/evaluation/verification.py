"""1:1 verification sets: insightface ``.bin`` files, LFW ``pairs.txt``, and k-fold accuracy.

The protocol is insightface ``recognition/arcface_torch/eval/verification.py``: embeddings
f(x) + f(flip x), L2-normalised; squared L2 distance between the two faces of a pair; a pair
is "same" when the distance is below a threshold from 0, 0.01, ..., 3.99; 10 folds in file
order; the threshold with the best accuracy on 9 folds (first maximum) is applied to the
10th; accuracy is the mean over folds and std the population std. XNorm is the mean L2 norm
of the raw embeddings of both orientations.

The ``.bin`` files are pickles, and a pickle can run any function it names. ``load_bin``
first walks every opcode of the stream and admits only those that build bytes, str, numbers,
bools, lists and tuples (and the memo references that share repeated images); only then is
the stream unpickled, by an unpickler that cannot resolve any global.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image

from unitsface_jax import errors
from unitsface_jax.evaluation import extract, metrics
from unitsface_jax.data import align, pixels

# Opcodes that build only the admitted types or move data between stack, mark and memo.
# Everything else (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST, OBJ, NEWOBJ*, EXT*, PERSID*,
# dicts, sets, buffers, None) is refused before any object is built.
_SAFE_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "NEWTRUE", "NEWFALSE",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
})

LFW_THRESHOLDS = np.arange(0, 4, 0.01)


class UnsafePickleError(errors.UserError, pickle.UnpicklingError):
  """A pickle holds an opcode outside the data-only allow-list (it could run code)."""


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Second line of defence: no global can be resolved, so nothing can be called."""

  def find_class(self, module, name):
    raise UnsafePickleError(f"pickle asks for global {module}.{name}; refused")

  def persistent_load(self, pid):
    raise UnsafePickleError("pickle asks for a persistent id; refused")


def check_pickle(data: bytes, source: str = "pickle") -> None:
  """Raises UnsafePickleError if ``data`` has any opcode that is not data-only.

  ``pickletools.genops`` only parses; it builds no object and calls nothing.
  """
  try:
    for opcode, _, pos in pickletools.genops(io.BytesIO(data)):
      if opcode.name not in _SAFE_OPCODES:
        raise UnsafePickleError(
            f"{source}: opcode {opcode.name} at byte {pos} could build an object or call a "
            "function; verification .bin files hold only bytes/str, lists, tuples, bools and "
            "numbers, so this file is refused")
  except UnsafePickleError:
    raise
  except Exception as e:  # A stream genops cannot parse is not a pickle we accept either.
    raise pickle.UnpicklingError(f"{source}: not a readable pickle ({e})") from e


def safe_loads(data: bytes, source: str = "pickle"):
  """Unpickles data-only pickles; Python 2 ``str`` comes back as ``bytes``.

  ``encoding='bytes'`` is insightface's fallback branch for Python 2 files; it changes
  nothing for Python 3 files (their images are already ``bytes``).
  """
  check_pickle(data, source)
  return _NoGlobalsUnpickler(io.BytesIO(data), encoding="bytes").load()


def read_bin(path: str | epath.PathLike) -> tuple[list[bytes], np.ndarray]:
  """The raw content of an insightface verification ``.bin``: encoded images and labels.

  Returns:
    ``(bins, issame)``: 2N encoded images (pair i is bins[2i], bins[2i+1]) and [N] bool.
  """
  path = epath.Path(path)
  obj = safe_loads(path.read_bytes(), str(path))
  if not (isinstance(obj, tuple) and len(obj) == 2):
    raise ValueError(f"{path}: expected a (bins, issame_list) tuple, got {type(obj).__name__}")
  bins, issame = obj
  bins = [b.encode("latin-1") if isinstance(b, str) else b for b in bins]
  if not all(isinstance(b, bytes) for b in bins):
    raise ValueError(f"{path}: image entries must be bytes")
  issame = np.asarray(issame, dtype=bool)
  if len(bins) != 2 * issame.size:
    raise ValueError(f"{path}: {len(bins)} images for {issame.size} pairs")
  return bins, issame


def decode_image(data: bytes, image_size: int = 112, *, name: str = "") -> np.ndarray:
  """Decodes one encoded image to uint8 RGB [image_size, image_size, 3].

  ``pixels.decode_image`` decodes (JPEG by libjpeg-turbo, anything else by Pillow); a size
  other than ``image_size`` is resized with its short side to ``image_size`` and centre-cropped
  (insightface uses mx.image.resize_short).

  Raises:
    DataError: undecodable bytes; the message names ``name``.
  """
  return _fit(pixels.decode_image(data, name=name), image_size)


def _fit(img: np.ndarray, image_size: int) -> np.ndarray:
  h, w = img.shape[:2]
  if (h, w) == (image_size, image_size):
    return img
  scale = image_size / min(h, w)
  pil = Image.fromarray(img).resize((max(image_size, round(w * scale)),
                                     max(image_size, round(h * scale))), Image.BILINEAR)
  img = np.asarray(pil)
  top = (img.shape[0] - image_size) // 2
  left = (img.shape[1] - image_size) // 2
  return img[top:top + image_size, left:left + image_size]


@dataclasses.dataclass
class VerificationSet:
  """A decoded verification set: images [2N, H, W, 3] uint8 and issame [N] bool."""
  name: str
  images: np.ndarray
  issame: np.ndarray


def load_bin(path: str | epath.PathLike, image_size: int = 112,
             name: str | None = None) -> VerificationSet:
  """Loads an insightface ``.bin`` (Python 2 or 3 pickle) into decoded images.

  Raises:
    UnsafePickleError: the pickle could build arbitrary objects; nothing was called.
    DataError: an image is undecodable; the message names it as ``<path>[<index>]``.
  """
  path = epath.Path(path)
  bins, issame = read_bin(path)
  images = np.empty((len(bins), image_size, image_size, 3), np.uint8)
  decoded: dict[int, np.ndarray] = {}
  for i, b in enumerate(bins):
    # Memoised pickles share one bytes object per repeated image: decode it once.
    key = id(b)
    if key not in decoded:
      decoded[key] = decode_image(b, image_size, name=f"{path}[{i}]")
    images[i] = decoded[key]
  return VerificationSet(name or path.stem, images, issame)


def read_pairs(pairs_path: str | epath.PathLike,
               folds: Sequence[int] | None = None) -> list[tuple[str, int, str, int, bool]]:
  """Parses an LFW-style ``pairs.txt``: ``(name1, n1, name2, n2, issame)`` per pair.

  The first line is ``<folds> <pairs per class>`` (View 2) or ``<pairs per class>`` (View 1);
  then per fold the matched lines ``name n1 n2`` followed by the mismatched ``name1 n1 name2
  n2``. ``folds`` (1-based) selects folds of a View 2 file.
  """
  lines = [ln.split() for ln in epath.Path(pairs_path).read_text().splitlines() if ln.strip()]
  head, body = lines[0], lines[1:]
  n_folds, per_class = (int(head[0]), int(head[1])) if len(head) == 2 else (1, int(head[0]))
  fold_len = 2 * per_class
  if len(body) != n_folds * fold_len:
    raise ValueError(f"{pairs_path}: header says {n_folds}x{fold_len} lines, found {len(body)}")
  pairs = []
  for f in range(n_folds):
    if folds is not None and f + 1 not in folds:
      continue
    for fields in body[f * fold_len:(f + 1) * fold_len]:
      if len(fields) == 3:
        pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2]), True))
      elif len(fields) == 4:
        pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3]), False))
      else:
        raise ValueError(f"{pairs_path}: bad pair line {' '.join(fields)!r}")
  return pairs


def load_pairs(image_dir: str | epath.PathLike, pairs_path: str | epath.PathLike, *,
               crop: str = "center", folds: Sequence[int] | None = None,
               image_size: int = 112, ext: str = "jpg", name: str = "lfw") -> VerificationSet:
  """Builds a verification set from ``pairs.txt`` over ``<dir>/<Name>/<Name>_NNNN.<ext>``.

  Args:
    crop: "aligned" for images that are already aligned crops (resized if needed);
      "center" for unaligned 250x250 LFW: the central 150x150 square mapped to
      ``image_size`` (the crop the ArcFace landmark template gives on centred LFW faces).
  """
  image_dir = epath.Path(image_dir)
  pairs = read_pairs(pairs_path, folds)
  cache: dict[str, np.ndarray] = {}

  def get(person: str, num: int) -> np.ndarray:
    rel = f"{person}/{person}_{num:04d}.{ext}"
    if rel not in cache:
      path = image_dir / rel
      img = pixels.decode_image(path.read_bytes(), name=str(path), exif=True)
      if crop == "center":
        img = align.center_crop(img, image_size)
      elif crop == "aligned":
        img = _fit(img, image_size)
      else:
        raise ValueError(f"crop must be 'center' or 'aligned', got {crop!r}")
      cache[rel] = img
    return cache[rel]

  images = np.empty((2 * len(pairs), image_size, image_size, 3), np.uint8)
  for i, (n1, i1, n2, i2, _) in enumerate(pairs):
    images[2 * i] = get(n1, i1)
    images[2 * i + 1] = get(n2, i2)
  return VerificationSet(name, images, np.array([p[4] for p in pairs], bool))


def _kfold_slices(n: int, nfolds: int) -> list[np.ndarray]:
  # sklearn KFold(shuffle=False): the first n % nfolds folds hold one extra sample.
  return np.array_split(np.arange(n), nfolds) if nfolds > 1 else [np.arange(n)]


def _counts_below(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
  """tp, fp, tn, fn at every threshold for the rule ``dist < threshold``."""
  same = np.sort(dist[issame])
  diff = np.sort(dist[~issame])
  tp = np.searchsorted(same, thresholds, side="left")
  fp = np.searchsorted(diff, thresholds, side="left")
  return tp, fp, diff.size - fp, same.size - tp


def kfold_accuracy(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray,
                   nfolds: int = 10) -> dict:
  """insightface's k-fold verification accuracy (eval/verification.py ``calculate_roc``).

  Args:
    emb1, emb2: [N, D] embeddings of the two faces of each pair (L2-normalised here).
    issame: [N] bool.
    nfolds: folds in file order (KFold without shuffle); 1 means train = test = all.

  Returns:
    ``accuracy`` (mean over folds), ``std`` (population), ``thresholds`` (best squared-L2
    threshold per fold), ``fold_accuracies``, and ``tpr``/``fpr`` averaged over the test
    folds at each of the 400 thresholds (insightface's ROC).
  """
  emb1 = extract.l2_normalize(np.asarray(emb1, np.float64))
  emb2 = extract.l2_normalize(np.asarray(emb2, np.float64))
  issame = np.asarray(issame, bool)
  if not emb1.shape == emb2.shape or emb1.shape[0] != issame.size:
    raise ValueError(f"shapes {emb1.shape}, {emb2.shape}, {issame.shape} do not match")
  dist = np.sum(np.square(emb1 - emb2), 1)
  thresholds = LFW_THRESHOLDS
  n = issame.size
  folds = _kfold_slices(n, nfolds)
  acc = np.zeros(len(folds))
  best = np.zeros(len(folds))
  tprs = np.zeros((len(folds), thresholds.size))
  fprs = np.zeros((len(folds), thresholds.size))
  for k, test in enumerate(folds):
    train = np.setdiff1d(np.arange(n), test) if nfolds > 1 else test
    tp, _, tn, _ = _counts_below(dist[train], issame[train], thresholds)
    # Same float division as calculate_accuracy, so argmax ties resolve identically.
    acc_train = (tp + tn).astype(np.float64) / train.size
    best_idx = int(np.argmax(acc_train))
    best[k] = thresholds[best_idx]
    tp, fp, tn, fn = _counts_below(dist[test], issame[test], thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
      tprs[k] = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
      fprs[k] = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    acc[k] = float(tp[best_idx] + tn[best_idx]) / test.size
  return {"accuracy": float(np.mean(acc)), "std": float(np.std(acc)), "thresholds": best,
          "fold_accuracies": acc, "tpr": tprs.mean(0), "fpr": fprs.mean(0)}


def xnorm(*raw_embeddings: np.ndarray) -> float:
  """Mean L2 norm of the unnormalised embeddings of all given arrays (insightface XNorm)."""
  norms = np.concatenate([np.linalg.norm(np.asarray(e, np.float64), axis=1)
                          for e in raw_embeddings])
  return float(norms.mean())


def verification_metrics(emb: np.ndarray, issame: np.ndarray, *, emb_flip: np.ndarray | None
                         = None, nfolds: int = 10, far: float = 1e-3) -> dict:
  """All verification numbers from raw embeddings of the 2N images of a set.

  Args:
    emb: [2N, D] raw f(x); pair i is rows 2i and 2i+1.
    issame: [N] bool.
    emb_flip: [2N, D] raw f(flip x), or None to evaluate without flip fusion.
    nfolds: folds for the accuracy.
    far: FAR for the TAR reading over all pairs (cosine scores; see metrics.tar_at_far).
  """
  fused = emb if emb_flip is None else emb + emb_flip
  fused = extract.l2_normalize(np.asarray(fused, np.float64))
  issame = np.asarray(issame, bool)
  res = kfold_accuracy(fused[0::2], fused[1::2], issame, nfolds)
  res["xnorm"] = xnorm(emb) if emb_flip is None else xnorm(emb, emb_flip)
  scores = np.sum(fused[0::2] * fused[1::2], 1)
  fpr, tpr, _ = metrics.roc(scores, issame)
  res[f"tar_at_far_{far:g}"] = float(metrics.read_tar_at_far(fpr, tpr, [far])[0])
  res["roc_fpr"], res["roc_tpr"] = metrics.roc_for_plot(fpr, tpr)
  return res


def evaluate_set(apply_fn: extract.ApplyFn, data: VerificationSet, *, batch_size: int = 128,
                 nfolds: int = 10, flip: bool = True, progress: bool = True) -> dict:
  """Embeds one verification set with ``apply_fn`` and returns its metrics."""
  emb, emb_flip = extract.extract_raw(apply_fn, data.images, batch_size=batch_size, flip=flip,
                                      desc=data.name, progress=progress)
  return verification_metrics(emb, data.issame, emb_flip=emb_flip, nfolds=nfolds)


def load_sets(paths: Sequence[str | epath.PathLike], image_size: int = 112
              ) -> list[VerificationSet]:
  """Loads several ``.bin`` files once (decode is slow; the training loop reuses them)."""
  return [load_bin(p, image_size) for p in paths]


def evaluate_sets(apply_fn: extract.ApplyFn, sets: Sequence[VerificationSet], *,
                  batch_size: int = 128, nfolds: int = 10, progress: bool = False
                  ) -> Mapping[str, dict]:
  """Metrics for each set, keyed by set name (e.g. ``{"lfw": {"accuracy": ...}}``)."""
  return {s.name: evaluate_set(apply_fn, s, batch_size=batch_size, nfolds=nfolds,
                               progress=progress) for s in sets}


def accuracies(apply_fn: extract.ApplyFn, sets: Sequence[VerificationSet], *,
               batch_size: int = 128) -> dict[str, float]:
  """Name -> flip-fused 10-fold accuracy: what the training loop logs."""
  return {k: v["accuracy"] for k, v in evaluate_sets(apply_fn, sets,
                                                     batch_size=batch_size).items()}
