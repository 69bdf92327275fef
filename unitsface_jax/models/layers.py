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


class Conv(nnx.Conv):
  """``nnx.Conv`` (bias-free, NHWC, symmetric padding) whose strided cases avoid slow gradients.

  XLA computes the input gradient of a strided convolution as a convolution over the output
  gradient dilated with zeros, which XLA:CPU runs at a third of its dense rate (BENCHMARKS.md,
  "Train step"). The strided convolutions of insightface's IResNet get other gradients, with
  the same parameters and the same forward result:

  - 1x1, stride s (the downsample): subsample, then a 1x1 convolution written as a matmul,
    so that both gradients are matmuls (the weight gradient a plain 2-D one) and the
    subsampling's gradient is a pad;
  - 3x3, stride 2, padding 1 (conv2 of each stage's first block): the forward and the
    weight gradient stay XLA's; the input gradient is that of the same convolution written
    as four stride-1 convolutions, one per (row, column) parity of the input, each with the
    kernel taps that read that parity (1x1, 1x2, 2x1 and 2x2: 9 taps in all).

  Every other configuration is ``nnx.Conv`` unchanged.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    pads = tuple(p for pair in self.padding for p in pair)
    if (sh, sw) == (1, 1) or x.ndim != 4 or self.feature_group_count != 1:
      return super().__call__(x)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
    if (kh, kw) == (1, 1) and sh == sw and pads == (0, 0, 0, 0):
      return _conv1x1_strided(x, kernel[0, 0], sh, self.precision)
    if (kh, kw, sh, sw) == (3, 3, 2, 2) and pads == (1, 1, 1, 1) \
        and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
      return _conv3x3_s2(x, kernel, self.precision)
    return super().__call__(x)


def _lax_conv(x, kernel, strides, padding, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv1x1_strided(x, kernel, stride, precision):
  return jnp.einsum("nhwc,co->nhwo", x[:, ::stride, ::stride, :], kernel, precision=precision)


def _conv1x1_strided_fwd(x, kernel, stride, precision):
  return _conv1x1_strided(x, kernel, stride, precision), (x, kernel)


def _conv1x1_strided_bwd(stride, precision, residuals, dy):
  x, kernel = residuals
  xs, unsubsample = jax.vjp(lambda v: v[:, ::stride, ::stride, :], x)
  # The weight gradient as one [C, N*H*W] x [N*H*W, O] matmul: XLA's transpose of the
  # einsum above contracts three axes and runs 3x slower.
  d_kernel = jnp.matmul(xs.reshape(-1, xs.shape[-1]).T, dy.reshape(-1, dy.shape[-1]),
                        precision=precision)
  dx = unsubsample(jnp.einsum("nhwo,co->nhwc", dy, kernel, precision=precision))[0]
  return dx, d_kernel


_conv1x1_strided.defvjp(_conv1x1_strided_fwd, _conv1x1_strided_bwd)


def _polyphase_conv3x3_s2(x, kernel, precision):
  """The 3x3, stride-2, padding-1 convolution as four stride-1 convolutions (same result)."""
  # Output row o reads padded rows 2o, 2o+1, 2o+2 = input rows 2o-1 (odd), 2o (even) and
  # 2o+1 (odd): even rows meet kernel row 1 only; odd rows meet kernel rows (0, 2) at
  # odd-row indices (o-1, o), a 2-tap stride-1 convolution with one padding row on top.
  taps = {0: slice(1, 2), 1: slice(0, 3, 2)}  # input parity -> kernel taps reading it
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
  # XLA's own weight gradient is the faster one; the input gradient of the polyphase form
  # is four stride-1 transposed convolutions instead of one over a zero-dilated dy.
  _, vjp_kernel = jax.vjp(lambda k: _lax_conv(x, k, (2, 2), ((1, 1), (1, 1)), precision),
                          kernel)
  _, vjp_x = jax.vjp(lambda v: _polyphase_conv3x3_s2(v, kernel, precision), x)
  return vjp_x(dy)[0], vjp_kernel(dy)[0]


_conv3x3_s2.defvjp(_conv3x3_s2_fwd, _conv3x3_s2_bwd)


def conv(in_features: int, out_features: int, kernel: int, stride: int, padding: int, *,
         kernel_init, dtype: Dtype, rngs: nnx.Rngs) -> Conv:
  """A bias-free 2-D convolution on NHWC input with explicit symmetric padding."""
  return Conv(
      in_features, out_features, kernel_size=(kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)


class IRTrunk(nnx.Module):
  """What both IR-ResNet families share: stem conv3x3 -> BN -> PReLU, then four stages
  (64/128/256/512 channels, the first block of each stride 2) named ``layer1`` ... ``layer4``,
  the PyTorch names, so state-dict keys read ``layer3.13.conv2.weight``."""

  def _build_trunk(self, block, layers, *, conv_init, dtype, rngs: nnx.Rngs) -> None:
    self.dtype = dtype
    self.conv1 = conv(3, 64, 3, 1, 1, kernel_init=conv_init, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(64)
    self.prelu = PReLU(64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
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
