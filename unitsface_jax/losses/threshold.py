"""The learnt threshold b of the sample-to-sample losses: its data-dependent first value.

The official code (CVI-SZU/UniTSFace head.py) sets b on its first use to the batch's
mean_i logsumexp_{j≠y_i}(s·c_ij) over the memory bank (``cos_txs.mean()``), then trains it.
"""

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


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

  Samples with no valid negative class are left out of the mean; with none at all the value
  is 0. Returns a stop-gradient scalar.
  """
  cols, _ = registry.one_device_columns(cos, labels, valid)
  lse = negative_logsumexp(cols.cos, cols.target, cols.mask, scale=scale)
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
