"""Run by Python at start-up in every process whose PYTHONPATH holds this folder (the ``site``
module's ``sitecustomize`` hook): registers the tests' backbones (tests/tiny_backbone.py).

For the processes that launch/local_multiprocess.sh starts as ``python -m unitsface_jax.main``,
which the tests cannot start through tests/train_run.py (``test_launch.launch_local(...,
tiny=True)``). JAX is imported here but not started: its device count and flags are still
the launcher's to set.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_backbone  # pylint: disable=g-import-not-at-top,wrong-import-position

tiny_backbone.register()
