"""IR-ResNet backbones in insightface arcface_torch's layout (iresnet18/34/50/100/200).

Layout, names and initialisation follow deepinsight/insightface
``recognition/arcface_torch/backbones/iresnet.py`` so that its released weights load by key name:
stem conv3x3 -> BN -> PReLU; IBasicBlock = BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride here)
-> BN, plus identity or conv1x1/BN downsample; head BN2d -> flatten -> dropout -> Linear -> BN1d
with its scale frozen at 1. Input NHWC in [-1, 1]; output the 512-d float32 embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax.models.layers import BatchNorm, IRTrunk, PReLU, conv, residual, stage_channels

# insightface initialises every conv weight from N(0, 0.1).
_CONV_INIT = nnx.initializers.normal(0.1)


class IBasicBlock(nnx.Module):
  """Pre-activation-style IR block; the stride sits on the second 3x3 convolution."""

  def __init__(self, inplanes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(kernel_init=_CONV_INIT, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(inplanes)
    self.conv1 = conv(inplanes, planes, 3, 1, 1, **kw)
    self.bn2 = BatchNorm(planes)
    self.prelu = PReLU(planes)
    self.conv2 = conv(planes, planes, 3, stride, 1, **kw)
    self.bn3 = BatchNorm(planes)
    if stride != 1 or inplanes != planes:
      # A list, so the torch keys read downsample.0 (conv) and downsample.1 (BN).
      self.downsample = nnx.List([conv(inplanes, planes, 1, stride, 0, **kw), BatchNorm(planes)])
    else:
      self.downsample = None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return residual(out, x, self.downsample)


class IResNet(IRTrunk):
  """insightface's IResNet for 112x112 faces (``width`` 64; narrower for quick runs)."""

  def __init__(self, layers: Sequence[int], *, num_features: int = 512, dropout: float = 0.0,
               width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
    self._build_trunk(IBasicBlock, layers, width=width, conv_init=_CONV_INIT, dtype=dtype,
                      rngs=rngs)
    channels = stage_channels(width)[-1]
    self.bn2 = BatchNorm(channels)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    # The head runs in float32 whatever the activation dtype, as insightface's fp16 mode does.
    self.fc = nnx.Linear(channels * 7 * 7, num_features, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=rngs)
    self.features = BatchNorm(num_features, frozen_scale=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self._trunk(x)
    x = self.bn2(x).astype(jnp.float32)
    # Flatten in PyTorch's NCHW order so fc.weight is a plain transpose of insightface's.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = self.fc(self.dropout(x))
    return self.features(x)
