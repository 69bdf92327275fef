"""Unified cross-entropy (UCE): normalized BCE with one scalar bias for every class.

softplus(−clip(s(c_y − m) − b, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b, −s, s));
reference: CVI-SZU/UniTSFace head.py ``Unified_Cross_Entropy_Loss``, b starting at
log(10·C). In the head b is replicated.
"""

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry
from unitsface_jax.losses.s2c import normalized_bce


def uce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
        margin: float = 0.4) -> jax.Array:
  """UCE of each sample [B] with the scalar bias ``bias``, in fp32."""
  cols, dtype = registry.one_device_columns(cos, labels)
  bias = jnp.reshape(class_axis.as_compute(bias, dtype), ())
  return normalized_bce.per_sample(cols, scale=scale, margin=margin, options={}, norms=None,
                                   bias=bias, stats={})[0]


LOSS = registry.register(registry.SampleToClassLoss(
    name="uce", per_sample=normalized_bce.per_sample, bias="scalar",
    initial_bias=class_axis.initial_bce_bias,
    variant="uce", variant_values={"s2c_margin": 0.4},
    formula="the same with one scalar b",
    source="CVI-SZU/UniTSFace head.py `Unified_Cross_Entropy_Loss`",
    values="m 0.4, b starts at log(10·C)"))
