"""Sample-to-class losses: CosFace, ArcFace, normalized BCE and UCE, per sample.

Every function takes cosines ``cos`` [B, C] between the embeddings and the class centres W
and integer ``labels`` [B] in [0, C), and returns the per-sample losses [B], computed in fp32
whatever the input dtype (float64 inputs stay float64). Batch means are the caller's.
"""

import math

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis


def _prepare(cos, labels):
  dtype = class_axis.compute_dtype(cos)
  cos = class_axis.as_compute(cos, dtype)
  target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return cos, target, dtype


def cosface(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
            margin: float = 0.4) -> jax.Array:
  """CosFace: CE(s·(cos − m·onehot(y)), y), per sample [B].

  Reference: CosFace (arXiv 1801.09414, Eq. 4); CVI-SZU/UniTSFace head.py
  ``Normalized_Softmax_Loss``; insightface arcface_torch losses.py ``CosFace``.
  """
  cos, target, _ = _prepare(cos, labels)
  logits = scale * (cos - margin * target)
  return class_axis.softmax_cross_entropy(logits, target, jnp.ones_like(target))


def arcface_logits(cos: jax.Array, target: jax.Array, *, scale: float, margin: float,
                   straight_through: bool) -> jax.Array:
  """ArcFace logits s·cos with the target replaced by s·cos(θ_y + m).

  With ``straight_through`` the margin is added as a constant (its gradient is dropped), as
  insightface's in-place logit edit effectively does for the target's derivative, so that
  d loss/d cos = s·(softmax − onehot).
  """
  cos_y = class_axis.target_cosine(cos, target)
  arc = class_axis.arc_target_logit(cos_y, margin)
  if straight_through:
    arc = cos_y + jax.lax.stop_gradient(arc - cos_y)
  return scale * jnp.where(target, arc[:, None], cos)


def arcface(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0, margin: float = 0.5,
            straight_through: bool = False) -> jax.Array:
  """ArcFace: CE(s·cos(θ + m·onehot(y)), y), per sample [B].

  Reference: ArcFace (arXiv 1801.07698, Eq. 3); insightface arcface_torch losses.py
  ``ArcFace``. The target logit is plain cos(θ_y + m) for every θ_y: insightface (with
  ``easy_margin=False``) substitutes cos θ − m·sin m when θ_y > π − m; the two agree for
  cos θ_y > cos(π − m). cos is clipped to [−1, 1]; the gradient is finite at cos = ±1 (see
  ``class_axis.arc_target_logit``).

  Args:
    cos: [B, C] cosines to the class centres.
    labels: [B] int labels.
    scale: s.
    margin: additive angular margin m (radians).
    straight_through: if True the margin carries no gradient, so
      d loss/d cos = s·(softmax − onehot) exactly.

  Returns:
    [B] per-sample losses.
  """
  cos, target, _ = _prepare(cos, labels)
  logits = arcface_logits(cos, target, scale=scale, margin=margin,
                          straight_through=straight_through)
  return class_axis.softmax_cross_entropy(logits, target, jnp.ones_like(target))


def normalized_bce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *,
                   scale: float = 64.0, margin: float = 0.4) -> jax.Array:
  """Normalized BCE with a per-class bias b [C] (initial value log(10·C)), per sample [B].

  softplus(−clip(s(c_y − m) − b_y, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b_j, −s, s));
  reference: CVI-SZU/UniTSFace head.py ``Normalized_BCE_Loss`` (before its batch mean).
  """
  cos, target, dtype = _prepare(cos, labels)
  bias = class_axis.as_compute(bias, dtype)
  pos, neg = class_axis.threshold_bce(cos, target, jnp.ones_like(target), bias,
                                      scale=scale, margin=margin)
  return pos + neg


def uce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
        margin: float = 0.4) -> jax.Array:
  """Unified cross-entropy with one scalar bias b (initial value log(10·C)), per sample [B].

  softplus(−clip(s(c_y − m) − b, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b, −s, s));
  reference: CVI-SZU/UniTSFace head.py ``Unified_Cross_Entropy_Loss``.
  """
  cos, target, dtype = _prepare(cos, labels)
  bias = jnp.reshape(class_axis.as_compute(bias, dtype), ())
  pos, neg = class_axis.threshold_bce(cos, target, jnp.ones_like(target), bias,
                                      scale=scale, margin=margin)
  return pos + neg


def initial_bce_bias(num_classes: int) -> float:
  """log(10·C), the initial bias of ``normalized_bce`` and ``uce`` (UniTSFace head.py)."""
  return math.log(10.0 * num_classes)
