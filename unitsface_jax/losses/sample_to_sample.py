"""Sample-to-sample losses against the memory bank: USS, s2s softmax and s2s BCE, per sample.

``cos`` [B, C] are cosines between the embeddings and the memory bank M (one stored feature
per class), ``labels`` [B] in [0, C). ``valid`` [C] marks the memory rows written at least
once: a class that is not valid contributes no term, and a sample whose own class is not valid
gets no positive term. The official code (CVI-SZU/UniTSFace head.py, train.py) has no such
mask: its ``feat_mem`` buffer is uninitialised memory until epoch 0 (CosFace only) has written
every class, and any class not seen by then keeps garbage rows that still enter the loss.
With ``valid=None`` every class counts, which is the official behaviour once M is full.

All functions compute in fp32 whatever the input dtype (float64 stays float64) and return
per-sample losses [B].
"""

from typing import Literal

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis


def _prepare(cos, labels, valid):
  dtype = class_axis.compute_dtype(cos)
  cos = class_axis.as_compute(cos, dtype)
  num_classes = cos.shape[-1]
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  if valid is None:
    valid = jnp.ones((num_classes,), jnp.bool_)
  mask = jnp.broadcast_to(jnp.asarray(valid, jnp.bool_), cos.shape)
  return cos, target, mask, dtype


def uss_parts(cos: jax.Array, target: jax.Array, mask: jax.Array, bias: jax.Array, *,
              scale: float, margin: float, form: Literal["code", "paper"],
              class_max: class_axis.ClassReduce = class_axis.identity,
              class_sum: class_axis.ClassReduce = class_axis.identity
              ) -> tuple[jax.Array, jax.Array]:
  """The USS positive and negative terms on local classes, reductions finished by callables.

  Shared by ``uss`` (identity reductions) and the class-sharded head (psum/pmax).

  Args:
    cos: [B, C_local] compute-dtype cosines to the memory bank.
    target: [B, C_local] bool one-hot of the labels on the local classes.
    mask: [B, C_local] bool valid classes.
    bias: scalar b.
    scale: s.
    margin: m.
    form: "code" or "paper" (see ``uss``).
    class_max: finishes a [B] max over all class shards.
    class_sum: finishes a [B] sum over all class shards.

  Returns:
    ([B] positive term, [B] negative term).
  """
  pos, neg = class_axis.threshold_bce(cos, target, mask, bias, scale=scale, margin=margin,
                                      class_sum=class_sum)
  if form == "paper":
    neg = class_axis.threshold_softmax_negative(cos, target, mask, bias, scale=scale,
                                                class_max=class_max, class_sum=class_sum)
  elif form != "code":
    raise ValueError(f"USS form must be 'code' or 'paper', got {form!r}")
  return pos, neg


def uss(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
        margin: float = 0.1, valid: jax.Array | None = None,
        form: Literal["code", "paper"] = "code") -> jax.Array:
  """Unified threshold integrated sample-to-sample (USS) loss, per sample [B].

  form="code" (CVI-SZU/UniTSFace head.py
  ``Unified_Threshold_Integrated_Sample_to_Sample_Loss``):
    softplus(−clip(s(c_y − m) − b, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b, −s, s)).
  form="paper" (arXiv 2311.02523, Sec. 3, USS with margin): the same positive term, and the
    negative term log(1 + Σ_{j≠y} exp(s c_j − b)), unclipped.
  One scalar b; the unified threshold is t = b/s. Invalid classes (``valid`` False) are left
  out of both terms; see the module docstring for how this differs from the official code.

  Args:
    cos: [B, C] cosines to the memory bank.
    labels: [B] int labels.
    bias: scalar b.
    scale: s.
    margin: m.
    valid: [C] bool, memory rows written at least once; None means all.
    form: "code" or "paper".

  Returns:
    [B] per-sample losses.
  """
  cos, target, mask, dtype = _prepare(cos, labels, valid)
  bias = jnp.reshape(class_axis.as_compute(bias, dtype), ())
  pos, neg = uss_parts(cos, target, mask, bias, scale=scale, margin=margin, form=form)
  return pos + neg


def s2s_softmax(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                margin: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
  """Sample-to-sample softmax CE(s·(c − m·onehot(y)), y) over valid classes, per sample [B].

  Reference: CVI-SZU/UniTSFace head.py ``Sample_to_Sample_Based_Softmax_Loss``. A sample
  whose own class is not valid has no target and its loss is 0.
  """
  cos, target, mask, _ = _prepare(cos, labels, valid)
  logits = scale * (cos - margin * target)
  return class_axis.softmax_cross_entropy(logits, target, mask)


def s2s_bce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
            margin: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
  """Sample-to-sample BCE with a per-class bias b [C], per sample [B].

  softplus(−clip(s(c_y − m) − b_y, −s, s)) + Σ_{j≠y, valid} softplus(clip(s c_j − b_j, −s, s));
  reference: CVI-SZU/UniTSFace head.py ``Sample_to_Sample_Based_BCE_Loss`` (which starts b
  at 0 and adds ``init_threshold_bias``'s value to every class on first use).
  """
  cos, target, mask, dtype = _prepare(cos, labels, valid)
  bias = class_axis.as_compute(bias, dtype)
  pos, neg = class_axis.threshold_bce(cos, target, mask, bias, scale=scale, margin=margin)
  return pos + neg


def negative_logsumexp(cos: jax.Array, target: jax.Array, mask: jax.Array, *, scale: float,
                       class_max: class_axis.ClassReduce = class_axis.identity,
                       class_sum: class_axis.ClassReduce = class_axis.identity) -> jax.Array:
  """logsumexp_{j≠y, valid}(s·c_j) per sample [B]; -inf where there is no such class."""
  return class_axis.masked_logsumexp(scale * cos, ~target & mask,
                                     class_max=class_max, class_sum=class_sum)


def mean_finite(values: jax.Array) -> jax.Array:
  """Mean of the finite entries of ``values`` [B]; 0 when there are none."""
  finite = jnp.isfinite(values)
  count = jnp.sum(finite)
  total = jnp.sum(jnp.where(finite, values, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def init_threshold_bias(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                        valid: jax.Array | None = None) -> jax.Array:
  """The official data-dependent first value of b: mean_i logsumexp_{j≠y_i, valid}(s·c_ij).

  Reference: CVI-SZU/UniTSFace head.py (``cos_txs.mean()`` on first use). Samples with no
  valid negative class are left out of the mean; with none at all the value is 0. Returns a
  stop-gradient scalar.
  """
  cos, target, mask, _ = _prepare(cos, labels, valid)
  lse = negative_logsumexp(cos, target, mask, scale=scale)
  return jax.lax.stop_gradient(mean_finite(lse))


def threshold_bias_for_step(bias: jax.Array, init_value: jax.Array, *,
                            first_use: jax.Array) -> jax.Array:
  """b to use in this step: ``init_value`` on b's first use, ``bias`` on every other step.

  A ``jnp.where`` on ``first_use`` (a traced bool), so it runs under ``jax.jit`` with no
  Python side effect. The gradient always flows to ``bias`` (identity), as in the official
  code, where the overwritten ``bias.data`` receives this step's gradient; the caller stores
  the returned value as the new b and then applies the optimizer update to it.
  """
  offset = jnp.where(first_use, init_value - bias, 0.0)
  return bias + jax.lax.stop_gradient(offset)
