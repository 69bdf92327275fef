"""Sample-to-sample BCE with a learnt bias per class.

softplus(−clip(s(c_y − m) − b_y, −s, s)) + Σ_{j≠y, valid} softplus(clip(s c_j − b_j, −s, s));
reference: CVI-SZU/UniTSFace head.py ``Sample_to_Sample_Based_BCE_Loss``, which starts b at
0 and adds the data's first value (``threshold.init_threshold_bias``) to every class on first
use.
"""

import jax

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry


def s2s_bce(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
            margin: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
  """Sample-to-sample BCE of each sample [B] with the per-class bias ``bias`` [C]."""
  cols, dtype = registry.one_device_columns(cos, labels, valid)
  return _per_sample(cols, scale=scale, margin=margin, options={},
                     bias=class_axis.as_compute(bias, dtype))


def _per_sample(cols, *, scale, margin, options, bias):
  del options
  pos, neg = class_axis.threshold_bce(cols.cos, cols.target, cols.mask, bias, scale=scale,
                                      margin=margin, class_sum=cols.class_sum)
  return pos + neg


LOSS = registry.register(registry.SampleToSampleLoss(
    name="s2s_bce", per_sample=_per_sample, threshold="per_class",
    formula="softplus(−clip(s(c_y − m) − b_y, ±s)) + Σ_{j≠y} softplus(clip(s c_j − b_j, ±s)), "
            "b per class",
    source="CVI-SZU/UniTSFace head.py `Sample_to_Sample_Based_BCE_Loss`",
    values="m 0.1 (default), b from the data on first use"))
