"""Normalized BCE: one binary term per class, with a learnt bias per class.

softplus(−clip(s(c_y − m) − b_y, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b_j, −s, s));
reference: CVI-SZU/UniTSFace head.py ``Normalized_BCE_Loss`` (before its batch mean), b
starting at log(10·C). In the head b is class-sharded like W.
"""

import jax

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


def normalized_bce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *,
                   scale: float = 64.0, margin: float = 0.4) -> jax.Array:
  """Normalized BCE of each sample [B] with the per-class bias ``bias`` [C], in fp32."""
  cols, dtype = registry.one_device_columns(cos, labels)
  return per_sample(cols, scale=scale, margin=margin, options={}, norms=None,
                     bias=class_axis.as_compute(bias, dtype), stats={})[0]


def per_sample(cols, *, scale, margin, options, norms, bias, stats):
  """The registry's per-sample form; ``bias`` per class [k] or one scalar (UCE)."""
  del options, norms
  pos, neg = class_axis.threshold_bce(cols.cos, cols.target, cols.mask, bias, scale=scale,
                                      margin=margin, class_sum=cols.class_sum)
  return pos + neg, stats


LOSS = registry.register(registry.SampleToClassLoss(
    name="normalized_bce", per_sample=per_sample, bias="per_class",
    initial_bias=class_axis.initial_bce_bias,
    variant="normbce", variant_values={"s2c_margin": 0.4},
    formula="softplus(−clip(s(c_y − m) − b_y, ±s)) + Σ_{j≠y} softplus(clip(s c_j − b_j, ±s)), "
            "b per class",
    source="CVI-SZU/UniTSFace head.py `Normalized_BCE_Loss`",
    values="m 0.4, b starts at log(10·C)"))
