"""Margin softmax losses beyond CosFace and ArcFace: combined margin, AdaFace, CurricularFace,
MagFace; and the running statistics of AdaFace and CurricularFace.

Each ``*_logits`` function takes cosines ``cos`` [B, C_local] to the class centres (local
classes; all classes on one device), the bool one-hot ``target`` [B, C_local] on those
classes, and per-sample quantities [B] (feature norms, running statistics), and returns the
margin logits that ``class_axis.softmax_cross_entropy`` turns into per-sample losses. A sum
over the classes is finished by ``class_sum`` (the identity on one device, ``lax.psum`` in
the class-sharded head). The single-device wrappers (``combined_margin``, ``adaface``,
``curricularface``, ``magface``) return per-sample losses [B]. The statistics are inputs,
never state: the caller updates them (``adaface_statistics``, ``curricular_t``) once per
forward pass, before using them, as the reference implementations do.
"""

import math

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis

# AdaFace's eps (mk-minchul/AdaFace head.py): cosines are clipped to [-1 + eps, 1 - eps] and
# the angle θ + g_angle to [eps, π - eps].
ADAFACE_EPS = 1e-3


def _target_value(x, target, class_sum):
  """x at each sample's own class [B] (0 where no shard holds the target)."""
  return class_sum(jnp.sum(jnp.where(target, x, 0.0), axis=-1))


def _safe_arccos(c: jax.Array) -> jax.Array:
  """arccos(c) for c in [-1, 1] whose gradient at c = ±1 (infinite) is taken as 0."""
  inner = jnp.abs(c) < 1.0
  return jnp.where(inner, jnp.arccos(jnp.where(inner, c, 0.0)),
                   jnp.arccos(jax.lax.stop_gradient(c)))


def feature_norm(features: jax.Array) -> jax.Array:
  """‖f_i‖ [B] of the raw embeddings, with gradient f/‖f‖ (0 at f = 0, not NaN)."""
  sq = jnp.sum(features * features, axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ------------------------------------------------------------------------------ combined margin


def combined_margin_logits(cos: jax.Array, target: jax.Array, *, scale: float, m1: float,
                           m2: float, m3: float, straight_through: bool = False) -> jax.Array:
  """s·cos for other classes, s·(cos(m1·θ_y + m2) − m3) for the target.

  The combined margin of ArcFace (arXiv 1801.07698, Eq. 4; insightface arcface_torch
  losses.py ``CombinedMarginLoss``): m1 SphereFace's multiplicative, m2 ArcFace's additive
  angular, m3 CosFace's additive cosine margin. Like ``CombinedMarginLoss`` (which takes
  arccos, adds m2 and takes cos), the target logit is cos(m1·θ + m2) for every θ: past
  m1·θ + m2 = π it rises again; nothing substitutes a monotonic value there (the older
  insightface ``ArcFace`` used cos θ − m·sin m beyond π − m, not reproduced). cos is clipped
  to [−1, 1]. With m1 = 1 the target is computed as cos·cos m2 − sin θ·sin m2
  (``class_axis.arc_target_logit``: finite gradient at cos = ±1); otherwise through arccos,
  whose gradient at cos = ±1 is taken as 0. ``straight_through`` drops the margin's gradient
  (d logit/d cos = s), as arcface_torch's in-place edit under ``torch.no_grad`` does.
  """
  c = class_axis.clip_through(cos, -1.0, 1.0)
  c_y = class_axis.target_cosine(c, target)
  if m1 == 1.0:
    arc = class_axis.arc_target_logit(c_y, m2)
  else:
    arc = jnp.cos(m1 * _safe_arccos(c_y) + m2)
  arc = arc - m3
  if straight_through:
    arc = c_y + jax.lax.stop_gradient(arc - c_y)
  return scale * jnp.where(target, arc[:, None], c)


# ------------------------------------------------------------------------------------- AdaFace


def adaface_statistics(norms: jax.Array, batch_mean: jax.Array, batch_std: jax.Array, *,
                       t_alpha: float) -> tuple[jax.Array, jax.Array]:
  """AdaFace's running mean and std of the feature norms after one batch (stop-gradient).

  Reference: mk-minchul/AdaFace head.py: the norms are clipped to [0.001, 100], and
  batch_mean ← t_alpha·mean + (1 − t_alpha)·batch_mean, batch_std likewise with the
  *unbiased* std (torch ``Tensor.std``) of this batch. Initial values 20 and 100.

  Args:
    norms: [B] feature norms of the whole (global) batch.
    batch_mean: [] running mean before this batch.
    batch_std: [] running std before this batch.
    t_alpha: the EMA weight of this batch (AdaFace's default 0.01; 1 uses this batch only).

  Returns:
    (new batch_mean, new batch_std).
  """
  safe = jax.lax.stop_gradient(jnp.clip(norms, 0.001, 100.0))
  mean = jnp.mean(safe)
  std = jnp.std(safe, ddof=1)
  return (t_alpha * mean + (1.0 - t_alpha) * batch_mean,
          t_alpha * std + (1.0 - t_alpha) * batch_std)


def adaface_logits(cos: jax.Array, target: jax.Array, norms: jax.Array, batch_mean: jax.Array,
                   batch_std: jax.Array, *, scale: float, margin: float, h: float) -> jax.Array:
  """AdaFace logits s·cos(clip(θ + g_angle)) − s·g_add on the target, s·cos elsewhere.

  Reference: mk-minchul/AdaFace head.py ``AdaFace.forward``, matched step by step:
  cos clipped to [−1 + ε, 1 − ε] for every class (ε = 1e-3); the margin scaler
  z = clip(h·(clip(‖f‖, 0.001, 100) − μ)/(σ + ε), −1, 1) with μ, σ the running statistics
  *after* this batch's update (``adaface_statistics``) and no gradient through ‖f‖;
  g_angle = −m·z, g_add = m + m·z; θ = arccos(cos), the target's θ + g_angle clipped to
  [ε, π − ε] (the others' θ is already inside). Gradients follow torch's: a clip passes the
  gradient on its closed interval and stops it outside.

  Args:
    cos: [B, C_local] cosines.
    target: [B, C_local] bool one-hot of the labels on the local classes.
    norms: [B] feature norms ‖f_i‖ of the raw embeddings.
    batch_mean, batch_std: [] running statistics (already updated with this batch).
    scale: s.
    margin: m.
    h: AdaFace's h (0.333: 68% of the scalers in [−1/3, 1/3]).

  Returns:
    [B, C_local] logits.
  """
  eps = ADAFACE_EPS
  c = class_axis.clip_through(cos, -1.0 + eps, 1.0 - eps)
  safe = jax.lax.stop_gradient(jnp.clip(norms, 0.001, 100.0))
  scaler = (safe - batch_mean) / (batch_std + eps) * h
  scaler = jax.lax.stop_gradient(jnp.clip(scaler, -1.0, 1.0))[:, None]
  # Off the target, cos(θ) with θ already inside [ε, π − ε] is c itself: only the target
  # column's angle is computed (class_axis.target_cosine).
  scaler = scaler[:, 0]
  theta_m = class_axis.clip_through(jnp.arccos(class_axis.target_cosine(c, target))
                                    - margin * scaler, eps, math.pi - eps)
  target_logit = jnp.cos(theta_m) - (margin + margin * scaler)
  return scale * jnp.where(target, target_logit[:, None], c)


# ------------------------------------------------------------------------------ CurricularFace


def curricular_t(t: jax.Array, cos_target: jax.Array, *, alpha: float) -> jax.Array:
  """CurricularFace's t after one batch: α·mean_i(cos θ_{y_i}) + (1 − α)·t, stop-gradient.

  Reference: HuangYG123/CurricularFace head/metrics.py (α = 0.01 there, t starts at 0; the
  cosines are clipped to [−1, 1]).
  """
  c = jnp.clip(jax.lax.stop_gradient(cos_target), -1.0, 1.0)
  return alpha * jnp.mean(c) + (1.0 - alpha) * t


def curricular_logits(cos: jax.Array, target: jax.Array, t: jax.Array, *, scale: float,
                      margin: float,
                      class_sum: class_axis.ClassReduce = class_axis.identity) -> jax.Array:
  """CurricularFace logits: hard negatives re-weighted to cos·(t + cos), ArcFace target.

  Reference: HuangYG123/CurricularFace head/metrics.py ``CurricularFace.forward``, matched:
  cos clipped to [−1, 1]; a class j ≠ y is hard when cos_j > cos(θ_y + m) (the plain
  cos(θ_y + m), also where the target uses the fallback) and its logit is s·cos_j·(t + cos_j)
  with t the running value *after* this batch's update (``curricular_t``), no gradient
  through t; the target logit is s·cos(θ_y + m) when cos_y > cos(π − m), else
  s·(cos_y − m·sin m) (sin(π − m)·m). cos(θ + m) = cos·cos m − sin θ·sin m with sin θ taken
  as a constant at cos = ±1 (``class_axis.arc_target_logit``), where torch's gradient is
  infinite.

  Args:
    cos: [B, C_local] cosines.
    target: [B, C_local] bool one-hot of the labels on the local classes.
    t: [] running t.
    scale: s.
    margin: m.
    class_sum: finishes a [B] sum over all class shards (to find cos_y).

  Returns:
    [B, C_local] logits.
  """
  c = class_axis.clip_through(cos, -1.0, 1.0)
  cos_y = _target_value(c, target, class_sum)
  cos_y_m = class_axis.arc_target_logit(cos_y, margin)
  final = jnp.where(cos_y > math.cos(math.pi - margin), cos_y_m,
                    cos_y - math.sin(math.pi - margin) * margin)
  hard = c > cos_y_m[:, None]
  t = jax.lax.stop_gradient(t)
  logits = jnp.where(hard, c * (t + c), c)
  return scale * jnp.where(target, final[:, None], logits)


# ------------------------------------------------------------------------------------- MagFace


def magface_margin(norms: jax.Array, *, l_a: float, u_a: float, l_m: float,
                   u_m: float) -> jax.Array:
  """m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m for a = clip(‖f‖, l_a, u_a), [B]."""
  a = class_axis.clip_through(norms, l_a, u_a)
  return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(norms: jax.Array, *, l_a: float, u_a: float) -> jax.Array:
  """g(a) = a/u_a² + 1/a for a = clip(‖f‖, l_a, u_a), per sample [B] (MagFace's L_g)."""
  a = class_axis.clip_through(norms, l_a, u_a)
  return a / (u_a * u_a) + 1.0 / a


def magface_logits(cos: jax.Array, target: jax.Array, norms: jax.Array, *, scale: float,
                   l_a: float, u_a: float, l_m: float, u_m: float) -> jax.Array:
  """MagFace logits: s·cos(θ_y + m(a)) on the target when cos_y > 0, s·cos elsewhere.

  Reference: IrvingMeng/MagFace models/magface.py ``MagLinear`` (with easy_margin=True, its
  default and what run/trainer.py builds: a target with cos_y ≤ 0 gets no margin) and
  ``MagLoss``. The margin m(a) depends on the clipped norm with gradient (how MagFace moves
  the norm), the clip passing the gradient on [l_a, u_a] as torch's clamp does. cos is
  clipped to [−1, 1]; cos(θ + m) = cos·cos m − sin θ·sin m with sin θ taken as a constant at
  cos = ±1.
  """
  c = class_axis.clip_through(cos, -1.0, 1.0)
  c_y = class_axis.target_cosine(c, target)
  m = magface_margin(norms, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m)
  sin_sq = 1.0 - c_y * c_y
  positive = sin_sq > 0
  sin_theta = jnp.where(positive, jnp.sqrt(jnp.where(positive, sin_sq, 1.0)), 0.0)
  arc = c_y * jnp.cos(m) - sin_theta * jnp.sin(m)
  arc = jnp.where(c_y > 0, arc, c_y)
  return scale * jnp.where(target, arc[:, None], c)


# ------------------------------------------------------------------- single-device per-sample


def _prepare(cos, labels):
  dtype = class_axis.compute_dtype(cos)
  cos = class_axis.as_compute(cos, dtype)
  target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return cos, target, dtype


def _cross_entropy(logits, target):
  return class_axis.softmax_cross_entropy(logits, target, jnp.ones_like(target))


def combined_margin(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                    m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                    straight_through: bool = False) -> jax.Array:
  """Combined margin loss CE(``combined_margin_logits``), per sample [B]."""
  cos, target, _ = _prepare(cos, labels)
  return _cross_entropy(combined_margin_logits(cos, target, scale=scale, m1=m1, m2=m2, m3=m3,
                                               straight_through=straight_through), target)


def adaface(cos: jax.Array, labels: jax.Array, norms: jax.Array, batch_mean: jax.Array,
            batch_std: jax.Array, *, scale: float = 64.0, margin: float = 0.4,
            h: float = 0.333) -> jax.Array:
  """AdaFace loss CE(``adaface_logits``), per sample [B]; the statistics are this step's."""
  cos, target, dtype = _prepare(cos, labels)
  norms = class_axis.as_compute(norms, dtype)
  return _cross_entropy(adaface_logits(cos, target, norms, batch_mean, batch_std,
                                       scale=scale, margin=margin, h=h), target)


def curricularface(cos: jax.Array, labels: jax.Array, t: jax.Array, *, scale: float = 64.0,
                   margin: float = 0.5) -> jax.Array:
  """CurricularFace loss CE(``curricular_logits``), per sample [B]; t is this step's."""
  cos, target, _ = _prepare(cos, labels)
  return _cross_entropy(curricular_logits(cos, target, t, scale=scale, margin=margin), target)


def magface(cos: jax.Array, labels: jax.Array, norms: jax.Array, *, scale: float = 64.0,
            l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
            lambda_g: float = 35.0) -> jax.Array:
  """MagFace loss CE(``magface_logits``) + λ_g·g(‖f‖), per sample [B].

  The batch mean of these is MagFace's L_id + λ_g·L_g (run/trainer.py; λ_g = 35 in its
  run/run.sh).
  """
  cos, target, dtype = _prepare(cos, labels)
  norms = class_axis.as_compute(norms, dtype)
  kw = dict(l_a=l_a, u_a=u_a)
  ce = _cross_entropy(magface_logits(cos, target, norms, scale=scale, l_m=l_m, u_m=u_m, **kw),
                      target)
  return ce + lambda_g * magface_regularizer(norms, **kw)
