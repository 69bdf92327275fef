"""AdaFace: a margin scaled by each sample's feature norm against running norm statistics.

Reference: mk-minchul/AdaFace head.py ``AdaFace.forward``, matched step by step (also where
it does something odd): every cosine clipped to [−1 + ε, 1 − ε] (ε = 1e-3); the norms
clipped to [0.001, 100] with no gradient through them; the running mean μ and *unbiased* std
σ of the norms (from 20 and 100) updated with the batch before the loss uses them. In the
class-sharded head the statistics are those of the whole global batch, the same on every
device, updated once per train step (``update_stats``, outside the class-sharded part).
"""

import math

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry

# AdaFace's eps (mk-minchul/AdaFace head.py): cosines are clipped to [-1 + eps, 1 - eps] and
# the angle θ + g_angle to [eps, π - eps].
ADAFACE_EPS = 1e-3


def adaface_statistics(norms: jax.Array, batch_mean: jax.Array, batch_std: jax.Array, *,
                       t_alpha: float) -> tuple[jax.Array, jax.Array]:
  """AdaFace's running mean and std of the feature norms after one batch (stop-gradient).

  batch_mean ← t_alpha·mean + (1 − t_alpha)·batch_mean, batch_std likewise with the
  *unbiased* std (torch ``Tensor.std``) of this batch's norms clipped to [0.001, 100].

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

  The margin scaler z = clip(h·(clip(‖f‖, 0.001, 100) − μ)/(σ + ε), −1, 1) with μ, σ the
  running statistics *after* this batch's update and no gradient through ‖f‖;
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
  scaler = jax.lax.stop_gradient(jnp.clip(scaler, -1.0, 1.0))
  # Off the target, cos(θ) with θ already inside [ε, π − ε] is c itself: only the target
  # column's angle is computed (class_axis.target_cosine).
  theta_m = class_axis.clip_through(jnp.arccos(class_axis.target_cosine(c, target))
                                    - margin * scaler, eps, math.pi - eps)
  target_logit = jnp.cos(theta_m) - (margin + margin * scaler)
  return scale * jnp.where(target, target_logit[:, None], c)


def adaface(cos: jax.Array, labels: jax.Array, norms: jax.Array, batch_mean: jax.Array,
            batch_std: jax.Array, *, scale: float = 64.0, margin: float = 0.4,
            h: float = 0.333) -> jax.Array:
  """AdaFace loss CE(``adaface_logits``) of each sample [B]; the statistics are this step's."""
  cols, dtype = registry.one_device_columns(cos, labels)
  norms = class_axis.as_compute(norms, dtype)
  return cols.cross_entropy(adaface_logits(cols.cos, cols.target, norms, batch_mean, batch_std,
                                           scale=scale, margin=margin, h=h))


def _update_stats(norms, stats, options):
  mean, std = adaface_statistics(norms, stats["norm_mean"], stats["norm_std"],
                                 t_alpha=options["adaface_t_alpha"])
  return {"norm_mean": mean, "norm_std": std}


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del bias
  return cols.cross_entropy(adaface_logits(
      cols.cos, cols.target, norms, stats["norm_mean"], stats["norm_std"], scale=scale,
      margin=margin, h=options["adaface_h"])), stats


def _check(options, batch_size):
  if not options["adaface_h"] >= 0:
    return "loss.adaface_h", "must be >= 0"
  if not 0.0 < options["adaface_t_alpha"] <= 1.0:
    return "loss.adaface_t_alpha", "must be in (0, 1]"
  if batch_size < 2:
    return "batch_size", ("AdaFace's norm statistics need a global batch of at least 2 "
                          "(an unbiased std)")
  return None


# mk-minchul/AdaFace scripts/run_ir50_ms1mv2.sh, config.py; t_alpha is the EMA weight of the
# batch's norm mean and std.
_REFERENCE = {"adaface_h": 0.333, "adaface_t_alpha": 0.01}

LOSS = registry.register(registry.SampleToClassLoss(
    name="adaface", per_sample=_per_sample, options=_REFERENCE, check=_check,
    initial_stats={"norm_mean": 20.0, "norm_std": 100.0}, needs_norms=True,
    update_stats=_update_stats,
    variant="adaface", variant_values={"s2c_margin": 0.4, **_REFERENCE},
    formula="target s·cos(clip(θ_y − m·z, ε, π − ε)) − s·(m + m·z), "
            "z = clip(h·(‖f‖ − μ)/(σ + ε), −1, 1)",
    source="mk-minchul/AdaFace head.py",
    values="m 0.4, `adaface_h` 0.333, `adaface_t_alpha` 0.01 (scripts/run_ir50_ms1mv2.sh, "
           "config.py)"))
