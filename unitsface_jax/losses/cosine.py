"""Cosine similarity between embeddings and class centres or memory rows, in fp32."""

import jax
import jax.numpy as jnp


def cosine_similarity(features: jax.Array, centers: jax.Array, *, eps: float = 1e-5,
                      precision: str | jax.lax.Precision | None = "highest") -> jax.Array:
  """cos(f_i, w_j) [B, C] in fp32, each vector divided by max(‖·‖, eps).

  Reference: CVI-SZU/UniTSFace head.py (``F.normalize(..., eps=1e-5)`` on both sides).

  Args:
    features: [B, D] embeddings (any float dtype).
    centers: [C, D] class centres or memory rows (any float dtype).
    eps: lower bound of the norms.
    precision: matmul precision. "highest" is true fp32 on TPU, whose default rounds fp32
      operands to bf16 (8 significant bits) for one pass, an error that s = 64 magnifies in
      the logits; None takes the backend default, which is cheaper.

  Returns:
    [B, C] cosines.
  """
  dtype = jnp.promote_types(jnp.result_type(features), jnp.float32)
  f = _normalize(features.astype(dtype), eps)
  w = _normalize(centers.astype(dtype), eps)
  return jnp.matmul(f, w.T, precision=precision)


def _normalize(x, eps):
  # max(‖x‖, eps) as sqrt(max(‖x‖², eps²)): the norm's gradient x/‖x‖ is 0/0 at x = 0
  # (padded class rows, empty memory rows), and 0·NaN would poison the backward pass.
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))




def feature_norm(features: jax.Array) -> jax.Array:
  """‖f_i‖ [B] of the raw embeddings, with gradient f/‖f‖ (0 at f = 0, not NaN)."""
  sq = jnp.sum(features * features, axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
