"""Building blocks shared by the backbones: BatchNorm with PyTorch semantics, PReLU, convs.

The layers are written so that weights cross to and from PyTorch without loss: BatchNorm keeps
PyTorch's running-average rule (momentum 0.1 on the new value, unbiased variance in the running
estimate), and a BatchNorm whose scale PyTorch freezes (``requires_grad = False``) stores that
scale as a :class:`Frozen` variable, which is saved with the model but is not an
``nnx.Param`` and so never reaches the optimiser.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax import xla_flags

Dtype = Any


class Frozen(nnx.Variable):
  """A weight that is part of the model's state but not trained (PyTorch requires_grad=False)."""


class BatchNorm(nnx.Module):
  """Batch normalisation over every axis but the last (NHWC or [N, C]), PyTorch semantics.

  Training mode normalises with the batch statistics and updates the running estimates as
  ``torch.nn.BatchNorm{1,2}d`` does (``running = (1 - momentum) * running + momentum * batch``,
  with the unbiased batch variance in the running variance). Statistics and the affine
  transform are computed in float32; the output has the input's dtype. Under ``jax.jit`` with a
  batch-sharded input the means are global-batch means (XLA inserts the all-reduce).

  Attributes:
    use_running_average: inference mode (set by ``model.eval()`` / ``model.train()``).
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
               frozen_scale: bool = False, scale_init: float = 1.0):
    self.num_features = num_features
    self.eps = eps
    self.momentum = momentum
    scale_cls = Frozen if frozen_scale else nnx.Param
    self.scale = scale_cls(jnp.full((num_features,), scale_init, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.use_running_average = False
    # > 1: the batch is split into this many equal groups normalised separately (per-device
    # statistics when the groups are the devices' slices, as PyTorch DDP without SyncBN).
    self.num_groups = 1

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.num_features:
      raise ValueError(f"BatchNorm expects {self.num_features} channels, got shape {x.shape}")
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
      return self._affine(x, mean, var)
    g = self.num_groups
    if x.shape[0] % g:
      raise ValueError(f"batch {x.shape[0]} does not split into {g} BatchNorm groups")
    xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    xf = xg.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    # Two-pass variance: E[(x - mean)^2] is stable where E[x^2] - mean^2 cancels.
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    n = xg[0].size // x.shape[-1]
    unbiased = jnp.mean(var, axis=tuple(range(var.ndim - 1))) * (n / max(n - 1, 1))
    m = self.momentum
    batch_mean = jnp.mean(mean, axis=tuple(range(mean.ndim - 1)))
    self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(batch_mean)
    self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    return self._affine(xg, mean, var).reshape(x.shape)

  def _affine(self, x, mean, var):
    # Fold normalisation and affine into one multiply-add so XLA fuses it with its neighbours.
    mul = self.scale[...] * jax.lax.rsqrt(var + self.eps)
    add = self.bias[...] - mean * mul
    return (x.astype(jnp.float32) * mul + add).astype(x.dtype)


class PReLU(nnx.Module):
  """Per-channel PReLU (``torch.nn.PReLU(num_parameters=C)``) on the last axis."""

  def __init__(self, num_features: int, *, init: float = 0.25):
    self.slope = nnx.Param(jnp.full((num_features,), init, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.slope[...].astype(x.dtype)
    return jnp.where(x >= 0, x, a * x)


def strided_gradients_rewritten() -> bool:
  """Whether :class:`Conv` gives strided convolutions its own gradients (at trace time).

  On the CPU backend, unless ``UNITSFACE_NO_XLA_FLAGS=1`` asks for XLA's own choices (as the
  test comparing device layouts bitwise does: see ``xla_flags.opted_out``). Elsewhere XLA's
  gradients are kept: cuDNN and the TPU compiler handle strided convolutions natively.
  """
  return jax.default_backend() == "cpu" and not xla_flags.opted_out()


class Conv(nnx.Conv):
  """``nnx.Conv`` whose strided cases get gradients that XLA:CPU runs fast.

  XLA computes the input gradient of a strided convolution as a convolution over the output
  gradient dilated with zeros, which XLA:CPU runs at a third of its rate for stride 1, and
  the weight gradient of a 1x1 strided convolution as a convolution too (BENCHMARKS.md,
  "strided-convolution gradients reinstated": +4-8% for the whole iresnet50 step on a Zen 3
  CPU). When :func:`strided_gradients_rewritten`, the two strided convolutions of
  insightface's IResNet keep their parameters and their forward result and get other
  gradients:

  - 1x1, stride s, no padding (the downsample): subsample, then a matmul over channels, so
    the input gradient is a matmul and a pad, and the weight gradient one 2-D
    ``[C, N*H*W] x [N*H*W, O]`` matmul;
  - 3x3, stride 2, padding 1 on an even-sized input (conv2 of each stage's first block):
    XLA's forward and weight gradient; the input gradient of the same convolution written
    as four stride-1 convolutions, one per (row, column) parity of the input, each with the
    kernel taps that read that parity (1x1, 1x2, 2x1, 2x2: nine taps in all).

  Every other case, and any convolution with dilation, groups, a bias or a mask, is
  ``nnx.Conv`` unchanged.
  """

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    path = self._rewritten_path(x)
    if path is None or out_sharding is not None:
      return super().__call__(x, out_sharding=out_sharding)
    dtype = self.dtype or jnp.result_type(x.dtype, self.kernel[...].dtype)
    x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
    if path == "1x1":
      return _conv1x1_strided(x, kernel[0, 0], self.strides[0], self.precision)
    return _conv3x3_s2(x, kernel, self.precision)

  def _rewritten_path(self, x: jax.Array) -> str | None:
    strides = tuple(self.strides) if not isinstance(self.strides, int) else (self.strides,) * 2
    if strides == (1, 1) or not strided_gradients_rewritten():
      return None
    plain = (x.ndim == 4 and self.feature_group_count == 1 and not self.use_bias
             and self.mask is None and self.preferred_element_type is None
             and self.conv_general_dilated is jax.lax.conv_general_dilated
             and self.input_dilation in (None, 1, (1, 1))
             and self.kernel_dilation in (None, 1, (1, 1))
             and not isinstance(self.padding, str))
    if not plain:
      return None
    pads = tuple(int(p) for pair in self.padding for p in pair)
    kernel_size = tuple(self.kernel_size)
    if kernel_size == (1, 1) and strides[0] == strides[1] and pads == (0,) * 4:
      return "1x1"
    if (kernel_size == (3, 3) and strides == (2, 2) and pads == (1,) * 4
        and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0):
      return "3x3s2"
    return None


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
  # One 2-D matmul: XLA's transpose of the einsum contracts three axes and ran 3x slower.
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


def conv(in_features: int, out_features: int, kernel: int, stride: int, padding: int, *,
         kernel_init, dtype: Dtype, rngs: nnx.Rngs) -> Conv:
  """A bias-free 2-D convolution on NHWC input with explicit symmetric padding
  (:class:`Conv`: strided ones get fast gradients on CPU)."""
  return Conv(
      in_features, out_features, kernel_size=(kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)


def stage_channels(width: int) -> tuple[int, int, int, int]:
  """Channels of the four stages of an IR trunk whose first stage has ``width``."""
  return width, 2 * width, 4 * width, 8 * width


class IRTrunk(nnx.Module):
  """What both IR-ResNet families share: stem conv3x3 -> BN -> PReLU, then four stages
  (``width`` x 1/2/4/8 channels: 64/128/256/512 in the published models; the first block of
  each stride 2) named ``layer1`` ... ``layer4``, the PyTorch names, so state-dict keys read
  ``layer3.13.conv2.weight``."""

  def _build_trunk(self, block, layers, *, width, conv_init, dtype, rngs: nnx.Rngs) -> None:
    if width < 1:
      raise ValueError(f"width must be a positive number of channels, got {width}")
    self.dtype = dtype
    self.conv1 = conv(3, width, 3, 1, 1, kernel_init=conv_init, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width)
    self.prelu = PReLU(width)
    inplanes = width
    for i, (planes, blocks) in enumerate(zip(stage_channels(width), layers)):
      stage = []
      for b in range(blocks):
        stage.append(block(inplanes, planes, 2 if b == 0 else 1, dtype=dtype, rngs=rngs))
        inplanes = planes
      setattr(self, f"layer{i + 1}", nnx.List(stage))

  def _trunk(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (112, 112, 3):
      raise ValueError(f"{type(self).__name__} expects NHWC [N, 112, 112, 3] input, got shape "
                       f"{x.shape}")
    x = self.prelu(self.bn1(self.conv1(x.astype(self.dtype))))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return x


def residual(out: jax.Array, x: jax.Array, downsample) -> jax.Array:
  """``out + identity``, the identity through ``downsample = [conv, bn]`` when present."""
  if downsample is not None:
    x = downsample[1](downsample[0](x))
  return out + x
