"""unitsface_jax: face recognition with the UniTSFace losses in JAX/Flax NNX.

Layers, bottom to top (lower layers never import higher ones; see DESIGN.md):
``cpu_tuning`` (opt-in XLA:CPU settings), ``models`` (backbones), ``losses`` (pure loss
functions), ``head``/``parallel`` (the class-sharded head), ``data`` (RecordIO, sources, grain
pipeline), ``checkpoint``, ``train``, ``evaluation`` and ``export``.

Importing the package or any of its modules leaves JAX and XLA as they were. On the CPU,
``unitsface_jax.cpu_tuning.enable()`` (called by the command lines) opts in to XLA flags and
convolution gradients that train faster there.
"""

__version__ = "0.1.0"
