"""No sample-to-sample term (``loss.s2s = "none"``): the sample-to-class loss alone."""

import jax.numpy as jnp

from unitsface_jax.losses import registry


def _per_sample(cols, *, scale, margin, options, bias):
  del scale, margin, options, bias
  return jnp.zeros(cols.cos.shape[:1], cols.cos.dtype)


LOSS = registry.register(registry.SampleToSampleLoss(
    name="none", per_sample=_per_sample, formula="0: the sample-to-class loss alone",
    source="—", values="—"))
