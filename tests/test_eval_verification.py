"""Verification protocol: .bin loading (Py2/Py3, memo refs, refusal of code), k-fold accuracy."""

import os
import pickle
import pickletools
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from unitsface_jax.data import DataError, align
from unitsface_jax.evaluation import metrics, verification


# ---------------------------------------------------------------- reference implementations

def _reference_kfold(emb1, emb2, issame, nfolds):
  """insightface eval/verification.py calculate_roc, written as plain Python loops."""
  n = len(issame)
  e1 = [list(r / np.sqrt(sum(v * v for v in r))) for r in np.asarray(emb1, np.float64)]
  e2 = [list(r / np.sqrt(sum(v * v for v in r))) for r in np.asarray(emb2, np.float64)]
  dist = [sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(e1, e2)]
  thresholds = [i * 0.01 for i in range(400)]
  # KFold(shuffle=False): fold sizes n // k, the first n % k one larger.
  sizes = [n // nfolds + (1 if f < n % nfolds else 0) for f in range(nfolds)]
  starts = [sum(sizes[:f]) for f in range(nfolds)]

  def acc(th, idx):
    right = 0
    for i in idx:
      right += (dist[i] < th) == bool(issame[i])
    return float(right) / len(idx)

  accs = []
  for f in range(nfolds):
    test = list(range(starts[f], starts[f] + sizes[f]))
    train = [i for i in range(n) if i not in set(test)]
    best_th, best_acc = None, -1.0
    for th in thresholds:
      a = acc(th, train)
      if a > best_acc:  # strict: the first maximum wins, as np.argmax
        best_th, best_acc = th, a
    accs.append(acc(best_th, test))
  mean = sum(accs) / nfolds
  std = (sum((a - mean) ** 2 for a in accs) / nfolds) ** 0.5
  return mean, std


def _pairs(rng, n, dim=16, sep=1.0):
  issame = rng.random(n) < 0.5
  base = rng.normal(size=(n, dim))
  other = np.where(issame[:, None], base + rng.normal(size=(n, dim)) / sep,
                   rng.normal(size=(n, dim)))
  return base, other, issame


@pytest.mark.parametrize("n,nfolds,sep", [(600, 10, 1.0), (605, 10, 0.6), (203, 7, 2.0)])
def test_kfold_accuracy_equals_loop_reference(n, nfolds, sep):
  rng = np.random.default_rng(n)
  e1, e2, issame = _pairs(rng, n, sep=sep)
  got = verification.kfold_accuracy(e1, e2, issame, nfolds)
  want_acc, want_std = _reference_kfold(e1, e2, issame, nfolds)
  assert abs(got["accuracy"] - want_acc) < 1e-9
  assert abs(got["std"] - want_std) < 1e-9
  assert got["thresholds"].shape == (nfolds,)
  assert 0.5 < got["accuracy"] < 1.0  # separable enough to be informative, not trivial


def test_kfold_accuracy_thresholds_are_first_maximum():
  # Every distance is 0 or 4 - eps: every threshold in (0, 3.99] separates perfectly; the
  # first maximum is 0.01, the first grid point above 0.
  issame = np.array([True, False] * 50)
  e1 = np.tile([1.0, 0.0], (100, 1))
  e2 = np.where(issame[:, None], [1.0, 0.0], [-1.0, 1e-3])
  res = verification.kfold_accuracy(e1, e2, issame, 10)
  assert res["accuracy"] == 1.0 and res["std"] == 0.0
  np.testing.assert_allclose(res["thresholds"], 0.01)


# ------------------------------------------------------------------------- TAR@FAR vs sklearn

def _sklearn_reading(labels, scores, fars, drop_intermediate=True):
  """eval_ijbc.py: roc_curve, flip, first |fpr - far| minimum."""
  fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  out = []
  for far in fars:
    _, i = min(zip(abs(fpr - far), range(len(fpr))))
    out.append(tpr[i])
  return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_equals_sklearn_roc_reading(seed):
  rng = np.random.default_rng(seed)
  n = 200_000
  labels = rng.random(n) < 0.05
  scores = (rng.normal(size=n) + 2.5 * labels).astype(np.float32)
  fars = metrics.IJB_FARS
  np.testing.assert_array_equal(metrics.tar_at_far(scores, labels, fars),
                                _sklearn_reading(labels, scores, fars))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_roc_with_tied_scores_equals_sklearn_roc_curve(dtype):
  """float32 and narrower scores take the packed-key sort (the label in the lowest bit of
  the widened score); float64 the argsort. Ties, +0/-0 and both label orders in a tie."""
  rng = np.random.default_rng(7)
  labels = rng.random(50_000) < 0.3
  scores = np.round(rng.normal(size=labels.size) + labels, 1).astype(dtype)  # heavy ties
  scores[:300] = 0.0
  scores[300:600] = -0.0
  fars = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5)
  for drop in (True, False):
    np.testing.assert_array_equal(metrics.tar_at_far(scores, labels, fars, drop),
                                  _sklearn_reading(labels, scores, fars, drop))
    fpr, tpr, th = metrics.roc(scores, labels, drop)
    sk_fpr, sk_tpr, sk_th = roc_curve(labels, scores, drop_intermediate=drop)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(th[1:], sk_th[1:])


def test_packed_sort_roc_equals_the_argsort_roc_with_infinities_and_zeros():
  """float32 scores (packed-key sort) and the same values as float64 (argsort) give the same
  ROC, with +-inf (which the packing cannot carry: they take the argsort), +-0 and ties."""
  rng = np.random.default_rng(11)
  labels = rng.random(20_000) < 0.2
  scores = np.round(rng.normal(size=labels.size) + labels, 2).astype(np.float32)
  scores[:50], scores[50:100] = 0.0, -0.0
  for extremes in (False, True):
    if extremes:
      scores[100:103], scores[103:106] = np.inf, -np.inf
    for drop in (True, False):
      got = metrics.roc(scores, labels, drop)
      want = metrics.roc(scores.astype(np.float64), labels, drop)
      for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------- .bin loading

def test_lfw_fold1_bin_loads_with_memo_references(data_dir):
  path = data_dir / "eval" / "lfw_fold1.bin"
  ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
  assert {"BINGET", "BINBYTES"} <= ops or {"LONG_BINGET", "BINBYTES"} <= ops
  bins, issame = verification.read_bin(path)
  assert len(bins) == 1200 and issame.shape == (600,)
  assert len({id(b) for b in bins}) == 807  # memo references give back shared objects
  np.testing.assert_array_equal(issame, [True] * 300 + [False] * 300)
  data = verification.load_bin(path)
  assert data.images.shape == (1200, 112, 112, 3) and data.images.dtype == np.uint8
  assert data.name == "lfw_fold1"
  assert 40 < data.images.mean() < 200


def test_py2_bin_loads_and_matches_py3_images(data_dir):
  path = data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin"
  raw = path.read_bytes()
  assert "BINSTRING" in {op.name for op, _, _ in pickletools.genops(raw)}
  with pytest.raises(UnicodeDecodeError):  # why insightface needs its encoding='bytes' branch
    pickle.loads(raw)
  small = verification.load_bin(path)
  full = verification.load_bin(data_dir / "eval" / "lfw_fold1.bin")
  np.testing.assert_array_equal(small.issame, [True] * 10 + [False] * 10)
  np.testing.assert_array_equal(small.images[:20], full.images[:20])
  np.testing.assert_array_equal(small.images[20:], full.images[600:620])


def test_undecodable_bin_image_is_a_data_error_naming_it(data_dir, tmp_path):
  bins, issame = verification.read_bin(data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin")
  bins[5] = b"\xff\xd8\xff" + b"not a jpeg" * 10
  bad = tmp_path / "bad.bin"
  bad.write_bytes(pickle.dumps((bins, [bool(s) for s in issame]), protocol=4))
  with pytest.raises(DataError, match=r"bad\.bin\[5\]: undecodable image"):
    verification.load_bin(bad)


class _CreatesFile:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_malicious_bin_is_refused_before_any_call(tmp_path):
  target = tmp_path / "pwned.txt"
  payload = pickle.dumps(([b"\xff\xd8", _CreatesFile(str(target))], [True]), protocol=2)
  bad = tmp_path / "evil.bin"
  bad.write_bytes(payload)
  with pytest.raises(verification.UnsafePickleError, match="REDUCE|GLOBAL"):
    verification.load_bin(bad)
  assert not target.exists()
  # The payload is live: an ordinary unpickler does create the file.
  pickle.loads(payload)
  assert target.exists()


@pytest.mark.parametrize("obj", [{"a": 1}, None, {1, 2}, np.zeros(2)])
def test_non_data_types_are_refused(obj, tmp_path):
  for protocol in (0, 2, 4):
    with pytest.raises(verification.UnsafePickleError):
      verification.safe_loads(pickle.dumps(([b"x"], [obj]), protocol=protocol))


def test_find_class_is_refused_even_without_the_opcode_scan():
  unpickler = verification._NoGlobalsUnpickler(
      __import__("io").BytesIO(pickle.dumps(os.getcwd, protocol=4)))
  with pytest.raises(verification.UnsafePickleError, match="posix.getcwd|os.getcwd|nt.getcwd"):
    unpickler.load()


# ------------------------------------------------------------------------ pairs.txt folders

def lfw_layout(data_dir, dest):
  """The ijbc_mini images (unaligned 250x250 LFW originals) back in LFW's folder layout
  ``dest/<Name>/<Name>_NNNN.jpg``; returns {name: [image numbers]}."""
  root = data_dir / "eval" / "ijbc_mini"
  rows = [ln.split("\t") for ln in (root / "source_map.tsv").read_text().splitlines()[1:]]
  people = {}
  for name, _, _, source, *_ in rows:
    person, file = source.split("/")[-2:]
    (dest / person).mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "loose_crop" / name, dest / person / file)
    people.setdefault(person, []).append(int(file[-8:-4]))
  return people


def test_pairs_txt_over_image_folder(data_dir, tmp_path):
  """A pairs.txt over LFW-layout folders; the centre crop equals the 5-point alignment."""
  people = lfw_layout(data_dir, tmp_path)
  names = sorted(people)
  matched = [f"{p}\t{people[p][0]}\t{people[p][1]}" for p in names[:4]]
  mismatched = [f"{a}\t{people[a][0]}\t{b}\t{people[b][0]}" for a, b in zip(names[:4], names[4:8])]
  (tmp_path / "pairs.txt").write_text("\n".join(["1\t4"] + matched + mismatched) + "\n")
  data = verification.load_pairs(tmp_path, tmp_path / "pairs.txt")
  assert data.images.shape == (16, 112, 112, 3)
  np.testing.assert_array_equal(data.issame, [True] * 4 + [False] * 4)
  import simplejpeg
  src = simplejpeg.decode_jpeg((tmp_path / names[0] / f"{names[0]}_{people[names[0]][0]:04d}.jpg")
                               .read_bytes(), colorspace="RGB")
  lmk = np.array([101.287, 119.236, 148.480, 118.975, 125.034, 146.076, 105.646, 173.704,
                  144.728, 173.488]).reshape(5, 2)
  aligned = align.align_face(src, lmk)
  assert np.abs(aligned.astype(int) - data.images[0]).mean() < 1.0
  with pytest.raises(ValueError, match="header"):
    (tmp_path / "bad.txt").write_text("2\t4\n" + "\n".join(matched) + "\n")
    verification.read_pairs(tmp_path / "bad.txt")


def test_read_pairs_folds_selects_official_fold(data_dir):
  repo = data_dir.parent.parent
  candidates = [up / "shared" / "data" / "lfw" / "pairs.txt" for up in (repo.parent,
                                                                     repo.parent.parent)]
  pairs_txt = next((c for c in candidates if c.exists()), None)
  if pairs_txt is None:
    pytest.skip("the official pairs.txt lives only in the shared data folder")
  fold2 = verification.read_pairs(pairs_txt, folds=[2])
  assert len(fold2) == 600 and sum(p[4] for p in fold2) == 300
  assert len(verification.read_pairs(pairs_txt)) == 6000


# ------------------------------------------------------------------------ metrics end to end

def test_verification_metrics_xnorm_and_tar(data_dir):
  rng = np.random.default_rng(3)
  e1, e2, issame = _pairs(rng, 600, dim=32, sep=1.5)
  emb = np.empty((1200, 32))
  emb[0::2], emb[1::2] = 3 * e1, 3 * e2
  flip = emb + rng.normal(size=emb.shape) * 0.1
  res = verification.verification_metrics(emb, issame, emb_flip=flip)
  fused = emb + flip
  want = verification.kfold_accuracy(fused[0::2], fused[1::2], issame)
  assert res["accuracy"] == want["accuracy"]
  norms = np.concatenate([np.linalg.norm(emb, axis=1), np.linalg.norm(flip, axis=1)])
  assert abs(res["xnorm"] - norms.mean()) < 1e-9
  f = fused / np.linalg.norm(fused, axis=1, keepdims=True)
  cos = np.sum(f[0::2] * f[1::2], 1)
  assert res["tar_at_far_0.001"] == _sklearn_reading(issame, cos, [1e-3])[0]


def test_accuracies_api_runs_a_model_over_bin_files(data_dir):
  """The training loop's call: load .bin files once, then name -> accuracy for a model."""
  import jax
  from flax import nnx
  from unitsface_jax.evaluation import extract

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(14 * 14 * 3, 16, rngs=rngs)

    def __call__(self, x):
      x = x.reshape(x.shape[0], 14, 8, 14, 8, 3).mean((2, 4))
      return self.fc(x.reshape(x.shape[0], -1))

  model = Net(nnx.Rngs(0))
  model.eval()
  sets = verification.load_sets([data_dir / "eval" / "lfw_fold1_py2str_20pairs.bin",
                                 data_dir / "eval" / "lfw_fold1.bin"])
  apply_fn = extract.nnx_apply_fn(model)
  acc = verification.accuracies(apply_fn, sets, batch_size=64)
  assert list(acc) == ["lfw_fold1_py2str_20pairs", "lfw_fold1"]
  x = (sets[1].images.astype(np.float32) / 255 - 0.5) / 0.5
  emb = np.asarray(jax.jit(model)(x))
  flip = np.asarray(jax.jit(model)(x[:, :, ::-1]))
  want = verification.verification_metrics(emb, sets[1].issame, emb_flip=flip)
  assert abs(acc["lfw_fold1"] - want["accuracy"]) < 1e-9
  assert 0.5 <= acc["lfw_fold1"] <= 1.0
