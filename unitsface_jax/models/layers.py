"""Building blocks shared by the backbones: BatchNorm with PyTorch semantics, PReLU, convs.

The layers are written so that weights cross to and from PyTorch without loss: BatchNorm keeps
PyTorch's running-average rule (momentum 0.1 on the new value, unbiased variance in the running
estimate), and a BatchNorm whose scale PyTorch freezes (``requires_grad = False``) stores that
scale as a :class:`Frozen` variable, which is saved with the model but is not an
``nnx.Param`` and so never reaches the optimiser.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax import cpu_tuning

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
  """``nnx.Conv`` that hands strided convolutions to ``cpu_tuning`` when its gradients are on.

  The same parameters and forward result as ``nnx.Conv``. After ``cpu_tuning.enable()``, on
  the CPU backend, the strided convolutions of the IR trunks get gradients that XLA:CPU runs
  faster (``unitsface_jax.cpu_tuning``); otherwise this is ``nnx.Conv``.
  """

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    cpu = traced_for_cpu()
    if self.feature_group_count > 1 and out_sharding is None and _TAPS["on"] and cpu:
      return _grouped_conv_taps(self, x)
    if out_sharding is None and cpu and cpu_tuning.strided_conv_gradients_active():
      y = cpu_tuning.strided_conv(self, x)
      if y is not None:
        return y
    return super().__call__(x, out_sharding=out_sharding)


# Grouped convolutions on the CPU backend run as a sum over the kernel's taps (see
# _grouped_conv_taps); models.summary turns this off to count their MACs from the conv.
_TAPS = {"on": True}
# The platform the model is traced for when it is not JAX's default backend (the TPU plan
# traces on a CPU host for compile-only TPU devices): see ``target_platform``.
_TARGET = {"platform": None}


@contextlib.contextmanager
def target_platform(platform: str):
  """Traces the backbones for ``platform`` ("tpu", "gpu", "cpu") inside the block, whatever
  JAX's default backend is: the CPU-only formulations (grouped convolutions as taps, the
  strided-convolution gradients of ``cpu_tuning``) follow it, so a TPU program compiled on a
  CPU host is the program a TPU host would build."""
  previous, _TARGET["platform"] = _TARGET["platform"], platform
  try:
    yield
  finally:
    _TARGET["platform"] = previous


def traced_for_cpu() -> bool:
  return (_TARGET["platform"] or jax.default_backend()) == "cpu"


@contextlib.contextmanager
def grouped_conv_as_taps(on: bool):
  """Within the block, CPU grouped convolutions are (``on``) or are not tap sums."""
  before = _TAPS["on"]
  _TAPS["on"] = on
  try:
    yield
  finally:
    _TAPS["on"] = before


def _grouped_conv_taps(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """A grouped convolution (MobileFaceNet's depthwise and 2-channel-group 3x3s) as a sum of
  strided slices times per-channel weights, accumulated in float32.

  The result equals ``nnx.Conv``'s; on XLA:CPU the grouped ``conv_general_dilated`` is ~2x
  slower forward and ~13x slower in its gradients than these fused elementwise products
  (32 x 56 x 56 x 128 depthwise 3x3, BENCHMARKS.md).
  """
  kh, kw = conv.kernel_size
  sh, sw = (conv.strides,) * 2 if isinstance(conv.strides, int) else conv.strides
  (pt, pb), (pl, pr) = conv.padding
  kernel = conv.kernel[...].astype(jnp.float32)
  in_pg, cout = kernel.shape[2], kernel.shape[3]
  groups = conv.feature_group_count
  out_pg = cout // groups
  n, h, w, cin = x.shape
  xp = jnp.pad(x.astype(conv.dtype or x.dtype).astype(jnp.float32),
               ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  if (ho, wo) == (1, 1):
    # The kernel covers the whole (padded) input, as MobileFaceNet's 7x7 depthwise GDC does:
    # one product summed over the window instead of kh * kw slices, which XLA:CPU compiles
    # in a fraction of the time (the 49 slices and their gradients were most of mbf's step).
    xs = xp[:, :kh, :kw, :].reshape(n, kh, kw, groups, in_pg, 1)
    k = kernel.reshape(kh, kw, in_pg, groups, out_pg).transpose(0, 1, 3, 2, 4)
    y = (xs * k).sum((1, 2, 4)).reshape(n, 1, 1, cout)
  else:
    y = None
    for dy in range(kh):
      for dx in range(kw):
        xs = jax.lax.slice(xp, (0, dy, dx, 0),
                           (n, dy + sh * (ho - 1) + 1, dx + sw * (wo - 1) + 1, cin),
                           (1, sh, sw, 1))
        xs = xs.reshape(n, ho, wo, groups, in_pg)
        for j in range(in_pg):  # input channel j of each group, to the group's outputs
          xj = jnp.broadcast_to(xs[..., j:j + 1], (n, ho, wo, groups, out_pg))
          term = xj.reshape(n, ho, wo, cout) * kernel[dy, dx, j]
          y = term if y is None else y + term
  if conv.bias is not None:
    y = y + conv.bias[...].astype(jnp.float32)
  return y.astype(conv.dtype or x.dtype)


def conv(in_features: int, out_features: int, kernel: int, stride: int, padding: int, *,
         kernel_init, dtype: Dtype, rngs: nnx.Rngs) -> Conv:
  """A bias-free 2-D convolution on NHWC input with explicit symmetric padding (:class:`Conv`)."""
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
    run = _run_block
    if getattr(self, "remat", False):
      # Rematerialisation: the backward pass recomputes each block's activations from its
      # input instead of keeping them (one more forward pass of FLOPs, the activations of one
      # block live at a time).
      run = nnx.remat(_run_block)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = run(block, x)
    return x


def _run_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  return block(x)


def residual(out: jax.Array, x: jax.Array, downsample) -> jax.Array:
  """``out + identity``, the identity through ``downsample = [conv, bn]`` when present."""
  if downsample is not None:
    x = downsample[1](downsample[0](x))
  return out + x
