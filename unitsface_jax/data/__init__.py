"""Input data: MXNet RecordIO without MXNet, dataset sources, the grain pipeline, alignment.

NumPy only: nothing here imports JAX or model code, because grain runs this code in forked or
spawned worker processes (docs/design.md, "Layers").
"""

from unitsface_jax.data.errors import DataError

__all__ = ["DataError"]
