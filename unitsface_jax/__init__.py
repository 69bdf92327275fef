"""unitsface_jax: face recognition with the UniTSFace losses in JAX/Flax NNX.

Layers, bottom to top (lower layers never import higher ones; see DESIGN.md):
``models`` (backbones), ``losses`` (pure loss functions), ``head``/``parallel`` (the
class-sharded head), ``data`` (RecordIO, sources, grain pipeline), ``checkpoint``, ``train``,
``evaluation`` and ``export``.
"""

__version__ = "0.1.0"
