"""CPU tuning: XLA:CPU flags and strided-convolution gradients that make training on CPU faster.

Nothing here happens on import, and importing any module of the package leaves JAX and XLA as
they were. A program that runs on the CPU opts in with one call, before its first JAX
computation::

  from unitsface_jax import cpu_tuning
  cpu_tuning.enable()

The package's command lines (``unitsface_jax.main``, ``unitsface_jax.evaluate``,
``unitsface_jax.export``) and the model benchmarks in ``benchmarks/`` make that call at the top
of their ``main()``; ``--nocpu_tuning`` leaves it out, and so does ``UNITSFACE_NO_XLA_FLAGS=1``
in the environment, which turns :func:`enable` into a no-op wherever it is called.

Both parts concern the CPU backend only:

1. XLA flags (:data:`XLA_CPU_FLAGS`). In jax 0.10.2 XLA:CPU hands most convolutions to YNNPACK,
   whose backward convolutions are slow on the early 112x112 layers of a face ResNet; routing
   convolutions back to XLA's own (Eigen) kernels is the largest single gain on CPU
   (BENCHMARKS.md, "Train step"). XLA reads ``XLA_FLAGS`` once, when JAX creates its
   backends, so :func:`add_xla_flags` adds them only before then, only when JAX will run on
   the CPU (no GPU/TPU plugin installed, or ``JAX_PLATFORMS`` lists the CPU first), and never
   in place of a flag the user already set.

2. Strided-convolution gradients (:func:`strided_conv`, called by ``models.layers.Conv``).
   XLA computes the input gradient of a strided convolution as a convolution over the output
   gradient dilated with zeros, which XLA:CPU runs at a third of its stride-1 rate, and the
   weight gradient of a 1x1 strided convolution as a convolution too. The two strided
   convolutions of insightface's IResNet keep their parameters and forward result and get
   other gradients:

   - 1x1, stride s, no padding (the downsample): subsample, then a matmul over channels, so
     the input gradient is a matmul and a pad, and the weight gradient one 2-D
     ``[C, N*H*W] x [N*H*W, O]`` matmul;
   - 3x3, stride 2, padding 1 on an even-sized input (conv2 of each stage's first block):
     XLA's forward and weight gradient; the input gradient of the same convolution written
     as four stride-1 convolutions, one per (row, column) parity of the input, each with the
     kernel taps that read that parity (1x1, 1x2, 2x1, 2x2: nine taps in all).

   Every other case, and any convolution with dilation, groups, a bias or a mask, keeps
   ``nnx.Conv``'s own computation. On a GPU or TPU XLA's gradients are kept regardless
   (cuDNN and the TPU compiler handle strided convolutions natively).

Both make XLA:CPU faster but let its reductions split by the number of threads a process has,
so results are no longer bitwise the same across device layouts (1 process x 4 devices vs
2 x 2); without them they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator, MutableMapping

import jax
import jax.numpy as jnp

# Flags added on CPU, each "--name=value". Why each one is here: module docstring, part 1.
XLA_CPU_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)

# Set to 1 (or true/yes) to make enable() do nothing: XLA's own choices throughout.
OFF_ENV = "UNITSFACE_NO_XLA_FLAGS"

# Why enable() could not add the flags when JAX had already started.
_TOO_LATE = "JAX's backends were started before cpu_tuning.enable()"

# Whether models.layers.Conv traces strided convolutions with the gradients of part 2.
_strided_conv_gradients = False


@dataclasses.dataclass(frozen=True)
class Applied:
  """What :func:`enable` did.

  Attributes:
    xla_flags: the flags added to ``XLA_FLAGS`` (empty when none were).
    xla_flags_note: why flags were not added, or ``""``.
    strided_conv_gradients: whether the strided-convolution gradients are now on (they apply
      when a function is traced on the CPU backend).
  """
  xla_flags: tuple[str, ...] = ()
  xla_flags_note: str = ""
  strided_conv_gradients: bool = False


def off_by_environment(environ: MutableMapping[str, str] | None = None) -> bool:
  """Whether ``UNITSFACE_NO_XLA_FLAGS=1`` (or true/yes) asks for no tuning at all."""
  environ = os.environ if environ is None else environ
  return environ.get(OFF_ENV, "").strip().lower() in ("1", "true", "yes")


def enable(environ: MutableMapping[str, str] | None = None) -> Applied:
  """Turns on the CPU tuning: :data:`XLA_CPU_FLAGS` and the strided-convolution gradients.

  Call it once, before the program's first JAX computation (importing JAX or this package
  first is fine). It does not start JAX's backends, so ``jax.distributed.initialize`` may
  follow. Flags are added as :func:`add_xla_flags` says; the gradients apply to functions
  traced afterwards on the CPU backend. Does nothing when :func:`off_by_environment`.

  Args:
    environ: the environment whose ``XLA_FLAGS`` to edit (default ``os.environ``).

  Returns:
    What was done (also logged).
  """
  global _strided_conv_gradients
  environ = os.environ if environ is None else environ
  if off_by_environment(environ):
    logging.info("CPU tuning off (%s=1)", OFF_ENV)
    return Applied(xla_flags_note=f"{OFF_ENV}=1")
  added, note = _add_xla_flags(environ)
  _strided_conv_gradients = True
  log = logging.warning if note == _TOO_LATE else logging.info
  log("CPU tuning: XLA_FLAGS %s; strided-convolution gradients on (CPU backend only)",
      f"+= {' '.join(added)}" if added else f"unchanged: {note}")
  return Applied(tuple(added), note, True)


def add_xla_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Adds :data:`XLA_CPU_FLAGS` to the ``XLA_FLAGS`` variable when JAX will run on the CPU.

  Only before JAX has created its backends, only when no GPU/TPU plugin is installed or
  ``JAX_PLATFORMS`` lists ``cpu`` first, and only the flags the user has not set already.
  Unlike :func:`enable` this ignores ``UNITSFACE_NO_XLA_FLAGS``.

  Returns:
    The flags added.
  """
  return _add_xla_flags(os.environ if environ is None else environ)[0]


def _add_xla_flags(environ: MutableMapping[str, str]) -> tuple[list[str], str]:
  if not _runs_on_cpu(environ):
    return [], "JAX will not run on the CPU"
  if _backends_initialized():
    return [], _TOO_LATE
  current = environ.get("XLA_FLAGS", "")
  def name(flag):
    return flag.split("=", 1)[0].lstrip("-")
  set_names = {name(tok) for tok in current.split()}
  added = [f for f in XLA_CPU_FLAGS if name(f) not in set_names]
  if added:
    environ["XLA_FLAGS"] = " ".join(([current] if current.strip() else []) + added)
  return added, "" if added else "already set"


# PCI vendor id of Google's TPU chips (what JAX's own TPU detection looks for in sysfs).
_TPU_PCI_VENDOR = "0x1ae0"


def skip_absent_tpu(environ: MutableMapping[str, str] | None = None) -> bool:
  """Sets ``JAX_PLATFORMS=cpu`` when libtpu is installed but this host has no TPU chip.

  libtpu (the ``plan`` extra, for compiling TPU programs on any machine) makes JAX try the
  TPU first in every program, and on a host without one libtpu prints five lines of warnings
  and a stack trace and costs ~0.6 s before JAX falls back to the CPU. The command lines call
  this first (before :func:`enable`, which then sees a CPU run). Nothing changes when
  ``JAX_PLATFORMS`` is set, JAX's backends are already up, a TPU chip is on the PCI bus, or a
  GPU plugin is installed. Returns whether it set the variable.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_PLATFORMS", "").strip() or _backends_initialized():
    return False
  if importlib.util.find_spec("libtpu") is None or _tpu_chip_present():
    return False
  if _gpu_plugin_installed():
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  if environ is os.environ:
    # jax.config read JAX_PLATFORMS when jax was imported (this module imports it).
    jax.config.update("jax_platforms", "cpu")
  return True


def _tpu_chip_present() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == _TPU_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _gpu_plugin_installed() -> bool:
  """Whether a CUDA/ROCm PJRT plugin is installed (the jax_plugins namespace package, or an
  entry point of that group), found without initialising JAX."""
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    if any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations)):
      return True
  try:
    return bool(list(importlib.metadata.entry_points(group="jax_plugins")))
  except Exception:  # pylint: disable=broad-except
    return False


def _accelerator_plugin_installed() -> bool:
  """Whether a GPU/TPU PJRT plugin is installed, found without initialising JAX."""
  return importlib.util.find_spec("libtpu") is not None or _gpu_plugin_installed()


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


# Part 2: strided-convolution gradients.


@contextlib.contextmanager
def strided_conv_gradients(on: bool = True) -> Iterator[None]:
  """Within the block, ``models.layers.Conv`` traces with (``on``) or without the gradients.

  The setting is read when a function is traced: a function jitted earlier keeps the
  gradients it was traced with. The previous setting returns after the block.
  """
  global _strided_conv_gradients
  previous, _strided_conv_gradients = _strided_conv_gradients, bool(on)
  try:
    yield
  finally:
    _strided_conv_gradients = previous


def strided_conv_gradients_active() -> bool:
  """Whether strided convolutions traced now get the gradients of part 2: after
  :func:`enable` (or inside :func:`strided_conv_gradients`) and on the CPU backend."""
  return _strided_conv_gradients and jax.default_backend() == "cpu"


def strided_conv_case(conv, x: jax.Array) -> str | None:
  """Which rewritten case the ``nnx.Conv`` ``conv`` on input ``x`` is: "1x1", "3x3s2" or None."""
  strides = tuple(conv.strides) if not isinstance(conv.strides, int) else (conv.strides,) * 2
  if strides == (1, 1):
    return None
  plain = (x.ndim == 4 and conv.feature_group_count == 1 and not conv.use_bias
           and conv.mask is None and conv.preferred_element_type is None
           and conv.conv_general_dilated is jax.lax.conv_general_dilated
           and conv.input_dilation in (None, 1, (1, 1))
           and conv.kernel_dilation in (None, 1, (1, 1))
           and not isinstance(conv.padding, str))
  if not plain:
    return None
  pads = tuple(int(p) for pair in conv.padding for p in pair)
  kernel_size = tuple(conv.kernel_size)
  if kernel_size == (1, 1) and strides[0] == strides[1] and pads == (0,) * 4:
    return "1x1"
  if (kernel_size == (3, 3) and strides == (2, 2) and pads == (1,) * 4
      and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0):
    return "3x3s2"
  return None


def strided_conv(conv, x: jax.Array) -> jax.Array | None:
  """``conv(x)`` with the gradients of part 2, or None when ``conv`` is not a rewritten case.

  ``conv`` is an ``nnx.Conv``; the result equals its own forward result.
  """
  case = strided_conv_case(conv, x)
  if case is None:
    return None
  dtype = conv.dtype or jnp.result_type(x.dtype, conv.kernel[...].dtype)
  x, kernel = x.astype(dtype), conv.kernel[...].astype(dtype)
  if case == "1x1":
    return _conv1x1_strided(x, kernel[0, 0], conv.strides[0], conv.precision)
  return _conv3x3_s2(x, kernel, conv.precision)


def _lax_conv(x, kernel, strides, padding, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _subsample(x, stride):
  return x[:, ::stride, ::stride, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv1x1_strided(x, kernel, stride, precision):
  return jnp.einsum("nhwc,co->nhwo", _subsample(x, stride), kernel, precision=precision)


def _conv1x1_strided_fwd(x, kernel, stride, precision):
  return _conv1x1_strided(x, kernel, stride, precision), (x, kernel)


def _conv1x1_strided_bwd(stride, precision, residuals, dy):
  x, kernel = residuals
  xs, pad_back = jax.vjp(lambda v: _subsample(v, stride), x)
  # One 2-D matmul: XLA's transpose of the einsum contracts three axes and runs 3x slower.
  d_kernel = jnp.matmul(xs.reshape(-1, xs.shape[-1]).T, dy.reshape(-1, dy.shape[-1]),
                        precision=precision)
  dx, = pad_back(jnp.einsum("nhwo,co->nhwc", dy, kernel, precision=precision))
  return dx, d_kernel


_conv1x1_strided.defvjp(_conv1x1_strided_fwd, _conv1x1_strided_bwd)


def _polyphase_conv3x3_s2(x, kernel, precision):
  """The 3x3, stride-2, padding-1 convolution of an even-sized ``x`` as four stride-1 ones."""
  # Output row o reads input rows 2o-1, 2o, 2o+1 with kernel rows 0, 1, 2. So the even input
  # rows (index o in x[0::2]) meet kernel row 1 only, and the odd rows (x[1::2], indices o-1
  # and o) meet kernel rows 0 and 2: a 2-tap convolution with one row of zeros on top.
  # Columns alike.
  taps = {0: slice(1, 2), 1: slice(0, 3, 2)}  # input parity -> the kernel taps that read it
  pads = {0: (0, 0), 1: (1, 0)}
  out = None
  for row in (0, 1):
    for col in (0, 1):
      y = _lax_conv(x[:, row::2, col::2, :], kernel[taps[row], taps[col]], (1, 1),
                    (pads[row], pads[col]), precision)
      out = y if out is None else out + y
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_s2(x, kernel, precision):
  return _lax_conv(x, kernel, (2, 2), ((1, 1), (1, 1)), precision)


def _conv3x3_s2_fwd(x, kernel, precision):
  return _conv3x3_s2(x, kernel, precision), (x, kernel)


def _conv3x3_s2_bwd(precision, residuals, dy):
  x, kernel = residuals
  # XLA's weight gradient is the faster one here; the polyphase form's input gradient is
  # four stride-1 transposed convolutions instead of one over a zero-dilated dy.
  _, kernel_vjp = jax.vjp(lambda k: _lax_conv(x, k, (2, 2), ((1, 1), (1, 1)), precision),
                          kernel)
  _, x_vjp = jax.vjp(lambda v: _polyphase_conv3x3_s2(v, kernel, precision), x)
  return x_vjp(dy)[0], kernel_vjp(dy)[0]


_conv3x3_s2.defvjp(_conv3x3_s2_fwd, _conv3x3_s2_bwd)


def define_flag():
  """Defines the boolean command-line flag ``--cpu_tuning`` (default on) for an entry point
  that calls :func:`enable` when it is set; returns its ``FlagHolder``."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  return flags.DEFINE_bool(
      "cpu_tuning", True, "Tune XLA for the CPU before JAX starts (unitsface_jax.cpu_tuning: "
      "XLA flags, strided-convolution gradients); only has an effect when JAX runs on the "
      f"CPU. {OFF_ENV}=1 in the environment also turns it off.")
