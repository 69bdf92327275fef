"""unitsface_jax: face recognition with the UniTSFace losses in JAX/Flax NNX.

The parts and what each may import: docs/design.md, "Layers" (checked by
tests/test_layers.py). Pure parts at the bottom (``losses``, ``parallel``, ``optim``,
``cpu_tuning``), then ``models``, ``data``, the class-sharded ``head``, ``checkpoint``,
``evaluation``, ``export``, and ``train`` on top; ``main``, ``evaluate`` and ``export``'s
``__main__`` are the command lines.

Importing the package or any of its modules leaves JAX and XLA as they were. On the CPU,
``unitsface_jax.cpu_tuning.enable()`` (called by the command lines) opts in to XLA flags and
convolution gradients that train faster there.
"""

__version__ = "0.1.0"
