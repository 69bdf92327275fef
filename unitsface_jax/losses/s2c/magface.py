"""MagFace: a margin that grows with the feature norm, plus a norm regulariser.

Reference: IrvingMeng/MagFace models/magface.py ``MagLinear`` (with easy_margin=True, its
default and what run/trainer.py builds: a target with cos_y ≤ 0 gets no margin) and
``MagLoss``; λ_g = 35 and the ranges of run/run.sh. The margin m(a) depends on the clipped
norm with gradient (how MagFace moves the norm), the clip passing the gradient on
[l_a, u_a] as torch's clamp does.
"""

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


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

  cos is clipped to [−1, 1]; cos(θ + m) = cos·cos m − sin θ·sin m with sin θ taken as a
  constant at cos = ±1 (``class_axis.arc_target_logit``).
  """
  c = class_axis.clip_through(cos, -1.0, 1.0)
  c_y = class_axis.target_cosine(c, target)
  m = magface_margin(norms, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m)
  arc = jnp.where(c_y > 0, class_axis.arc_target_logit(c_y, m), c_y)
  return scale * jnp.where(target, arc[:, None], c)


def magface(cos: jax.Array, labels: jax.Array, norms: jax.Array, *, scale: float = 64.0,
            l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
            lambda_g: float = 35.0) -> jax.Array:
  """MagFace loss CE(``magface_logits``) + λ_g·g(‖f‖) of each sample [B].

  The batch mean of these is MagFace's L_id + λ_g·L_g (run/trainer.py).
  """
  cols, dtype = registry.one_device_columns(cos, labels)
  norms = class_axis.as_compute(norms, dtype)
  kw = dict(l_a=l_a, u_a=u_a)
  ce = cols.cross_entropy(magface_logits(cols.cos, cols.target, norms, scale=scale, l_m=l_m,
                                         u_m=u_m, **kw))
  return ce + lambda_g * magface_regularizer(norms, **kw)


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del margin, bias
  kw = dict(l_a=options["magface_l_a"], u_a=options["magface_u_a"])
  logits = magface_logits(cols.cos, cols.target, norms, scale=scale,
                          l_m=options["magface_l_m"], u_m=options["magface_u_m"], **kw)
  regularizer = magface_regularizer(norms, **kw)
  return cols.cross_entropy(logits) + options["magface_lambda_g"] * regularizer, stats


def _check(options, batch_size):
  del batch_size
  l_a, u_a = options["magface_l_a"], options["magface_u_a"]
  l_m, u_m = options["magface_l_m"], options["magface_u_m"]
  if not l_a > 0:
    return "loss.magface_l_a", "must be positive"
  if not u_a > l_a:
    return "loss.magface_u_a", f"must be > loss.magface_l_a = {l_a}"
  if not 0.0 <= l_m < jnp.pi / 2:
    return "loss.magface_l_m", "must be in [0, π/2)"
  if not l_m <= u_m < jnp.pi / 2:
    return "loss.magface_u_m", f"must be in [loss.magface_l_m = {l_m}, π/2)"
  if not options["magface_lambda_g"] >= 0:
    return "loss.magface_lambda_g", "must be >= 0"
  return None


# IrvingMeng/MagFace run/run.sh: the norm range [l_a, u_a] maps to the margin range [l_m, u_m].
_REFERENCE = {"magface_l_a": 10.0, "magface_u_a": 110.0, "magface_l_m": 0.45,
              "magface_u_m": 0.8, "magface_lambda_g": 35.0}

LOSS = registry.register(registry.SampleToClassLoss(
    name="magface", per_sample=_per_sample, options=_REFERENCE, check=_check,
    needs_norms=True, variant="magface", variant_values=_REFERENCE,
    formula="CE with target cos(θ_y + m(a)) where cos_y > 0, m(a) linear from l_m at l_a to "
            "u_m at u_a, a = clip(‖f‖, l_a, u_a); plus λ_g·(a/u_a² + 1/a)",
    source="IrvingMeng/MagFace models/magface.py, run/trainer.py",
    values="`magface_l_a/u_a` 10, 110, `magface_l_m/u_m` 0.45, 0.8, `magface_lambda_g` 35 "
           "(run/run.sh)"))
