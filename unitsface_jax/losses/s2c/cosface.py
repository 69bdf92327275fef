"""CosFace: CE(s·(cos − m·1_y)), per sample.

Reference: CosFace (arXiv 1801.09414, Eq. 4); CVI-SZU/UniTSFace head.py
``Normalized_Softmax_Loss``; insightface arcface_torch losses.py ``CosFace``.
"""

import jax

from unitsface_jax.losses import registry


def cosface_logits(cos: jax.Array, target: jax.Array, *, scale: float,
                   margin: float) -> jax.Array:
  """s·(cos − m) on the target, s·cos elsewhere."""
  return scale * (cos - margin * target)


def cosface(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
            margin: float = 0.4) -> jax.Array:
  """CosFace loss of each sample [B] from cosines [B, C] and labels [B], in fp32."""
  cols, _ = registry.one_device_columns(cos, labels)
  return cols.cross_entropy(cosface_logits(cols.cos, cols.target, scale=scale, margin=margin))


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del options, norms, bias
  return cols.cross_entropy(cosface_logits(cols.cos, cols.target, scale=scale,
                                           margin=margin)), stats


LOSS = registry.register(registry.SampleToClassLoss(
    name="cosface", per_sample=_per_sample,
    formula="CE(s·(cos − m·1_y))",
    source="CVI-SZU/UniTSFace head.py `Normalized_Softmax_Loss`; arcface_torch losses.py "
           "`CosFace`",
    values="m 0.4 (default)"))
