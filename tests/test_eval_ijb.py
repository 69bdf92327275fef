"""IJB-C protocol on the ijbc_mini fixture: alignment, N/D/F features, pooling, TAR@FAR, 1:N."""

import shutil

import jax
import numpy as np
import pytest
import simplejpeg

from unitsface_jax.data import align
from unitsface_jax.evaluation import ijb, metrics


@pytest.fixture(scope="module")
def root(data_dir):
  return data_dir / "eval" / "ijbc_mini"


@pytest.fixture(scope="module")
def meta(root):
  return ijb.read_meta(root, "IJBC")


def _identities(root):
  rows = [ln.split("\t") for ln in (root / "source_map.tsv").read_text().splitlines()[1:]]
  return {r[0]: int(r[4]) for r in rows}


def test_meta_matches_fixture(meta):
  assert meta.image_names.size == 130 and meta.pair_t1.size == 256
  assert np.unique(meta.templates).size == 32
  assert int(meta.pair_label.sum()) == 16
  assert meta.templates.max() == 2891 and meta.templates.min() == 208
  assert meta.landmarks.shape == (130, 5, 2) and 0.9 <= meta.faceness.min()
  assert meta.gallery is None  # no 1:N files in this fixture


def test_similarity_transform_recovers_a_known_transform():
  rng = np.random.default_rng(0)
  ang, scale, t = 0.3, 1.7, np.array([12.0, -4.0])
  rot = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
  src = rng.normal(size=(5, 2)) * 30
  m = align.umeyama(src, src @ rot.T + t)
  np.testing.assert_allclose(m, np.c_[rot, t], atol=1e-9)


def test_alignment_reproduces_the_centre_crop(root, meta):
  # The fixture's landmarks are the ArcFace template mapped by 50 + p * 150 / 112.
  m = align.estimate_transform(meta.landmarks[0])
  s = 112 / 150
  np.testing.assert_allclose(m, [[s, 0, -50 * s], [0, s, -50 * s]], atol=2e-3)
  crops = next(ijb.aligned_crops(root, meta, chunk=4))
  img = simplejpeg.decode_jpeg((root / "loose_crop" / "1.jpg").read_bytes(), colorspace="RGB")
  # Independent sampler: pixel (x, y) of the crop is source point (50 + x / s, 50 + y / s).
  xs = 50 + np.arange(112) / s
  x0 = np.floor(xs).astype(int)
  f = xs - x0
  rows = (1 - f)[:, None, None] * img[x0] + f[:, None, None] * img[x0 + 1]
  want = (1 - f)[None, :, None] * rows[:, x0] + f[None, :, None] * rows[:, x0 + 1]
  assert crops.shape == (4, 112, 112, 3)
  assert np.abs(crops[0].astype(float) - want).mean() < 1.0


def _reference_templates(feats, templates, medias):
  """eval_ijbc.py image2template_feature as loops: mean within media, sum, L2."""
  uniq = np.unique(templates)
  out = np.zeros((uniq.size, feats.shape[1]))
  for i, t in enumerate(uniq):
    ind = np.where(templates == t)[0]
    for mid in np.unique(medias[ind]):
      out[i] += feats[ind[medias[ind] == mid]].mean(0)
  return uniq, out / np.linalg.norm(out, axis=1, keepdims=True)


def test_template_pooling_equals_reference_loop(meta):
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(130, 24)).astype(np.float32)
  want_t, want = _reference_templates(feats.astype(np.float64), meta.templates, meta.medias)
  for chunk in (2048, 7):  # 7 splits templates across chunk boundaries
    got_t, got = ijb.template_features(feats, meta.templates, meta.medias, chunk=chunk)
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_nd_f_switches(meta):
  rng = np.random.default_rng(2)
  emb, flip = rng.normal(size=(2, 130, 8)).astype(np.float32)
  f = ijb.image_features(emb, flip, meta.faceness)
  np.testing.assert_allclose(f, (emb + flip) * meta.faceness[:, None], rtol=1e-6)
  f = ijb.image_features(emb, None, meta.faceness, use_flip_test=False, use_norm_score=False,
                         use_detector_score=False)
  np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("layout", ["gallery_probe", "uniform"])
@pytest.mark.parametrize("memory_bytes", [512 << 20, 4096])
def test_pair_scores_equal_gathered_dot_products(layout, memory_bytes):
  rng = np.random.default_rng(3)
  n_t = 300
  ids = np.sort(rng.choice(10_000, n_t, replace=False))
  feats = rng.normal(size=(n_t, 16)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  if layout == "gallery_probe":  # dense between two disjoint sides: the matmul path
    i1, i2 = rng.integers(0, 50, 20_000), rng.integers(50, n_t, 20_000)
  else:  # sparse over all templates: the gather path
    i1, i2 = rng.integers(0, n_t, 1000), rng.integers(0, n_t, 1000)
  got = ijb.pair_scores(feats, ids, ids[i1], ids[i2], memory_bytes=memory_bytes)
  np.testing.assert_allclose(got, np.sum(feats[i1] * feats[i2], 1), atol=1e-6)
  with pytest.raises(ValueError, match="templates without images"):
    ijb.pair_scores(feats, ids, np.array([ids[0]]), np.array([10_001]))


def _pixel_apply_fn():
  proj = jax.random.normal(jax.random.key(0), (14 * 14 * 3, 64))

  def apply_fn(x):
    x = x.reshape(x.shape[0], 14, 8, 14, 8, 3).mean((2, 4)).reshape(x.shape[0], -1)
    return x @ proj
  return apply_fn


def test_ijbc_mini_end_to_end(root, meta):
  """Images -> alignment -> flip-fused features -> templates -> scores -> TAR@FAR."""
  res = ijb.evaluate(_pixel_apply_fn(), root, "IJBC", batch_size=48, progress=False)
  assert res["mode"] == "N1D1F1"
  tars = res["verification"]["tar_at_far"]
  assert list(tars) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
  assert all(0.0 <= v <= 1.0 for v in tars.values())
  # The same numbers from features extracted here, pooled and scored by the references.
  crops = np.concatenate(list(ijb.aligned_crops(root, meta)))
  fn = _pixel_apply_fn()
  x = (crops.astype(np.float32) / 255 - 0.5) / 0.5
  emb = np.asarray(fn(x)) + np.asarray(fn(x[:, :, ::-1]))
  uniq, tf = _reference_templates((emb * meta.faceness[:, None]).astype(np.float64),
                                  meta.templates, meta.medias)
  row = {t: i for i, t in enumerate(uniq)}
  scores = np.array([tf[row[a]] @ tf[row[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)])
  want = metrics.tar_at_far(scores, meta.pair_label)
  np.testing.assert_allclose(list(tars.values()), want, atol=1e-9)


def _oracle_features(root, meta, rng):
  ident = _identities(root)
  centres = rng.normal(size=(16, 32))
  idx = np.array([ident[n] % 16 for n in meta.image_names])
  emb = centres[idx] + 0.05 * rng.normal(size=(130, 32))
  return emb.astype(np.float32), idx


def test_identity_oracle_features_verify_and_identify_perfectly(root, meta, tmp_path):
  rng = np.random.default_rng(4)
  emb, idx = _oracle_features(root, meta, rng)
  flip = emb + 0.01 * rng.normal(size=emb.shape).astype(np.float32)
  res = ijb.evaluate_features(meta, emb, flip)
  assert all(v == 1.0 for v in res["verification"]["tar_at_far"].values())
  assert res["verification"]["auc"] == 1.0
  # 1:N: A templates are the gallery, B templates the probes.
  side = {}
  for ln in (root / "source_map.tsv").read_text().splitlines()[1:]:
    r = ln.split("\t")
    side[int(r[1])] = (r[6], int(r[4]))
  gal = [(t, s) for t, (sd, s) in sorted(side.items()) if sd == "A"]
  prb = [(t, s) for t, (sd, s) in sorted(side.items()) if sd == "B"]
  copy = tmp_path / "IJBC"
  shutil.copytree(root / "meta", copy / "meta")
  header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
  (copy / "meta" / "ijbc_1N_gallery_G1.csv").write_text(
      header + "".join(f"{t},{s},x.jpg\n" for t, s in gal[:8]))
  (copy / "meta" / "ijbc_1N_gallery_G2.csv").write_text(
      header + "".join(f"{t},{s},x.jpg\n" for t, s in gal[8:]))
  (copy / "meta" / "ijbc_1N_probe_mixed.csv").write_text(
      header + "".join(f"{t},{s},x.jpg\n" for t, s in prb))
  meta1n = ijb.read_meta(copy, "IJBC")
  assert meta1n.gallery[0].size == 16 and meta1n.probe[0].size == 16
  ident = ijb.evaluate_features(meta1n, emb, flip)["identification"]
  assert ident["rank1"] == 1.0 and ident["tpir_at_fpir"]["0.1"] == 1.0


def test_identification_equals_brute_force():
  rng = np.random.default_rng(5)
  n_g, n_p = 40, 120
  feats = rng.normal(size=(n_g + n_p, 8)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  tids = np.arange(100, 100 + n_g + n_p)
  g_sub = rng.permutation(n_g) + 1000
  p_sub = rng.choice(g_sub, n_p)
  res = ijb.identification_metrics(feats, tids, (tids[:n_g], g_sub), (tids[n_g:], p_sub),
                                   fpirs=(0.01, 0.1))
  sim = feats[n_g:] @ feats[:n_g].T
  mate = np.array([list(g_sub).index(s) for s in p_sub])
  order = np.argsort(-sim, axis=1)
  for k in (1, 5, 10):
    assert res[f"rank{k}"] == np.mean([mate[i] in order[i, :k] for i in range(n_p)])
  pos = sim[np.arange(n_p), mate]
  neg = sorted((sim[i, j] for i in range(n_p) for j in range(n_g) if j != mate[i]),
               reverse=True)
  for far in (0.01, 0.1):
    th = neg[int(np.ceil(n_p * far)) - 1]
    assert res["tpir_at_fpir"][f"{far:g}"] == np.mean(pos > th)
