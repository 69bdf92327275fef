"""Class-axis building blocks shared by every loss in the family and by the sharded head.

Each loss of the family is a sum, a max or a log-sum-exp over the class axis of per-class
terms. The functions here compute those terms on the classes they are given and finish the
reduction with two callables, ``class_sum`` and ``class_max``. The single-device losses pass
the identity (their local classes are all the classes); the class-sharded head passes
``lax.psum``/``lax.pmax`` over its class mesh axis, so both run the same arithmetic. Nothing
here knows about devices or meshes.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

ClassReduce = Callable[[jax.Array], jax.Array]


def identity(x: jax.Array) -> jax.Array:
  """The class reduction when the local classes are all the classes."""
  return x


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """fp32 for bf16/fp16/fp32 inputs; float64 stays float64 (x64 tests)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def as_compute(x, dtype) -> jax.Array:
  """``x`` as a ``dtype`` array (losses never compute in half precision)."""
  return jnp.asarray(x).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def clip_through(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """clip(x, lo, hi) whose gradient is 1 on the closed interval and 0 outside.

  ``jnp.clip`` gives a gradient of 1/2 exactly at a bound (a tie in min/max); the reference
  implementations (PyTorch ``clamp``) pass the gradient through at the bound, so we do too.
  The backward pass keeps only the bool mask of the interval (a custom VJP), not ``x``: on a
  [B, C/n] block of cosines that is a quarter of a float32 block.
  """
  return jnp.clip(x, lo, hi)


def _clip_through_fwd(x, lo, hi):
  return jnp.clip(x, lo, hi), (x >= lo) & (x <= hi)


def _clip_through_bwd(lo, hi, inside, g):
  del lo, hi
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


clip_through.defvjp(_clip_through_fwd, _clip_through_bwd)


def masked_logsumexp(logits: jax.Array, mask: jax.Array, *,
                     class_max: ClassReduce = identity,
                     class_sum: ClassReduce = identity) -> jax.Array:
  """log Σ_{j: mask} exp(logits_j) over the class axis; -inf for rows with an empty mask.

  The row maximum is a stop-gradient shift: it cancels in the value, and ``lax.pmax`` has no
  transpose rule, so no gradient may flow through it.

  Args:
    logits: [B, C_local] compute-dtype logits.
    mask: [B, C_local] bool, the classes that take part.
    class_max: finishes a [B] max over all class shards.
    class_sum: finishes a [B] sum over all class shards.

  Returns:
    [B] log-sum-exp.
  """
  masked = jnp.where(mask, logits, -jnp.inf)
  # Stopped before the reduction, so no tangent ever reaches ``class_max``.
  shift = class_max(jax.lax.stop_gradient(jnp.max(masked, axis=-1)))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = class_sum(jnp.sum(jnp.where(mask, jnp.exp(masked - shift[:, None]), 0.0), axis=-1))
  # Double where: log(0) is -inf and its gradient would be inf * 0 = NaN for empty rows.
  nonempty = total > 0
  safe = jnp.where(nonempty, total, 1.0)
  return jnp.where(nonempty, jnp.log(safe) + shift, -jnp.inf)


def softmax_cross_entropy(logits: jax.Array, target: jax.Array, mask: jax.Array, *,
                          class_max: ClassReduce = identity,
                          class_sum: ClassReduce = identity) -> jax.Array:
  """-log softmax(logits)[y] over the classes in ``mask``; 0 for rows whose target is masked.

  Args:
    logits: [B, C_local] compute-dtype logits (margin already applied).
    target: [B, C_local] bool one-hot of the labels on the local classes (all False on shards
      that do not own the label).
    mask: [B, C_local] bool, the classes in the softmax.
    class_max: finishes a [B] max over all class shards.
    class_sum: finishes a [B] sum over all class shards.

  Returns:
    [B] per-sample losses.
  """
  target = target & mask
  has_target = class_sum(jnp.sum(target, axis=-1, dtype=logits.dtype)) > 0
  lse = masked_logsumexp(logits, mask, class_max=class_max, class_sum=class_sum)
  target_logit = class_sum(jnp.sum(jnp.where(target, logits, 0.0), axis=-1))
  lse = jnp.where(has_target, lse, 0.0)
  return jnp.where(has_target, lse - target_logit, 0.0)


def threshold_bce(cos: jax.Array, target: jax.Array, mask: jax.Array, bias: jax.Array, *,
                  scale: float, margin: float,
                  class_sum: ClassReduce = identity) -> tuple[jax.Array, jax.Array]:
  """The clipped binary terms of normalized BCE, UCE, USS (code form) and s2s BCE.

  positive (j = y): softplus(-clip(s(c_j - m) - b_j, -s, s));
  negative (j != y): softplus(clip(s c_j - b_j, -s, s));
  reference: CVI-SZU/UniTSFace head.py (``p_loss``/``n_loss`` of every BCE-style head).

  Args:
    cos: [B, C_local] cosines.
    target: [B, C_local] bool one-hot of the labels on the local classes.
    mask: [B, C_local] or [C_local] bool, classes that contribute a term.
    bias: scalar or [C_local] bias, broadcast over the class axis.
    scale: s.
    margin: m, applied to the positive only.
    class_sum: finishes a [B] sum over all class shards.

  Returns:
    ([B] positive term, [B] sum of negative terms).
  """
  # The positive term needs one cosine per sample: take c_y (and b_y) from the shard that
  # owns it and evaluate softplus on [B], not on the whole [B, C_local] block.
  positive = target & mask
  has_positive = class_sum(jnp.sum(positive, axis=-1, dtype=cos.dtype)) > 0
  cos_y = class_sum(jnp.sum(jnp.where(positive, cos, 0.0), axis=-1))
  bias = jnp.asarray(bias)
  bias_y = bias if bias.ndim == 0 else class_sum(
      jnp.sum(jnp.where(positive, bias, 0.0), axis=-1))
  pos = jax.nn.softplus(-clip_through(scale * (cos_y - margin) - bias_y, -scale, scale))
  pos = jnp.where(has_positive, pos, 0.0)
  neg = jax.nn.softplus(clip_through(scale * cos - bias, -scale, scale))
  neg = class_sum(jnp.sum(jnp.where(~target & mask, neg, 0.0), axis=-1))
  return pos, neg


def initial_bce_bias(num_classes: int) -> float:
  """log(10·C), the initial bias of the BCE-style sample-to-class losses (normalized BCE,
  UCE; CVI-SZU/UniTSFace head.py ``nn.init.constant_``)."""
  return math.log(10.0 * num_classes)


def threshold_softmax_negative(cos: jax.Array, target: jax.Array, mask: jax.Array,
                               bias: jax.Array, *, scale: float,
                               class_max: ClassReduce = identity,
                               class_sum: ClassReduce = identity) -> jax.Array:
  """The paper's negative term log(1 + Σ_{j != y} exp(s c_j - b)), per sample [B].

  Reference: UniTSFace paper (arXiv 2311.02523, Sec. 3, the USS loss). Unclipped, as written
  in the paper; empty negative sets give 0.
  """
  lse = masked_logsumexp(scale * cos - bias, ~target & mask,
                         class_max=class_max, class_sum=class_sum)
  return jax.nn.softplus(lse)


def target_cosine(cos: jax.Array, target: jax.Array) -> jax.Array:
  """Each row's cosine to its own class among the local columns [B] (0 where this shard does
  not hold the row's class, whose logits then keep ``cos``).

  A margin on the target (ArcFace's cos(θ + m), the combined margin, AdaFace's, MagFace's)
  computed from this costs [B] values, not another [B, C_local] block and the blocks its
  backward pass keeps: ``jnp.where(target, margin(target_cosine(c, target))[:, None], c)``.
  """
  return jnp.sum(jnp.where(target, cos, 0.0), axis=-1)


def arc_target_logit(cos: jax.Array, margin: float) -> jax.Array:
  """cos(θ + m) for θ = arccos(cos), computed as cos·cos m − sin θ·sin m.

  Reference: ArcFace (arXiv 1801.07698, Eq. 3); insightface arcface_torch losses.py
  ``ArcFace``. cos is clipped to [−1, 1] first. d sinθ/d cos = −cos/sinθ is infinite at
  cos = ±1; there sinθ = 0 is taken as a constant (gradient 0), so the gradient stays finite
  and equals cos m·(d loss/d logit) at the two poles. Elsewhere it is exact.
  """
  c = clip_through(cos, -1.0, 1.0)
  sin_sq = 1.0 - c * c
  positive = sin_sq > 0
  sin_theta = jnp.where(positive, jnp.sqrt(jnp.where(positive, sin_sq, 1.0)), 0.0)
  return c * jnp.cos(margin) - sin_theta * jnp.sin(margin)
