"""Runs the TPU plan's command line with the tests' backbones registered.

``python tests/plan_run.py [unitsface_jax.plan flags...]``: ``python -m unitsface_jax.plan``
with ``tests/tiny_backbone.py``'s backbones registered (``--config.model.name=iresnet_test``)
as soon as the package's model registry is imported. Not before: registering imports JAX,
and the command line sets JAX's platform (``JAX_PLATFORMS``, read when JAX is imported)
before it imports JAX; registering later keeps that order as a user's command line has it.
"""

import gc
import importlib.abc
import importlib.util
import os
import sys

import gc_settings  # beside this file

REGISTRY = "unitsface_jax.models"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
  """Finds the model registry as Python would, and registers the tests' backbones once the
  registry module has run."""

  def find_spec(self, name, path, target=None):
    del path, target
    if name != REGISTRY:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run_module = spec.loader.exec_module

    def exec_module(module):
      run_module(module)
      import tiny_backbone  # pylint: disable=g-import-not-at-top  # beside this file
      tiny_backbone.register()

    spec.loader.exec_module = exec_module
    return spec


if __name__ == "__main__":
  gc.set_threshold(*gc_settings.THRESHOLDS)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.meta_path.insert(0, _RegisterOnImport())
  from unitsface_jax import plan  # pylint: disable=g-import-not-at-top
  assert "jax" not in sys.modules  # the command line's own start: JAX comes later
  sys.exit(plan.main(sys.argv))
