"""Combined margin, AdaFace, CurricularFace and MagFace against float64 PyTorch references.

Each reference below re-states the official forward pass in float64 PyTorch, step by step
(insightface arcface_torch losses.py ``CombinedMarginLoss`` and the ArcFace paper's Eq. 4;
mk-minchul/AdaFace head.py; HuangYG123/CurricularFace head/metrics.py; IrvingMeng/MagFace
models/magface.py and run/trainer.py), with per-sample losses instead of the batch mean, and
autograd gives the reference gradients. The package functions run in float64 (x64) and in
float32. Edge cases: cosines of exactly ±1 (where the official code's gradient is infinite:
there only the values and the other entries' gradients are compared, and the package's
gradient must be finite), target angles with θ + m past π, and feature norms of 0, 1e-6 and
1e6.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitsface_jax import losses
from unitsface_jax.losses import margin

S = 64.0


# --------------------------------------------------------------------------------------------
# Float64 PyTorch references (per-sample losses; statistics returned where they change).
# --------------------------------------------------------------------------------------------


def _onehot(labels, num_classes):
  return F.one_hot(labels, num_classes).bool()


def _ce(logits, labels):
  return F.cross_entropy(logits, labels, reduction="none")


def torch_combined(cos, labels, s=S, m1=1.0, m2=0.3, m3=0.2):
  """cos(m1·θ_y + m2) − m3 on the target, cos elsewhere (ArcFace paper, Eq. 4)."""
  c = cos.clamp(-1.0, 1.0)
  theta = torch.acos(c)
  target = torch.cos(m1 * theta + m2) - m3
  return _ce(s * torch.where(_onehot(labels, c.shape[1]), target, c), labels)


def torch_adaface(cos, labels, norms, batch_mean, batch_std, s=S, m=0.4, h=0.333,
                  t_alpha=0.01):
  """AdaFace.forward: statistics updated first, then margins from them."""
  eps = 1e-3
  cosine = cos.clamp(-1 + eps, 1 - eps)
  safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
  with torch.no_grad():
    batch_mean = safe_norms.mean() * t_alpha + (1 - t_alpha) * batch_mean
    batch_std = safe_norms.std() * t_alpha + (1 - t_alpha) * batch_std
  scaler = torch.clip((safe_norms - batch_mean) / (batch_std + eps) * h, -1, 1)[:, None]
  onehot = _onehot(labels, cos.shape[1]).double()
  theta = cosine.acos()
  theta_m = torch.clip(theta + onehot * (-m * scaler), min=eps, max=math.pi - eps)
  logits = (theta_m.cos() - onehot * (m + m * scaler)) * s
  return _ce(logits, labels), batch_mean, batch_std


def torch_curricular(cos, labels, t, s=S, m=0.5, alpha=0.01):
  """CurricularFace.forward: t updated first, hard negatives re-weighted."""
  cos_theta = cos.clamp(-1, 1)
  rows = torch.arange(cos.shape[0])
  target_logit = cos_theta[rows, labels].view(-1, 1)
  sin_theta = torch.sqrt(1.0 - target_logit**2)
  cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
  hard = cos_theta > cos_theta_m
  final = torch.where(target_logit > math.cos(math.pi - m), cos_theta_m,
                      target_logit - math.sin(math.pi - m) * m)
  with torch.no_grad():
    t = target_logit.mean() * alpha + (1 - alpha) * t
  logits = torch.where(hard, cos_theta * (t + cos_theta), cos_theta)
  logits = torch.where(_onehot(labels, cos.shape[1]), final, logits)
  return _ce(s * logits, labels), t


def torch_magface(cos, labels, norms, s=S, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8,
                  lambda_g=35.0):
  """MagLinear (easy_margin=True) + MagLoss: CE_i + λ_g·g(a_i)."""
  x_norm = norms.clamp(l_a, u_a)[:, None]
  ada = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
  cos_theta = cos.clamp(-1, 1)
  sin_theta = torch.sqrt(1.0 - cos_theta**2)
  cos_theta_m = cos_theta * torch.cos(ada) - sin_theta * torch.sin(ada)
  cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)
  output = torch.where(_onehot(labels, cos.shape[1]), cos_theta_m, cos_theta)
  g = 1 / (u_a**2) * x_norm[:, 0] + 1 / x_norm[:, 0]
  return _ce(s * output, labels) + lambda_g * g


# --------------------------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------------------------

B, C = 6, 7


def make_case(kind, seed=0):
  """(cos [B, C], labels [B], norms [B]) in float64."""
  rng = np.random.default_rng(seed)
  cos = rng.uniform(-0.9, 0.9, (B, C))
  labels = rng.integers(0, C, B)
  norms = rng.uniform(5.0, 120.0, B)
  rows = np.arange(B)
  if kind == "poles":  # targets and negatives at exactly ±1
    cos[0, labels[0]] = 1.0
    cos[1, labels[1]] = -1.0
    cos[2, (labels[2] + 1) % C] = 1.0
    cos[3, (labels[3] + 1) % C] = -1.0
    cos[4, labels[4]] = 1.0
    cos[4, (labels[4] + 2) % C] = 1.0
  elif kind == "past_pi":  # θ_y + m > π (and the MagFace/AdaFace margins' too)
    cos[rows, labels] = np.array([-0.999, -0.99, -0.97, -0.95, -0.9, -0.8])
    # negatives between the fallback cos_y − m·sin m and cos(θ_y + m), which rises past π:
    # CurricularFace calls them hard by the latter
    cos[rows[:2], (labels[:2] + 1) % C] = [-0.95, -0.93]
  elif kind == "norms":  # zero, tiny and huge feature norms, norms at the clip bounds
    norms = np.array([0.0, 1e-6, 1e6, 10.0, 110.0, 100.0])
  elif kind == "interior":
    # some negatives above the target (CurricularFace's hard examples)
    cos[rows[:3], (labels[:3] + 1) % C] = cos[rows[:3], labels[:3]] + 0.05
  else:
    raise ValueError(kind)
  return np.clip(cos, -1.0, 1.0), labels, norms


KINDS = ("interior", "poles", "past_pi", "norms")
WEIGHTS = np.linspace(0.5, 1.5, B)  # d Σ w_i L_i: mixes the per-sample gradients distinctly


def torch_grads(fn, cos, labels, norms=None, **kw):
  """(per-sample values, d Σ w L / d cos, d Σ w L / d norms or None) of a reference."""
  tcos = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
  args = [tcos, torch.tensor(labels)]
  tnorms = None
  if norms is not None:
    tnorms = torch.tensor(norms, dtype=torch.float64, requires_grad=True)
    args.append(tnorms)
  out = fn(*args, **kw)
  values = out[0] if isinstance(out, tuple) else out
  (values * torch.tensor(WEIGHTS)).sum().backward()
  extra = [o.detach().numpy() for o in out[1:]] if isinstance(out, tuple) else []
  gnorms = None if tnorms is None or tnorms.grad is None else tnorms.grad.numpy()
  return values.detach().numpy(), tcos.grad.numpy(), gnorms, extra


def package_grads(fn, cos, labels, norms=None, dtype=jnp.float64):
  """(values, d Σ w L / d cos, d Σ w L / d norms) of a package loss ``fn(cos, labels[, norms])``."""
  args = [jnp.asarray(cos, dtype)] + ([] if norms is None else [jnp.asarray(norms, dtype)])

  def total(*a):
    values = fn(a[0], jnp.asarray(labels), *a[1:])
    return jnp.sum(values * jnp.asarray(WEIGHTS, values.dtype)), values

  grads, values = jax.grad(total, argnums=tuple(range(len(args))), has_aux=True)(*args)
  return (np.asarray(values, np.float64), np.asarray(grads[0], np.float64),
          None if norms is None else np.asarray(grads[1], np.float64))


def assert_matches(got, want, rtol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  finite = np.isfinite(want)
  assert np.all(np.isfinite(got)), f"{what}: non-finite {got}"
  floor = rtol * max(float(np.max(np.abs(np.where(finite, want, 0.0)))), 1.0)
  np.testing.assert_allclose(np.where(finite, got, 0.0), np.where(finite, want, 0.0),
                             rtol=rtol, atol=floor, err_msg=what)


def check(package_fn, torch_fn, kind, *, uses_norms=False, torch_kw=None, x64=True):
  cos, labels, norms = make_case(kind)
  norms_arg = norms if uses_norms else None
  want, want_dcos, want_dnorms, extra = torch_grads(torch_fn, cos, labels, norms_arg,
                                                    **(torch_kw or {}))
  rtol = 1e-9 if x64 else 2e-4
  dtype = jnp.float64 if x64 else jnp.float32
  with jax.enable_x64(x64):
    got, dcos, dnorms = package_grads(package_fn, cos, labels, norms_arg, dtype)
  assert_matches(got, want, rtol, f"{kind}: values")
  assert_matches(dcos, want_dcos, rtol, f"{kind}: d/d cos")
  if want_dnorms is not None:
    assert_matches(dnorms, want_dnorms, rtol, f"{kind}: d/d norms")
  return extra


precisions = pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
kinds = pytest.mark.parametrize("kind", KINDS)


# --------------------------------------------------------------------------------------------
# Per-sample values and gradients.
# --------------------------------------------------------------------------------------------


@precisions
@kinds
@pytest.mark.parametrize("m", [(1.0, 0.3, 0.2), (1.0, 0.5, 0.0), (1.35, 0.25, 0.1),
                               (0.9, 0.0, 0.35)], ids=str)
def test_combined_margin(kind, m, x64):
  m1, m2, m3 = m
  check(lambda c, y: losses.combined_margin(c, y, m1=m1, m2=m2, m3=m3),
        torch_combined, kind, torch_kw=dict(m1=m1, m2=m2, m3=m3), x64=x64)


@precisions
@kinds
@pytest.mark.parametrize("stats", [(20.0, 100.0), (30.0, 4.0)], ids=["initial", "trained"])
def test_adaface(kind, stats, x64):
  mean0, std0 = stats
  cos, labels, norms = make_case(kind)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    mean, std = losses.adaface_statistics(jnp.asarray(norms, dtype), mean0, std0, t_alpha=0.01)

  def package(c, y, n):
    return losses.adaface(c, y, n, mean.astype(c.dtype), std.astype(c.dtype))

  want_mean, want_std = check(package, torch_adaface, kind, uses_norms=True,
                              torch_kw=dict(batch_mean=mean0, batch_std=std0), x64=x64)
  rtol = 1e-12 if x64 else 1e-6
  np.testing.assert_allclose(mean, want_mean, rtol=rtol, err_msg="batch_mean")
  np.testing.assert_allclose(std, want_std, rtol=rtol, err_msg="batch_std")


@precisions
@kinds
@pytest.mark.parametrize("t0", [0.0, 0.4])
def test_curricularface(kind, t0, x64):
  cos, labels, _ = make_case(kind)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    cos_y = jnp.asarray(cos[np.arange(B), labels], dtype)
    t = losses.curricular_t(jnp.asarray(t0, dtype), cos_y, alpha=0.01)

  want_t, = check(lambda c, y: losses.curricularface(c, y, t.astype(c.dtype)),
                  torch_curricular, kind, torch_kw=dict(t=t0), x64=x64)
  np.testing.assert_allclose(t, want_t, rtol=1e-12 if x64 else 1e-6, err_msg="t")


@precisions
@kinds
def test_magface(kind, x64):
  check(losses.magface, torch_magface, kind, uses_norms=True, x64=x64)


# --------------------------------------------------------------------------------------------
# Behaviours the references share, checked directly.
# --------------------------------------------------------------------------------------------


def test_combined_target_logit_rises_again_past_pi():
  """As insightface's arccos → + m2 → cos: nothing monotonic is substituted past π."""
  cos = jnp.array([[-0.99, 0.0], [-0.9, 0.0]])
  logits = margin.combined_margin_logits(cos, jnp.array([[True, False]] * 2), scale=1.0,
                                         m1=1.0, m2=0.5, m3=0.0)
  assert float(logits[0, 0]) > float(logits[1, 0])  # θ + m > π: the lower cosine scores higher
  np.testing.assert_allclose(logits[:, 0], np.cos(np.arccos([-0.99, -0.9]) + 0.5), rtol=1e-6)


def test_combined_straight_through_has_the_plain_softmax_gradient():
  cos, labels, _ = make_case("interior")
  grad = jax.grad(lambda c: jnp.sum(losses.combined_margin(c, labels, straight_through=True)))(
      jnp.asarray(cos, jnp.float32))
  logits = margin.combined_margin_logits(jnp.asarray(cos), jax.nn.one_hot(labels, C) > 0,
                                         scale=S, m1=1.0, m2=0.3, m3=0.2)
  want = S * (jax.nn.softmax(logits) - jax.nn.one_hot(labels, C))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_poles_have_finite_gradients_with_the_documented_convention():
  """At cos = ±1 the official gradients are infinite; the package's are finite."""
  cos, labels, norms = make_case("poles")
  fns = [lambda c: losses.combined_margin(c, labels),
         lambda c: losses.combined_margin(c, labels, m1=1.35),
         lambda c: losses.curricularface(c, labels, 0.3),
         lambda c: losses.magface(c, labels, jnp.asarray(norms, jnp.float32)),
         lambda c: losses.adaface(c, labels, jnp.asarray(norms, jnp.float32), 20.0, 100.0)]
  for fn in fns:
    grad = jax.grad(lambda c: jnp.sum(fn(c)))(jnp.asarray(cos, jnp.float32))
    assert np.all(np.isfinite(grad))


def test_feature_norm_gradient_is_zero_at_zero():
  f = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(losses.feature_norm(f), [0.0, 5.0])
  grad = jax.grad(lambda x: jnp.sum(losses.feature_norm(x)))(f)
  np.testing.assert_allclose(grad, [[0.0, 0.0], [0.6, 0.8]])


def test_adaface_statistics_use_the_unbiased_std_of_clipped_norms():
  norms = np.array([0.0, 2.0, 500.0, 6.0])
  mean, std = losses.adaface_statistics(jnp.asarray(norms), 20.0, 100.0, t_alpha=1.0)
  clipped = np.clip(norms, 0.001, 100.0)
  np.testing.assert_allclose(mean, clipped.mean(), rtol=1e-6)
  np.testing.assert_allclose(std, clipped.std(ddof=1), rtol=1e-6)
