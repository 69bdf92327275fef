"""The UniTSFace objective: weighted sample-to-class plus scheduled sample-to-sample loss."""

import jax
import jax.numpy as jnp


def unitsface_objective(s2c_loss: jax.Array, s2s_loss: jax.Array, s2s_active, *,
                        s2c_weight: float = 1.0, s2s_weight: float = 1.0) -> jax.Array:
  """w_s2c·mean(L_s2c) + [s2s_active]·w_s2s·mean(L_s2s), a scalar.

  Reference: CVI-SZU/UniTSFace train.py (CosFace alone in epoch 0 while the memory bank
  fills, CosFace + USS with weights 1 from epoch 1): the caller decides from the epoch
  whether the sample-to-sample term is on. ``s2s_active`` may be a traced bool, so the
  schedule switches under ``jax.jit`` without recompiling.

  Args:
    s2c_loss: [B] per-sample sample-to-class losses.
    s2s_loss: [B] per-sample sample-to-sample losses.
    s2s_active: whether the sample-to-sample term counts in this step.
    s2c_weight: w_s2c.
    s2s_weight: w_s2s.

  Returns:
    The scalar objective.
  """
  s2c = s2c_weight * jnp.mean(s2c_loss)
  s2s = s2s_weight * jnp.mean(s2s_loss)
  return s2c + jnp.where(jnp.asarray(s2s_active), s2s, jnp.zeros_like(s2s))
