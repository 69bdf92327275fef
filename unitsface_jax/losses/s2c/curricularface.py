"""CurricularFace: ArcFace's target, hard negatives re-weighted by a running t.

Reference: HuangYG123/CurricularFace head/metrics.py ``CurricularFace.forward``, matched
(also where it does something odd): t (from 0) is updated with the batch before it is used,
and the negatives are compared with the plain cos(θ_y + m) even where the target takes the
fallback. In the class-sharded head t is computed from the target cosines that ``psum``
gives every device, so it is the same everywhere.
"""

import math

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


def curricular_t(t: jax.Array, cos_target: jax.Array, *, alpha: float) -> jax.Array:
  """CurricularFace's t after one batch: α·mean_i(cos θ_{y_i}) + (1 − α)·t, stop-gradient
  (α = 0.01 in the reference, t starts at 0, the cosines clipped to [−1, 1])."""
  c = jnp.clip(jax.lax.stop_gradient(cos_target), -1.0, 1.0)
  return alpha * jnp.mean(c) + (1.0 - alpha) * t


def curricular_logits(cos: jax.Array, target: jax.Array, t: jax.Array, *, scale: float,
                      margin: float,
                      class_sum: class_axis.ClassReduce = class_axis.identity) -> jax.Array:
  """CurricularFace logits: hard negatives re-weighted to cos·(t + cos), ArcFace target.

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
  cos_y = class_sum(class_axis.target_cosine(c, target))
  cos_y_m = class_axis.arc_target_logit(cos_y, margin)
  final = jnp.where(cos_y > math.cos(math.pi - margin), cos_y_m,
                    cos_y - math.sin(math.pi - margin) * margin)
  hard = c > cos_y_m[:, None]
  t = jax.lax.stop_gradient(t)
  logits = jnp.where(hard, c * (t + c), c)
  return scale * jnp.where(target, final[:, None], logits)


def curricularface(cos: jax.Array, labels: jax.Array, t: jax.Array, *, scale: float = 64.0,
                   margin: float = 0.5) -> jax.Array:
  """CurricularFace loss CE(``curricular_logits``) of each sample [B]; t is this step's."""
  cols, _ = registry.one_device_columns(cos, labels)
  return cols.cross_entropy(curricular_logits(cols.cos, cols.target, t, scale=scale,
                                              margin=margin))


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del norms, bias
  t = curricular_t(stats["t"], cols.target_value(cols.cos), alpha=options["curricular_alpha"])
  logits = curricular_logits(cols.cos, cols.target, t, scale=scale, margin=margin,
                             class_sum=cols.class_sum)
  return cols.cross_entropy(logits), {"t": t}


def _check(options, batch_size):
  del batch_size
  if not 0.0 < options["curricular_alpha"] <= 1.0:
    return "loss.curricular_alpha", "must be in (0, 1]"
  return None


LOSS = registry.register(registry.SampleToClassLoss(
    name="curricularface", per_sample=_per_sample, options={"curricular_alpha": 0.01},
    check=_check, initial_stats={"t": 0.0},
    variant="curricularface", variant_values={"s2c_margin": 0.5, "curricular_alpha": 0.01},
    formula="target ArcFace (cos_y − m·sin m past π − m); negatives with cos_j > "
            "cos(θ_y + m) become cos_j·(t + cos_j)",
    source="HuangYG123/CurricularFace head/metrics.py",
    values="m 0.5, `curricular_alpha` 0.01"))
