"""XLA:CPU flags the package sets for itself when JAX will run on the CPU.

In jax 0.10.2 XLA:CPU hands most convolutions to YNNPACK, whose backward convolutions are slow
on the early 112x112 layers of a face ResNet; routing convolutions back to XLA's own (Eigen)
kernels is the largest single gain on CPU (BENCHMARKS.md, "Train step"). The flag only
concerns the CPU backend, so it is added only when no GPU/TPU plugin is installed (or
``JAX_PLATFORMS`` asks for the CPU first), never replaces a flag the user already set in
``XLA_FLAGS``, and is skipped altogether when ``UNITSFACE_NO_XLA_FLAGS=1`` (which also keeps
XLA's own gradients for strided convolutions: ``models.layers.Conv``).

XLA reads ``XLA_FLAGS`` once, when JAX initialises its backends, so this runs on
``import unitsface_jax``; import the package before the first JAX computation (importing
``jax`` itself is fine). If the backends are already up the flags are left alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import MutableMapping

# Flags added on CPU, each "--name=value". Why each one is here: module docstring.
CPU_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)

# Set to 1 (or true/yes) to keep XLA_FLAGS exactly as the user left it.
OPT_OUT_ENV = "UNITSFACE_NO_XLA_FLAGS"


def opted_out(environ: MutableMapping[str, str] | None = None) -> bool:
  """Whether the user asked for XLA's own CPU choices (``UNITSFACE_NO_XLA_FLAGS=1``).

  Then the package neither adds :data:`CPU_FLAGS` nor rewrites the gradients of strided
  convolutions (``models.layers.Conv``): both make XLA:CPU faster but let its reductions
  split by the number of threads a process has, so results are no longer bitwise the same
  across device layouts.
  """
  environ = os.environ if environ is None else environ
  return environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes")


def _accelerator_plugin_installed() -> bool:
  """Whether a GPU/TPU PJRT plugin is installed, found without initialising JAX."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  # CUDA/ROCm plugins live in the jax_plugins namespace package or register an entry point.
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    if any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations)):
      return True
  try:
    return bool(list(importlib.metadata.entry_points(group="jax_plugins")))
  except Exception:  # pylint: disable=broad-except
    return False


def _runs_on_cpu(environ: MutableMapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    # JAX uses the first platform listed that initialises; "cpu" first means the CPU.
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_plugin_installed()


def _backends_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return xla_bridge.backends_are_initialized()
  except Exception:  # pylint: disable=broad-except
    return False


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS`` when JAX will run on the CPU.

  Args:
    environ: the environment to edit (default ``os.environ``).

  Returns:
    The flags added (empty when opted out, not on CPU, already initialised, or all set).
  """
  environ = os.environ if environ is None else environ
  if opted_out(environ):
    return []
  if not _runs_on_cpu(environ) or _backends_initialized():
    return []
  current = environ.get("XLA_FLAGS", "")
  def name(flag):
    return flag.split("=", 1)[0].lstrip("-")
  set_names = {name(tok) for tok in current.split()}
  added = [f for f in CPU_FLAGS if name(f) not in set_names]
  if added:
    environ["XLA_FLAGS"] = " ".join(([current] if current.strip() else []) + added)
  return added
