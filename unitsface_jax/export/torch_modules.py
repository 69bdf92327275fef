"""The backbones as PyTorch modules, so exported weights run without insightface installed.

Key names equal insightface's ``backbones/iresnet.py`` (``iresnet*``),
``backbones/mobilefacenet.py`` (``mbf*``), ``backbones/vit.py`` (``vit_*``) and the official
UniTSFace ``backbone.py`` (``lresnet*_eir``, without its loss modules), so a state dict from
:func:`unitsface_jax.export.torch_state_dict` loads into these, into insightface's
``get_model('r100')`` / ``get_model('vit_t')`` and into the official ``LResNet50EIR`` alike.
The MobileFaceNet and ViT here are inference twins: they run the eval-mode forward pass (no
drop path or token masking, which only training uses). Inputs are NCHW float
tensors normalised to [-1, 1]. Needs the ``[torch]`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unitsface_jax.models import IRESNET_ARCHS, LRESNET_ARCHS, MBF_ARCHS, VIT_ARCHS


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


class _Sequential(nn.Module):
  """Children in ``self.layers`` (an ``nn.Sequential``: keys ``layers.0``, ``layers.1``, ...)."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layers(x)


class ConvBlock(_Sequential):
  """MobileFaceNet's conv -> BN -> PReLU."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1):
    super().__init__()
    self.layers = nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout), nn.PReLU(cout))


class LinearBlock(_Sequential):
  """MobileFaceNet's conv -> BN."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1):
    super().__init__()
    self.layers = nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout))


class DepthWise(_Sequential):
  """1x1 expand -> grouped 3x3 -> 1x1 project (+ input when residual)."""

  def __init__(self, cin, cout, groups, stride, residual=False):
    super().__init__()
    self.residual = residual
    self.layers = nn.Sequential(ConvBlock(cin, groups), ConvBlock(groups, groups, 3, stride, 1,
                                                                  groups),
                                LinearBlock(groups, cout))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.layers(x) if self.residual else self.layers(x)


class Residual(_Sequential):
  def __init__(self, channels, num_block, groups):
    super().__init__()
    self.layers = nn.Sequential(*[DepthWise(channels, channels, groups, 1, True)
                                  for _ in range(num_block)])


class GDC(_Sequential):
  """7x7 depthwise LinearBlock -> flatten -> dropout -> Linear -> BN1d (keys layers.0/2/3)."""

  def __init__(self, channels, num_features, dropout):
    super().__init__()
    self.layers = nn.Sequential(LinearBlock(channels, channels, 7, 1, 0, channels), nn.Flatten(),
                                nn.Linear(channels, num_features, bias=False),
                                nn.BatchNorm1d(num_features))
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.dropout(self.layers[1](self.layers[0](x)))
    return self.layers[3](self.layers[2](x))


class MobileFaceNet(nn.Module):
  """arcface_torch's MobileFaceNet (channels and groups scaled by width / 64)."""

  def __init__(self, blocks: Sequence[int], scale: int, dropout: float = 0.0,
               num_features: int = 512, width: int = 64):
    super().__init__()

    def ch(c):
      return c * width // 64

    c1, c2 = ch(64 * scale), ch(128 * scale)
    first = (ConvBlock(c1, c1, 3, 1, 1, ch(64)) if blocks[0] == 1
             else Residual(c1, blocks[0], ch(128)))
    self.layers = nn.ModuleList([
        ConvBlock(3, c1, 3, 2, 1), first,
        DepthWise(c1, c1, ch(128), 2), Residual(c1, blocks[1], ch(128)),
        DepthWise(c1, c2, ch(256), 2), Residual(c2, blocks[2], ch(256)),
        DepthWise(c2, c2, ch(512), 2), Residual(c2, blocks[3], ch(256))])
    self.conv_sep = ConvBlock(c2, ch(512))
    self.features = GDC(ch(512), num_features, dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for layer in self.layers:
      x = layer(x)
    return self.features(self.conv_sep(x))


class _PatchEmbed(nn.Module):
  def __init__(self, patch: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    n, length, dim = x.shape
    h = self.num_heads
    q, k, v = self.qkv(x).reshape(n, length, 3, h, dim // h).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (dim // h) ** -0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))


class _Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.ReLU6()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = _Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = _Mlp(dim, 4 * dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """arcface_torch's VisionTransformer at inference (patch 9, 144 tokens, no class token)."""

  def __init__(self, embed_dim: int, depth: int, num_heads: int = 8, patch: int = 9,
               dropout: float = 0.0, num_features: int = 512, width: int = 64):
    super().__init__()
    del dropout  # inference only: the reference's drop_rate acts in training
    dim = embed_dim * width // 64
    num_patches = (112 // patch) ** 2
    self.patch_embed = _PatchEmbed(patch, dim)
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
    self.blocks = nn.ModuleList([_Block(dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim)
    self.feature = nn.Sequential(
        nn.Linear(dim * num_patches, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
        nn.Linear(dim, num_features, bias=False), nn.BatchNorm1d(num_features, eps=2e-5))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(x) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.feature(torch.flatten(self.norm(x), 1))


def get_model(name: str, **kwargs) -> nn.Module:
  """The PyTorch twin of ``unitsface_jax.models.create(name)`` (keyword arguments
  ``dropout``, ``num_features``, ``width`` as there)."""
  if name in MBF_ARCHS:
    return MobileFaceNet(*MBF_ARCHS[name], **kwargs)
  if name in VIT_ARCHS:
    return VisionTransformer(*VIT_ARCHS[name][:2], **kwargs)
  if name in LRESNET_ARCHS:
    return LResNetEIR(LRESNET_ARCHS[name], **kwargs)
  if name not in IRESNET_ARCHS:
    known = sorted(IRESNET_ARCHS) + sorted(LRESNET_ARCHS) + sorted(MBF_ARCHS) + sorted(VIT_ARCHS)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
  return IResNet(IRESNET_ARCHS[name], **kwargs)
