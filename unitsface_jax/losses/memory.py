"""The sample-to-sample memory bank write: one stored feature per class, last occurrence wins."""

import jax
import jax.numpy as jnp


def last_occurrence(labels: jax.Array) -> jax.Array:
  """[B] bool: True where no later sample in the batch has the same label.

  A [B, B] comparison: it does not depend on C, so the class-sharded head can run it on the
  global batch on every device and get the same answer everywhere.
  """
  labels = jnp.asarray(labels)
  index = jnp.arange(labels.shape[0])
  same = labels[:, None] == labels[None, :]
  later = index[None, :] > index[:, None]
  return ~jnp.any(same & later, axis=1)


def write_memory(memory: jax.Array, seen: jax.Array, features: jax.Array,
                 labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Store each label's feature in its memory row and mark the row seen.

  Where a label repeats in the batch the LAST occurrence wins, deterministically: only the
  last occurrence is scattered, so the scatter has unique indices (an XLA scatter with
  duplicate indices leaves the winner unspecified). Labels outside [0, C) are dropped, which
  lets the sharded head pass labels shifted to its own row block. Features are stored
  stop-gradient, in the memory's dtype. Reference: CVI-SZU/UniTSFace train.py (the memory
  update after each step), which relies on PyTorch's in-order index assignment.

  Args:
    memory: [C, D] memory bank.
    seen: [C] bool, rows written at least once.
    features: [B, D] embeddings of this batch.
    labels: [B] int labels (row indices into ``memory``).

  Returns:
    (new memory [C, D], new seen [C]).
  """
  memory, seen, labels = jnp.asarray(memory), jnp.asarray(seen), jnp.asarray(labels)
  num_rows = memory.shape[0]
  keep = last_occurrence(labels) & (labels >= 0) & (labels < num_rows)
  rows = jnp.where(keep, labels, num_rows)  # num_rows is out of bounds: dropped
  features = jax.lax.stop_gradient(features).astype(memory.dtype)
  memory = memory.at[rows].set(features, mode="drop")
  seen = seen.at[rows].set(True, mode="drop")
  return memory, seen
