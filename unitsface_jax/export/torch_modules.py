"""The backbones as PyTorch modules, so exported weights run without insightface installed.

Key names equal insightface's ``backbones/iresnet.py`` (``iresnet*``) and the official
UniTSFace ``backbone.py`` (``lresnet*_eir``, without its loss modules), so a state dict from
:func:`unitsface_jax.export.torch_state_dict` loads into these, into insightface's
``get_model('r100')`` and into the official ``LResNet50EIR`` alike. Inputs are NCHW float
tensors normalised to [-1, 1]. Needs the ``[torch]`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
    "lresnet50_eir": (3, 4, 14, 3),
    "lresnet100_eir": (3, 13, 30, 3),
    "lresnet200_eir": (3, 33, 60, 3),
}


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)


class IBasicBlock(nn.Module):
  """insightface's IBasicBlock (keys bn1, conv1, bn2, prelu, conv2, bn3, downsample.{0,1})."""

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
    self.conv1 = _conv(inplanes, planes, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
    self.prelu = nn.PReLU(planes)
    self.conv2 = _conv(planes, planes, 3, stride, 1)
    self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(_conv(inplanes, planes, 1, stride, 0),
                                      nn.BatchNorm2d(planes, eps=1e-5))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return out + (x if self.downsample is None else self.downsample(x))


class IRBlock(nn.Module):
  """The official UniTSFace IRBlock (keys bn0, conv1, bn1, prelu, conv2, bn2, downsample)."""

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()

    def eir_conv(cin, cout, s):
      return _conv(cin, cout, 2, 2, 0) if s == 2 else _conv(cin, cout, 3, s, 1)

    self.bn0 = nn.BatchNorm2d(inplanes)
    self.conv1 = eir_conv(inplanes, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.prelu = nn.PReLU(planes)
    self.conv2 = eir_conv(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1:
      self.downsample = nn.Sequential(eir_conv(inplanes, planes, stride), nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
    return out + (x if self.downsample is None else self.downsample(x))


class _Trunk(nn.Module):
  """Stem and the four stages shared by both families."""

  def __init__(self, block, layers: Sequence[int], width: int):
    super().__init__()
    self.conv1 = _conv(3, width, 3, 1, 1)
    self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
    self.prelu = nn.PReLU(width)
    inplanes = width
    for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
      stage = []
      for b in range(blocks):
        stage.append(block(inplanes, planes, 2 if b == 0 else 1))
        inplanes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

  def trunk(self, x: torch.Tensor) -> torch.Tensor:
    x = self.prelu(self.bn1(self.conv1(x)))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class IResNet(_Trunk):
  """insightface's IResNet: trunk -> bn2 -> flatten -> dropout -> fc -> features (BN1d)."""

  def __init__(self, layers: Sequence[int], dropout: float = 0.0, num_features: int = 512,
               width: int = 64):
    super().__init__(IBasicBlock, layers, width)
    self.bn2 = nn.BatchNorm2d(8 * width, eps=1e-5)
    self.dropout = nn.Dropout(p=dropout)
    self.fc = nn.Linear(8 * width * 7 * 7, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-5)
    nn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = torch.flatten(self.bn2(self.trunk(x)), 1)
    return self.features(self.fc(self.dropout(x)))


class LResNetEIR(_Trunk):
  """The official LResNetXEIR: trunk -> bn4 -> dropout -> fc5 (7x7 conv) -> bn5 (BN1d)."""

  def __init__(self, layers: Sequence[int], dropout: float = 0.4, num_features: int = 512,
               width: int = 64):
    super().__init__(IRBlock, layers, width)
    self.bn4 = nn.BatchNorm2d(8 * width)
    self.dropout = nn.Dropout(p=dropout)
    self.fc5 = nn.Conv2d(8 * width, num_features, (7, 7), bias=False)
    self.bn5 = nn.BatchNorm1d(num_features)
    self.bn5.weight.requires_grad = False

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.fc5(self.dropout(self.bn4(self.trunk(x))))
    return self.bn5(torch.flatten(x, 1))


def get_model(name: str, **kwargs) -> nn.Module:
  """The PyTorch twin of ``unitsface_jax.models.create(name)`` (keyword arguments
  ``dropout``, ``num_features``, ``width`` as there)."""
  if name not in _LAYERS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_LAYERS))}")
  cls = LResNetEIR if name.startswith("lresnet") else IResNet
  return cls(_LAYERS[name], **kwargs)
