"""Eight simulated CPU devices for the tests in this folder.

The device count must be set before JAX starts: set here when this folder is the first to
be collected (``python -m pytest tests/multidevice/<file>``, as the ``multidevice_pytest``
fixture of ``tests/conftest.py`` runs each file); a session that started JAX earlier skips
these tests (each file's ``pytestmark``).
The top-level run leaves this folder out (``collect_ignore`` in ``tests/conftest.py``).
"""

import os
import sys

DEVICES = 8

if "jax" not in sys.modules:
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"
