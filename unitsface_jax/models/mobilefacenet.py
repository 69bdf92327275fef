"""MobileFaceNet (``mbf``, ``mbf_large``) in insightface arcface_torch's layout.

Follows deepinsight/insightface ``recognition/arcface_torch/backbones/mobilefacenet.py`` so that
its weights load by key name: ``layers`` = stem ConvBlock 3x3 s2 (conv -> BN -> PReLU), a
grouped 3x3 ConvBlock (``mbf``) or a Residual stage (``mbf_large``), then DepthWise s2 /
Residual stages; each DepthWise is ConvBlock 1x1 expand -> grouped 3x3 ConvBlock -> LinearBlock
1x1 (conv -> BN, no activation), with the identity added inside a Residual stage;
``conv_sep`` ConvBlock 1x1 to 512; ``features`` (GDC) = LinearBlock 7x7 depthwise -> flatten ->
Linear without bias -> BN1d. Initialisation as there: kaiming-normal (fan_out, relu) for every
conv and the Linear, BN 1/0, PReLU 0.25.

Choices where the reference has nothing to match: ``dropout`` (default 0, the reference has
none) sits before the GDC's Linear, where the IResNets have theirs; ``width`` (64 for the
published models) scales every channel count and group count by width / 64.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax.models.layers import BatchNorm, Conv, PReLU

# torch kaiming_normal_(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / fan_out), where
# fan_out = out_channels * kh * kw (torch does not divide by groups; nor does flax).
_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, kernel, stride, padding, groups, *, dtype, rngs) -> Conv:
  return Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
              padding=((padding, padding), (padding, padding)), feature_group_count=groups,
              use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=_INIT, rngs=rngs)


class _Sequential(nnx.Module):
  """Modules applied in order and kept in ``layers``, the PyTorch ``nn.Sequential``'s keys."""

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class ConvBlock(_Sequential):
  """conv -> BN -> PReLU (keys ``layers.0/1/2``)."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, *, dtype, rngs):
    self.layers = nnx.List([_conv(cin, cout, kernel, stride, padding, groups, dtype=dtype,
                                  rngs=rngs), BatchNorm(cout), PReLU(cout)])


class LinearBlock(_Sequential):
  """conv -> BN, no activation (keys ``layers.0/1``)."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, *, dtype, rngs):
    self.layers = nnx.List([_conv(cin, cout, kernel, stride, padding, groups, dtype=dtype,
                                  rngs=rngs), BatchNorm(cout)])


class DepthWise(_Sequential):
  """1x1 expand to ``groups`` channels -> grouped 3x3 (stride here) -> 1x1 project, plus the
  input when ``residual``."""

  def __init__(self, cin, cout, groups, stride, residual=False, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.residual = residual
    self.layers = nnx.List([ConvBlock(cin, groups, **kw),
                            ConvBlock(groups, groups, 3, stride, 1, groups, **kw),
                            LinearBlock(groups, cout, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    out = super().__call__(x)
    return x + out if self.residual else out


class Residual(_Sequential):
  """``num_block`` residual DepthWise blocks at stride 1."""

  def __init__(self, channels, num_block, groups, *, dtype, rngs):
    self.layers = nnx.List([DepthWise(channels, channels, groups, 1, True, dtype=dtype,
                                      rngs=rngs) for _ in range(num_block)])


class Flatten(nnx.Module):
  """[N, 1, 1, C] -> [N, C] (holds the place of the reference's parameter-free ``Flatten``)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class GDC(nnx.Module):
  """Global depthwise conv 7x7 -> BN -> flatten -> (dropout) -> Linear -> BN1d, in float32."""

  def __init__(self, channels, num_features, dropout, *, rngs):
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.layers = nnx.List([
        LinearBlock(channels, channels, 7, 1, 0, channels, dtype=jnp.float32, rngs=rngs),
        Flatten(),
        nnx.Linear(channels, num_features, use_bias=False, dtype=jnp.float32,
                   param_dtype=jnp.float32, kernel_init=_INIT, rngs=rngs),
        BatchNorm(num_features)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.layers[1](self.layers[0](x.astype(jnp.float32)))
    return self.layers[3](self.layers[2](self.dropout(x)))


class MobileFaceNet(nnx.Module):
  """arcface_torch's MobileFaceNet: ``blocks`` per stage and channel ``scale`` (mbf: (1, 4, 6,
  2) and 2; mbf_large: (2, 8, 12, 4) and 4)."""

  def __init__(self, blocks: Sequence[int], scale: int, *, num_features: int = 512,
               dropout: float = 0.0, width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
    if width < 1:
      raise ValueError(f"width must be a positive number of channels, got {width}")
    self.dtype = dtype
    kw = dict(dtype=dtype, rngs=rngs)

    def ch(c: int) -> int:  # the reference's channel and group counts, at this width
      return c * width // 64

    c1, c2 = ch(64 * scale), ch(128 * scale)
    layers = [ConvBlock(3, c1, 3, 2, 1, **kw)]
    if blocks[0] == 1:
      layers.append(ConvBlock(c1, c1, 3, 1, 1, ch(64), **kw))
    else:
      layers.append(Residual(c1, blocks[0], ch(128), **kw))
    layers += [DepthWise(c1, c1, ch(128), 2, **kw), Residual(c1, blocks[1], ch(128), **kw),
               DepthWise(c1, c2, ch(256), 2, **kw), Residual(c2, blocks[2], ch(256), **kw),
               DepthWise(c2, c2, ch(512), 2, **kw), Residual(c2, blocks[3], ch(256), **kw)]
    self.layers = nnx.List(layers)
    # The reference runs conv_sep and the GDC in float32 under its fp16 switch; so do we.
    self.conv_sep = ConvBlock(c2, ch(512), dtype=jnp.float32, rngs=rngs)
    self.features = GDC(ch(512), num_features, dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (112, 112, 3):
      raise ValueError(f"MobileFaceNet expects NHWC [N, 112, 112, 3] input, got shape "
                       f"{x.shape}")
    x = x.astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    return self.features(self.conv_sep(x.astype(jnp.float32)))
