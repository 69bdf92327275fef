"""LResNet-EIR backbones in the official UniTSFace layout (lresnet50/100/200_eir).

Follows CVI-SZU/UniTSFace ``backbone.py`` (LResNetXEIR) so that its weights load by key name:
stem conv3x3 -> BN -> PReLU; IRBlock = BN0 -> conv3x3 -> BN1 -> PReLU -> conv -> BN2, where every
stride-2 convolution is a 2x2 kernel with stride 2 and no padding; downsample conv2x2 s2 -> BN;
head BN4 -> Dropout(0.4) -> 7x7 conv 512->512 (fc5) -> BN1d (bn5) with a frozen scale.
Initialisation as the official code: kaiming-normal convs (a=1, fan_in), PReLU 0.25, and each
block's last BN scale zero (zero_init_residual=True).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax.models.layers import BatchNorm, IRTrunk, PReLU, conv, residual, stage_channels

# torch kaiming_normal_(a=1, mode='fan_in', nonlinearity='leaky_relu'): gain sqrt(2/(1+1)) = 1,
# so std = 1/sqrt(fan_in).
_CONV_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def _eir_conv(inplanes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """The official ``conv3x3``: 3x3 pad 1, except stride 2 which becomes 2x2 pad 0."""
  if stride == 2:
    return conv(inplanes, planes, 2, 2, 0, kernel_init=_CONV_INIT, dtype=dtype, rngs=rngs)
  return conv(inplanes, planes, 3, stride, 1, kernel_init=_CONV_INIT, dtype=dtype, rngs=rngs)


class IRBlock(nnx.Module):
  """The official IRBlock; its last BN scale starts at zero so each block starts as identity."""

  def __init__(self, inplanes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.bn0 = BatchNorm(inplanes)
    self.conv1 = _eir_conv(inplanes, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes)
    self.prelu = PReLU(planes)
    self.conv2 = _eir_conv(planes, planes, stride, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes, scale_init=0.0)
    if stride != 1:
      self.downsample = nnx.List([_eir_conv(inplanes, planes, stride, dtype=dtype, rngs=rngs),
                                  BatchNorm(planes)])
    else:
      self.downsample = None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
    return residual(out, x, self.downsample)


class LResNetEIR(IRTrunk):
  """The official UniTSFace LResNetXEIR backbone (without its loss modules)."""

  def __init__(self, layers: Sequence[int], *, num_features: int = 512, dropout: float = 0.4,
               width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
    self._build_trunk(IRBlock, layers, width=width, conv_init=_CONV_INIT, dtype=dtype,
                      rngs=rngs)
    channels = stage_channels(width)[-1]
    self.bn4 = BatchNorm(channels)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.fc5 = nnx.Conv(channels, num_features, kernel_size=(7, 7), padding="VALID", use_bias=False,
                        dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=_CONV_INIT,
                        rngs=rngs)
    self.bn5 = BatchNorm(num_features, frozen_scale=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self._trunk(x)
    x = self.dropout(self.bn4(x).astype(jnp.float32))
    x = self.fc5(x).reshape(x.shape[0], -1)
    return self.bn5(x)
