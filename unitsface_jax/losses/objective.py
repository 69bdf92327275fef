"""The UniTSFace objective: weighted sample-to-class plus scheduled sample-to-sample loss."""

import jax
import jax.numpy as jnp


def unitsface_objective(s2c_loss: jax.Array, s2s_loss: jax.Array, epoch, *,
                        s2c_weight: float = 1.0, s2s_weight: float = 1.0,
                        s2s_start_epoch: int = 1) -> jax.Array:
  """w_s2c·mean(L_s2c) + [epoch ≥ start]·w_s2s·mean(L_s2s), a scalar.

  Reference: CVI-SZU/UniTSFace train.py (CosFace alone in epoch 0 while the memory bank
  fills, CosFace + USS with weights 1 from epoch 1). ``epoch`` may be a traced integer, so
  the schedule switches under ``jax.jit`` without recompiling.

  Args:
    s2c_loss: [B] per-sample sample-to-class losses.
    s2s_loss: [B] per-sample sample-to-sample losses.
    epoch: current epoch (int or int array).
    s2c_weight: w_s2c.
    s2s_weight: w_s2s.
    s2s_start_epoch: first epoch with the sample-to-sample term (official: 1).

  Returns:
    The scalar objective.
  """
  s2c = s2c_weight * jnp.mean(s2c_loss)
  s2s = s2s_weight * jnp.mean(s2s_loss)
  return s2c + jnp.where(jnp.asarray(epoch) >= s2s_start_epoch, s2s, jnp.zeros_like(s2s))
