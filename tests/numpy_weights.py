"""A backbone whose weights NumPy drew: for the tests that need a model with weights, not its
initialiser's weights.

``models.create`` runs the initialisers op by op, and JAX compiles each operation for each
shape it meets: 5.4 s for an IResNet-18 at width 16 on the CPU, against 0.2 s for
``filled`` (``models.create_abstract``, then NumPy's draws). The tests of the initialisers
themselves use ``models.create``.
"""

import jax
import numpy as np
from flax import nnx

from unitsface_jax import models
from unitsface_jax.models import Frozen


def filled(name: str, seed: int = 0, **kwargs) -> nnx.Module:
  """``models.create_abstract(name, **kwargs)`` with every weight and BatchNorm statistic
  drawn from ``seed``: kernels N(0, 1 / fan-in) (fan-in: every axis but the last), BatchNorm
  scales in [0.5, 1.5] (a frozen scale stays 1), running variances in [0.5, 2], PReLU slopes
  0.25, other vectors (biases, means) N(0, 0.1). Its RNG streams are ``create_abstract``'s."""
  model = models.create_abstract(name, **kwargs)
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var.get_raw_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
      continue
    leaf, shape = str(path[-1]), value.shape
    if isinstance(var, Frozen):
      x = np.ones(shape)
    elif leaf == "scale":
      x = rng.uniform(0.5, 1.5, shape)
    elif leaf == "var":
      x = rng.uniform(0.5, 2.0, shape)
    elif leaf == "slope":
      x = np.full(shape, 0.25)
    elif len(shape) >= 2:
      x = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    else:
      x = rng.normal(0.0, 0.1, shape)
    var.set_value(x.astype(value.dtype))
  assert not models.unfilled(model)
  return model
