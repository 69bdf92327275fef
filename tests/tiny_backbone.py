"""A backbone of the tests' own, registered with ``models.register``: one strided 3x3
convolution, BatchNorm, PReLU, a 4x4 average pool, dropout, a linear layer and the frozen-scale
BatchNorm of the embedding, on 112x112 faces.

For the tests whose subject is not the backbone (a loss, the head's settings, the loop's
bookkeeping): it has the parts a trunk gives the train step (convolution, batch statistics,
dropout, float32 embeddings from ``dtype`` activations) and compiles in a fraction of a second,
where the smoke recipe's IResNet-18 takes seconds for every new program. ``tests/conftest.py``
registers it for the test session (after collection), ``tests/train_run.py`` in its child
processes.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax import models
from unitsface_jax.models.layers import BatchNorm, PReLU, conv

NAME = "tiny_test"
# Overrides of configs/demo.py:smoke that train it (a flag per entry for a child process).
CONFIG = {"model.name": NAME, "model.width": 4, "model.num_features": 32}
FLAGS = tuple(f"--config.{key}={value}" for key, value in CONFIG.items())


class TinyBackbone(nnx.Module):
  """[N, 112, 112, 3] -> conv 3x3 stride 4 (``width`` channels) -> BN -> PReLU -> [N, 28, 28, w]
  -> 4x4 average pool -> [N, 7 * 7 * w] -> dropout -> linear -> BN (scale frozen at 1)."""

  def __init__(self, *, num_features=512, dropout=0.0, width=64, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv1 = conv(3, width, 3, 4, 1, kernel_init=nnx.initializers.normal(0.1), dtype=dtype,
                      rngs=rngs)
    self.bn1 = BatchNorm(width)
    self.prelu = PReLU(width)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.fc = nnx.Linear(width * 7 * 7, num_features, rngs=rngs)
    self.features = BatchNorm(num_features, frozen_scale=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.prelu(self.bn1(self.conv1(x)))
    n, _, _, c = x.shape
    x = x.reshape(n, 7, 4, 7, 4, c).mean((2, 4)).astype(jnp.float32).reshape(n, -1)
    return self.features(self.fc(self.dropout(x)))


def register() -> None:
  """Registers the backbone as ``NAME`` (once a process)."""
  if NAME not in models.list_models():
    models.register(NAME, TinyBackbone)
