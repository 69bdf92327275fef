"""ArcFace: CE(s·cos(θ + m·1_y)), per sample.

Reference: ArcFace (arXiv 1801.07698, Eq. 3); insightface arcface_torch losses.py
``ArcFace``. The target logit is plain cos(θ_y + m) for every θ_y: insightface (with
``easy_margin=False``) substitutes cos θ − m·sin m when θ_y > π − m; the two agree for
cos θ_y > cos(π − m). The margin is computed on each sample's target cosine only
(``class_axis.target_cosine``), so the head holds no more than CosFace.
"""

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


def arcface_logits(cos: jax.Array, target: jax.Array, *, scale: float, margin: float,
                   straight_through: bool) -> jax.Array:
  """ArcFace logits s·cos with the target replaced by s·cos(θ_y + m).

  With ``straight_through`` the margin is added as a constant (its gradient is dropped), as
  insightface's in-place logit edit effectively does for the target's derivative, so that
  d loss/d cos = s·(softmax − onehot). cos(θ + m) is finite-gradient at cos = ±1
  (``class_axis.arc_target_logit``).
  """
  cos_y = class_axis.target_cosine(cos, target)
  arc = class_axis.arc_target_logit(cos_y, margin)
  if straight_through:
    arc = cos_y + jax.lax.stop_gradient(arc - cos_y)
  return scale * jnp.where(target, arc[:, None], cos)


def arcface(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0, margin: float = 0.5,
            straight_through: bool = False) -> jax.Array:
  """ArcFace loss of each sample [B] from cosines [B, C] and labels [B], in fp32.

  Args:
    cos: [B, C] cosines to the class centres.
    labels: [B] int labels.
    scale: s.
    margin: additive angular margin m (radians).
    straight_through: if True the margin carries no gradient, so
      d loss/d cos = s·(softmax − onehot) exactly.
  """
  cols, _ = registry.one_device_columns(cos, labels)
  return cols.cross_entropy(arcface_logits(cols.cos, cols.target, scale=scale, margin=margin,
                                           straight_through=straight_through))


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del norms, bias
  return cols.cross_entropy(arcface_logits(
      cols.cos, cols.target, scale=scale, margin=margin,
      straight_through=options["arcface_straight_through"])), stats


LOSS = registry.register(registry.SampleToClassLoss(
    name="arcface", per_sample=_per_sample,
    # True: the margin without gradient, d loss/d cos = s·(softmax − onehot) (insightface).
    options={"arcface_straight_through": False},
    formula="CE(s·cos(θ_y + m))", source="arcface_torch losses.py `ArcFace`",
    values="m 0.5; `arcface_straight_through` False (True: insightface's gradient)"))
