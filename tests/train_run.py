"""Runs the training entry point in a child process with N simulated CPU devices.

``python tests/train_run.py DEVICES [main.py flags...]``: sets
``XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES`` before JAX starts (which the test
process cannot do for itself once JAX is up), registers the tests' own backbones
(``tests/tiny_backbone.py``: ``--config.model.name=tiny_test``, ``vit_test``, ``mbf_test``,
``iresnet_test``), then runs ``unitsface_jax.main``.
"""

import gc
import os
import sys

import gc_settings  # beside this file

if __name__ == "__main__":
  gc.set_threshold(*gc_settings.THRESHOLDS)
  devices = sys.argv[1]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from unitsface_jax import main  # pylint: disable=g-import-not-at-top
  import tiny_backbone  # pylint: disable=g-import-not-at-top  # beside this file
  tiny_backbone.register()
  main.run([sys.argv[0]] + sys.argv[2:])
