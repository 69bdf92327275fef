"""The loss family against an independent float64 NumPy reference written from the formulas.

Reference values follow the one-line formulas in the docstrings of ``unitsface_jax.losses``
(themselves from CVI-SZU/UniTSFace head.py, insightface arcface_torch losses.py and the
papers); reference gradients are derived by hand and checked against central finite
differences, so a wrong derivation fails here rather than blessing a wrong implementation.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitsface_jax import losses

S = 64.0


# --------------------------------------------------------------------------------------------
# NumPy float64 reference: value [B] and per-sample gradients d L_i / d cos_i [B, C] and
# d L_i / d bias ([B] for a scalar bias, [B, C] for a per-class bias).
# --------------------------------------------------------------------------------------------


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _onehot(labels, num_classes):
  return np.eye(num_classes, dtype=bool)[labels]


def _valid_mask(valid, shape):
  if valid is None:
    return np.ones(shape, bool)
  return np.broadcast_to(np.asarray(valid, bool), shape)


def ref_softmax_ce(logits, onehot, mask, dlogits_dcos):
  """CE over the classes in mask; 0 (and no gradient) where the target is not in mask."""
  z = np.where(mask, logits, -np.inf)
  zmax = np.max(z, axis=1, keepdims=True)
  zmax = np.where(np.isfinite(zmax), zmax, 0.0)
  e = np.where(mask, np.exp(z - zmax), 0.0)
  total = e.sum(1)
  has = (onehot & mask).any(1)
  lse = np.log(np.where(has, total, 1.0)) + zmax[:, 0]
  value = np.where(has, lse - np.sum(np.where(onehot, logits, 0.0), 1), 0.0)
  p = e / np.where(has, total, 1.0)[:, None]
  grad = (p - onehot) * dlogits_dcos * has[:, None]
  return value, grad


def ref_cosface(cos, labels, s=S, m=0.4, valid=None):
  oh = _onehot(labels, cos.shape[1])
  return ref_softmax_ce(s * (cos - m * oh), oh, _valid_mask(valid, cos.shape),
                        np.full(cos.shape, s))


def ref_arcface(cos, labels, s=S, m=0.5, straight_through=False):
  oh = _onehot(labels, cos.shape[1])
  c = np.clip(cos, -1.0, 1.0)
  theta = np.arccos(c)
  logits = s * np.where(oh, np.cos(theta + m), c)
  # d cos(θ+m)/d c = sin(θ+m)/sin θ; at the poles sin θ = 0 the implementation's convention
  # (sin θ held constant) leaves only the cos m term.
  interior = np.abs(c) < 1.0
  with np.errstate(divide="ignore", invalid="ignore"):
    dphi = np.where(interior, np.sin(theta + m) / np.sin(theta), np.cos(m))
  dclip = (np.abs(cos) <= 1.0).astype(float)
  if straight_through:
    dlog = np.full(cos.shape, s)
  else:
    dlog = s * np.where(oh, dphi, 1.0) * dclip
  return ref_softmax_ce(logits, oh, np.ones(cos.shape, bool), dlog)


def ref_threshold_bce(cos, labels, bias, s, m, valid=None, paper=False):
  """Positive + negative binary terms: value [B], d/dcos [B, C], d/db per term [B, C]."""
  oh = _onehot(labels, cos.shape[1])
  mask = _valid_mask(valid, cos.shape)
  b = np.broadcast_to(bias, cos.shape)
  xp = s * (cos - m) - b
  xn = s * cos - b
  inp = ((xp >= -s) & (xp <= s)).astype(float)
  inn = ((xn >= -s) & (xn <= s)).astype(float)
  pos_sel = oh & mask
  neg_sel = ~oh & mask
  value = np.sum(np.where(pos_sel, _softplus(-np.clip(xp, -s, s)), 0.0), 1)
  # d softplus(-x)/dx = -sigmoid(-x); x = s(c-m) - b.
  gp = -_sigmoid(-np.clip(xp, -s, s)) * inp * pos_sel
  dcos = gp * s
  dbias = -gp
  if paper:
    z = np.where(neg_sel, xn, -np.inf)
    zmax = np.max(np.where(neg_sel, z, -np.inf), 1, keepdims=True)
    zmax = np.where(np.isfinite(zmax), zmax, 0.0)
    e = np.where(neg_sel, np.exp(z - zmax), 0.0)
    # log(1 + Σ e^z) = logaddexp(0, lse)
    with np.errstate(divide="ignore"):
      lse = np.log(e.sum(1)) + zmax[:, 0]
    value = value + _softplus(lse)
    w = e / (np.exp(-zmax) + e.sum(1, keepdims=True))  # e^{z_j} / (1 + Σ e^z)
    dcos = dcos + s * w
    dbias = dbias - w
  else:
    gn = _sigmoid(np.clip(xn, -s, s)) * inn * neg_sel
    value = value + np.sum(np.where(neg_sel, _softplus(np.clip(xn, -s, s)), 0.0), 1)
    dcos = dcos + gn * s
    dbias = dbias - gn
  return value, dcos, dbias


def ref_init_bias(cos, labels, s=S, valid=None):
  oh = _onehot(labels, cos.shape[1])
  sel = ~oh & _valid_mask(valid, cos.shape)
  vals = []
  for i in range(cos.shape[0]):
    if sel[i].any():
      z = s * cos[i, sel[i]]
      vals.append(z.max() + np.log(np.exp(z - z.max()).sum()))
  return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------------------------
# Cases: name -> (jax loss(cos, labels, bias), reference(cos, labels, bias), bias kind).
# --------------------------------------------------------------------------------------------


CASES = {
    "cosface": (lambda c, y, b, v: losses.cosface(c, y),
                lambda c, y, b, v: (*ref_cosface(c, y), None), None),
    "arcface": (lambda c, y, b, v: losses.arcface(c, y),
                lambda c, y, b, v: (*ref_arcface(c, y), None), None),
    "arcface_st": (lambda c, y, b, v: losses.arcface(c, y, straight_through=True),
                   lambda c, y, b, v: (*ref_arcface(c, y, straight_through=True), None), None),
    "normalized_bce": (lambda c, y, b, v: losses.normalized_bce(c, y, b),
                       lambda c, y, b, v: ref_threshold_bce(c, y, b, S, 0.4), "class"),
    "uce": (lambda c, y, b, v: losses.uce(c, y, b),
            lambda c, y, b, v: ref_threshold_bce(c, y, b, S, 0.4), "scalar"),
    "uss_code": (lambda c, y, b, v: losses.uss(c, y, b, valid=v),
                 lambda c, y, b, v: ref_threshold_bce(c, y, b, S, 0.1, v), "scalar"),
    "uss_paper": (lambda c, y, b, v: losses.uss(c, y, b, valid=v, form="paper"),
                  lambda c, y, b, v: ref_threshold_bce(c, y, b, S, 0.1, v, paper=True),
                  "scalar"),
    "s2s_softmax": (lambda c, y, b, v: losses.s2s_softmax(c, y, valid=v),
                    lambda c, y, b, v: (*ref_cosface(c, y, m=0.1, valid=v), None), None),
    "s2s_bce": (lambda c, y, b, v: losses.s2s_bce(c, y, b, valid=v),
                lambda c, y, b, v: ref_threshold_bce(c, y, b, S, 0.1, v), "class"),
}
MASKED = {"uss_code", "uss_paper", "s2s_softmax", "s2s_bce"}


def make_case(seed, batch, num_classes, *, poles=False, mostly_invalid=False):
  """Random cosines (optionally with whole rows at exactly ±1), labels, biases, valid mask."""
  rng = np.random.default_rng(seed)
  cos = rng.uniform(-0.95, 0.95, (batch, num_classes))
  labels = rng.integers(0, num_classes, batch)
  # Push targets up so that both easy and hard samples occur.
  cos[np.arange(batch), labels] = rng.uniform(-0.3, 0.95, batch)
  if poles:
    cos[0] = 1.0
    if batch > 1:
      cos[1] = -1.0
    if batch > 2:
      cos[2, labels[2]] = 1.0
      cos[2, (labels[2] + 1) % num_classes] = -1.0
    if batch > 3:  # rounding can push a normalised dot product past 1; ArcFace clips it
      cos[3, labels[3]] = 1.0 + 1e-5
      cos[3, (labels[3] + 1) % num_classes] = -1.0 - 1e-5
  valid = np.ones(num_classes, bool)
  if mostly_invalid:
    valid = rng.uniform(size=num_classes) < 0.2
    valid[labels[0]] = True
    valid[(labels[0] + 1) % num_classes] = True
    if batch > 1:
      valid[labels[-1]] = False
  # Biases away from the clip corners (|x| = s exactly), where the derivative is one-sided.
  scalar_bias = rng.uniform(5.0, 40.0)
  class_bias = rng.uniform(5.0, 40.0, num_classes)
  return cos, labels, scalar_bias, class_bias, valid


# Rows 0-3 of the "poles" cases sit at (or just past) cos = ±1, the others are random; each
# case is one compilation per loss and dtype, so the list is kept short.
CONFIGS = {
    "poles": dict(seed=1, batch=6, num_classes=9, poles=True),
    "batch1": dict(seed=2, batch=1, num_classes=5),
    "two_classes": dict(seed=3, batch=7, num_classes=2, poles=True),
    "mostly_invalid": dict(seed=5, batch=8, num_classes=12, mostly_invalid=True),
}


def assert_close(actual, desired, rtol, name, magnitude=None):
  """Element-wise relative error ≤ rtol, with an absolute floor of rtol·magnitude.

  ``magnitude`` (default max|desired|) is the size of the terms that were added up: a sum
  of terms of both signs (the gradient of a shared bias: +σ from positives, −σ from
  negatives) is only defined to rtol of its terms, not of the small remainder.
  """
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values {actual}"
  if magnitude is None:
    magnitude = np.max(np.abs(desired)) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * magnitude, err_msg=name)


def run_case(name, config, dtype):
  loss_fn, ref_fn, bias_kind = CASES[name]
  cos, labels, scalar_bias, class_bias, valid = make_case(**config)
  valid_arg = valid if config.get("mostly_invalid") and name in MASKED else None
  bias = {"scalar": scalar_bias, "class": class_bias, None: np.float64(0.0)}[bias_kind]
  # The reference sees exactly the values the implementation sees.
  cos = np.asarray(cos.astype(dtype), np.float64)
  bias = np.asarray(np.asarray(bias).astype(dtype), np.float64)
  weights = np.random.default_rng(99).uniform(0.5, 1.5, cos.shape[0])

  def objective(c, b):
    return jnp.sum(jnp.asarray(weights, c.dtype) * loss_fn(c, labels, b, valid_arg))

  c_in = jnp.asarray(cos, dtype)
  b_in = jnp.asarray(bias, dtype)
  # One compiled program per case: eager dispatch compiles every op per shape, which is slower.
  value, (gcos, gbias) = jax.jit(lambda c, b: (
      loss_fn(c, labels, b, valid_arg), jax.grad(objective, argnums=(0, 1))(c, b)))(c_in, b_in)
  assert value.dtype == jnp.dtype(dtype)
  ref_value, ref_dcos, ref_dbias = ref_fn(cos, labels, bias, valid_arg)
  rtol = 1e-5 if dtype == np.float64 else 1e-4
  assert_close(value, ref_value, rtol, f"{name} value")
  assert_close(gcos, weights[:, None] * ref_dcos, rtol, f"{name} d/dcos")
  # ref_dbias is per term [B, C]: the bias gradient sums it over samples (and classes).
  if bias_kind == "scalar":
    terms = weights[:, None] * ref_dbias
    assert_close(gbias, np.sum(terms), rtol, f"{name} d/db", np.sum(np.abs(terms)))
  elif bias_kind == "class":
    terms = weights[:, None] * ref_dbias
    assert_close(gbias, np.sum(terms, 0), rtol, f"{name} d/db",
                 np.max(np.sum(np.abs(terms), 0)))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name, config):
  with jax.enable_x64(True):
    run_case(name, CONFIGS[config], np.float64)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name, config):
  run_case(name, CONFIGS[config], np.float32)


@pytest.mark.parametrize("name", ["uss_code", "uss_paper", "s2s_bce", "arcface", "cosface"])
def test_reference_gradients_match_finite_differences(name):
  """The hand-derived reference gradients agree with central differences (interior points)."""
  _, ref_fn, bias_kind = CASES[name]
  cos, labels, scalar_bias, class_bias, valid = make_case(seed=11, batch=3, num_classes=4)
  valid[labels[0]] = False  # one sample without a positive
  valid_arg = valid if name in MASKED else None
  bias = {"scalar": scalar_bias, "class": class_bias, None: 0.0}[bias_kind]
  _, dcos, dbias = ref_fn(cos, labels, bias, valid_arg)
  h = 1e-6
  num = np.zeros_like(cos)
  for idx in np.ndindex(cos.shape):
    up, down = cos.copy(), cos.copy()
    up[idx] += h
    down[idx] -= h
    num[idx] = (ref_fn(up, labels, bias, valid_arg)[0][idx[0]]
                - ref_fn(down, labels, bias, valid_arg)[0][idx[0]]) / (2 * h)
  np.testing.assert_allclose(dcos, num, rtol=1e-5, atol=1e-5)
  if bias_kind == "scalar":
    numb = (ref_fn(cos, labels, bias + h, valid_arg)[0]
            - ref_fn(cos, labels, bias - h, valid_arg)[0]) / (2 * h)
    np.testing.assert_allclose(dbias.sum(1), numb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["poles", "batch1", "mostly_invalid"])
def test_init_threshold_bias_matches_reference(config):
  cos, labels, _, _, valid = make_case(**CONFIGS[config])
  with jax.enable_x64(True):
    got = losses.init_threshold_bias(jnp.asarray(cos), labels, valid=valid)
    np.testing.assert_allclose(got, ref_init_bias(cos, labels, valid=valid), rtol=1e-5)
  got32 = losses.init_threshold_bias(jnp.asarray(cos, jnp.float32), labels, valid=valid)
  ref32 = ref_init_bias(cos.astype(np.float32).astype(np.float64), labels, valid=valid)
  np.testing.assert_allclose(got32, ref32, rtol=1e-4)


def test_init_threshold_bias_without_negatives_is_zero():
  cos = jnp.array([[0.3, 0.2]])
  assert float(losses.init_threshold_bias(cos, jnp.array([0]), valid=jnp.array([True, False]))) == 0.0


def test_threshold_bias_for_step_uses_init_on_first_use_only_and_keeps_gradient():
  init = jnp.float32(31.0)
  f = jax.jit(lambda b, first: losses.threshold_bias_for_step(b, init, first_use=first))
  assert float(f(jnp.float32(0.0), jnp.bool_(True))) == 31.0
  assert float(f(jnp.float32(5.0), jnp.bool_(False))) == 5.0
  for first in (False, True):
    g = jax.grad(lambda b: 3.0 * f(b, jnp.bool_(first)))(jnp.float32(2.0))
    assert float(g) == 3.0


# --------------------------------------------------------------------------------------------
# ArcFace gradients.
# --------------------------------------------------------------------------------------------


def test_straight_through_arcface_gradient_is_scale_softmax_minus_onehot():
  cos, labels, *_ = make_case(seed=7, batch=6, num_classes=10, poles=True)
  cos = jnp.asarray(cos, jnp.float32)
  grad = jax.grad(lambda c: jnp.sum(losses.arcface(c, labels, straight_through=True)))(cos)
  target = jax.nn.one_hot(labels, 10, dtype=jnp.bool_)
  logits = losses.sample_to_class.arcface_logits(cos, target, scale=S, margin=0.5,
                                                 straight_through=True)
  expected = S * (jax.nn.softmax(logits, axis=-1) - target)
  # Same fp32 operations up to the order of the log-sum-exp shift: equal to the last ulps.
  np.testing.assert_allclose(grad, expected, rtol=0, atol=4 * S * np.finfo(np.float32).eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exact_arcface_gradient_is_finite_at_poles(dtype):
  cos = jnp.array([[1.0, -1.0, 0.2], [-1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype)
  labels = jnp.array([0, 0, 2])
  grad = jax.grad(lambda c: jnp.sum(losses.arcface(c, labels)))(cos)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  assert losses.arcface(cos, labels).dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------------

ALL = {
    "cosface": lambda c, y, v: losses.cosface(c, y),
    "arcface": lambda c, y, v: losses.arcface(c, y),
    "normalized_bce": lambda c, y, v: losses.normalized_bce(
        c, y, jnp.full((c.shape[1],), losses.initial_bce_bias(c.shape[1]))),
    "uce": lambda c, y, v: losses.uce(c, y, losses.initial_bce_bias(c.shape[1])),
    "uss_code": lambda c, y, v: losses.uss(c, y, 20.0, valid=v),
    "uss_paper": lambda c, y, v: losses.uss(c, y, 20.0, valid=v, form="paper"),
    "s2s_softmax": lambda c, y, v: losses.s2s_softmax(c, y, valid=v),
    "s2s_bce": lambda c, y, v: losses.s2s_bce(c, y, jnp.full((c.shape[1],), 20.0), valid=v),
}

# Compiled once per (loss, shape); the strategy draws from few shapes so that hypothesis
# explores values rather than paying for compilations.
ALL = {name: jax.jit(fn) for name, fn in ALL.items()}
PROPERTY_SETTINGS = hypothesis.settings(max_examples=12, deadline=None, derandomize=True)


@st.composite
def batches(draw):
  batch = draw(st.sampled_from([1, 3, 6]))
  num_classes = draw(st.sampled_from([2, 5]))
  dim = 4
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, dim)).astype(np.float32)
  centers = rng.normal(size=(num_classes, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch)
  valid = rng.uniform(size=num_classes) < 0.7
  return features, centers, labels, valid, rng


@PROPERTY_SETTINGS
@hypothesis.given(batches(), st.sampled_from(sorted(ALL)))
def test_shapes_and_dtype(data, name):
  features, centers, labels, valid, _ = data
  cos = losses.cosine_similarity(jnp.asarray(features, jnp.bfloat16), centers)
  out = ALL[name](cos, labels, valid)
  assert out.shape == (features.shape[0],)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@PROPERTY_SETTINGS
@hypothesis.given(batches(), st.sampled_from(sorted(ALL)))
def test_batch_mean_is_permutation_invariant(data, name):
  features, centers, labels, valid, rng = data
  perm = rng.permutation(features.shape[0])
  cos = losses.cosine_similarity(features, centers)
  mean = jnp.mean(ALL[name](cos, labels, valid))
  mean_perm = jnp.mean(ALL[name](cos[perm], labels[perm], valid))
  np.testing.assert_allclose(mean_perm, mean, rtol=1e-5, atol=1e-5)


@PROPERTY_SETTINGS
@hypothesis.given(batches(), st.sampled_from(sorted(ALL)), st.floats(0.01, 100.0))
def test_invariant_to_feature_norm(data, name, factor):
  features, centers, labels, valid, _ = data
  base = ALL[name](losses.cosine_similarity(features, centers), labels, valid)
  scaled = ALL[name](losses.cosine_similarity(factor * features, centers), labels, valid)
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------
# The unified threshold learns to separate positives from negatives.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("t0", [0.9, -0.3])
def test_gradient_step_on_bias_moves_threshold_towards_separation(form, t0):
  """Positives ~ 0.6, negatives ~ 0.1: from t = 0.9 or −0.3 one step of b moves t towards them.

  Fewer positive/negative cosines fall on the wrong side of t = b/s after the step.
  """
  rng = np.random.default_rng(3)
  batch, num_classes = 64, 32
  labels = rng.integers(0, num_classes, batch)
  cos = rng.normal(0.1, 0.08, (batch, num_classes))
  cos[np.arange(batch), labels] = rng.normal(0.6, 0.08, batch)
  cos = jnp.asarray(np.clip(cos, -1, 1), jnp.float32)
  onehot = np.eye(num_classes, dtype=bool)[labels]

  def errors(t):
    c = np.asarray(cos)
    return np.sum(c[onehot] < t) + np.sum(c[~onehot] > t)

  b0 = jnp.float32(S * t0)
  grad = float(jax.grad(lambda b: jnp.mean(losses.uss(cos, labels, b, form=form)))(b0))
  # The two forms' gradients differ in size by ~C (a sum vs. a softmax over negatives), so
  # the step size is chosen to move t by 0.2; the gradient alone sets the direction.
  b1 = float(b0) - (0.2 * S / abs(grad)) * grad
  t1 = b1 / S
  assert errors(t1) < errors(t0)
  assert (0.1 < t1 < t0) if t0 > 0.6 else (t0 < t1 < 0.6)


# --------------------------------------------------------------------------------------------
# Memory bank and objective.
# --------------------------------------------------------------------------------------------


def test_write_memory_last_occurrence_wins_and_jit_agrees():
  memory = jnp.zeros((6, 3), jnp.float32)
  seen = jnp.zeros((6,), bool).at[5].set(True)
  labels = jnp.array([2, 4, 2, 0, 4, 2, -1, 9])
  features = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  new_m, new_seen = losses.write_memory(memory, seen, features, labels)
  expected = np.zeros((6, 3), np.float32)
  expected[2] = features[5]
  expected[4] = features[4]
  expected[0] = features[3]
  np.testing.assert_array_equal(new_m, expected)
  np.testing.assert_array_equal(new_seen, [True, False, True, False, True, True])
  jit_m, jit_seen = jax.jit(losses.write_memory)(memory, seen, features, labels)
  np.testing.assert_array_equal(jit_m, new_m)
  np.testing.assert_array_equal(jit_seen, new_seen)


def test_write_memory_many_repeats_matches_python_loop_under_jit():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 7, 200)
  features = rng.normal(size=(200, 4)).astype(np.float32)
  expected = np.zeros((7, 4), np.float32)
  for label, feature in zip(labels, features):  # in-order assignment: the last one stays
    expected[label] = feature
  memory, seen = jax.jit(losses.write_memory)(
      jnp.zeros((7, 4), jnp.bfloat16), jnp.zeros((7,), bool), features, labels)
  assert memory.dtype == jnp.bfloat16
  np.testing.assert_array_equal(memory, expected.astype(jnp.bfloat16))
  np.testing.assert_array_equal(seen, np.isin(np.arange(7), labels))


def test_write_memory_stops_gradient():
  g = jax.grad(lambda f: jnp.sum(losses.write_memory(
      jnp.zeros((3, 2)), jnp.zeros((3,), bool), f, jnp.array([0, 1]))[0]))(jnp.ones((2, 2)))
  np.testing.assert_array_equal(g, 0.0)


def test_objective_counts_the_sample_to_sample_term_only_when_active():
  s2c = jnp.array([1.0, 3.0])
  s2s = jnp.array([10.0, 30.0])
  f = jax.jit(functools.partial(losses.unitsface_objective, s2c_weight=0.5, s2s_weight=2.0))
  assert float(f(s2c, s2s, False)) == 1.0
  assert float(f(s2c, s2s, True)) == 1.0 + 40.0
  assert float(f(s2c, s2s, jnp.bool_(True))) == 41.0
  g = jax.grad(lambda x: f(s2c, x, jnp.bool_(False)))(s2s)
  np.testing.assert_array_equal(g, 0.0)
  g = jax.grad(lambda x: f(s2c, x, jnp.bool_(True)))(s2s)
  np.testing.assert_array_equal(g, 1.0)
