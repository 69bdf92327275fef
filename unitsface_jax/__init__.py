"""unitsface_jax: face recognition with the UniTSFace losses in JAX/Flax NNX.

Layers, bottom to top (lower layers never import higher ones; see DESIGN.md):
``models`` (backbones), ``losses`` (pure loss functions), ``head``/``parallel`` (the
class-sharded head), ``data`` (RecordIO, sources, grain pipeline), ``checkpoint``, ``train``,
``evaluation`` and ``export``.
"""

from unitsface_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before any JAX backend exists: XLA reads XLA_FLAGS once (see unitsface_jax/xla_flags.py).
_xla_flags.apply_cpu_defaults()
