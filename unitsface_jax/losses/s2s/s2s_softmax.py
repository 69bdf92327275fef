"""Sample-to-sample softmax: CE(s·(c − m·1_y)) over the memory rows written so far.

Reference: CVI-SZU/UniTSFace head.py ``Sample_to_Sample_Based_Softmax_Loss``. A sample whose
own class has no memory row yet has no target and its loss is 0.
"""

import jax

from unitsface_jax.losses import registry
from unitsface_jax.losses.s2c.cosface import cosface_logits


def s2s_softmax(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                margin: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
  """Sample-to-sample softmax of each sample [B] over the ``valid`` [C] memory rows."""
  cols, _ = registry.one_device_columns(cos, labels, valid)
  return _per_sample(cols, scale=scale, margin=margin, options={}, bias=None)


def _per_sample(cols, *, scale, margin, options, bias):
  del options, bias
  return cols.cross_entropy(cosface_logits(cols.cos, cols.target, scale=scale, margin=margin))


LOSS = registry.register(registry.SampleToSampleLoss(
    name="s2s_softmax", per_sample=_per_sample,
    formula="CE(s·(c − m·1_y)) over the memory rows",
    source="CVI-SZU/UniTSFace head.py `Sample_to_Sample_Based_Softmax_Loss`",
    values="m 0.1 (default)"))
