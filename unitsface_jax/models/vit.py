"""Vision Transformers for 112x112 faces (``vit_t``, ``vit_s``, ``vit_b``, ...) in insightface
arcface_torch's layout.

Follows deepinsight/insightface ``recognition/arcface_torch/backbones/vit.py`` (and the
arguments its ``backbones/__init__.py`` passes) so that its weights load by key name:
``patch_embed.proj`` conv 9x9 stride 9 (112 -> 12x12 = 144 tokens; the last 4 pixel rows and
columns are not seen, as there), ``pos_embed`` [1, 144, D] added, no class token; ``blocks.i``
= pre-norm ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm (eps 1e-5), attention
with a bias-free ``qkv`` and a biased ``proj``, MLP ``fc1`` -> ReLU6 -> ``fc2`` (ratio 4; the
reference's default activation is ReLU6, not GELU, and its models keep it); final ``norm``
(LayerNorm), the 144 tokens flattened, ``feature`` = Linear(144 D -> D, no bias) -> BN1d(eps
2e-5) -> Linear(D -> num_features, no bias) -> BN1d(eps 2e-5).

Training-time noise as there: stochastic depth (per-sample drop path, rate rising linearly
from 0 in the first block to ``drop_path`` in the last) and token masking: with ``mask_ratio``
> 0 each sample keeps a random int(144 (1 - mask_ratio)) tokens through the blocks, and the
dropped places are refilled with the learned ``mask_token`` after the final norm. Each name
carries its arcface_torch values (``vit_t`` drop path 0.1, mask 0.1; ``vit_t_dp005_mask0``
0.05 and 0; ...). Both draw from the ``dropout`` RNG stream, and ``model.eval()`` turns them
off. ``dropout`` is the reference's ``drop_rate`` (after the position embedding, after the
attention projection and in the MLP; 0 in every arcface_torch model).

Precision: with bfloat16 activations the matrix products run in bfloat16, while the
attention logits, softmax and weighted sum, the final norm and the feature head run in float32,
as the reference's autocast regions do.

Initialisation as there: Linear weights and ``pos_embed`` N(0, 0.02) (timm's trunc_normal_
truncates at +-2 absolute, i.e. 100 standard deviations: a plain normal), Linear biases 0,
LayerNorm 1/0, ``mask_token`` N(0, 0.02), the patch conv PyTorch's default (uniform +-1/sqrt(
fan_in) for weight and bias). ``width`` (64 for the published models) scales the embedding
dimension D by width / 64 (the head count stays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax.models.layers import BatchNorm

_LINEAR_INIT = nnx.initializers.normal(0.02)
IMAGE_SIZE = 112


def _torch_default_uniform(fan_in: int):
  """PyTorch's default conv weight and bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _linear(cin, cout, *, bias, dtype, rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_LINEAR_INIT, bias_init=nnx.initializers.zeros, rngs=rngs)


def _layer_norm(dim, *, dtype, rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch.nn.LayerNorm, so float32 embeddings agree to ~1e-6.
  return nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm's DropPath: kept samples scaled by 1 / (1 - rate))."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.deterministic = False
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class TokenMask(nnx.Module):
  """The reference's ``random_masking``: per sample, keep a random ``int(L (1 - ratio))``
  tokens; :meth:`restore` puts the kept ones back in place and fills the rest."""

  def __init__(self, ratio: float, *, rngs: nnx.Rngs):
    self.ratio = ratio
    self.deterministic = False
    self.rngs = rngs["dropout"].fork()

  def active(self) -> bool:
    return not self.deterministic and self.ratio > 0

  def mask(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, length, _ = x.shape
    keep = int(length * (1 - self.ratio))
    noise = jax.random.uniform(self.rngs(), (n, length))
    shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise is kept
    restore = jnp.argsort(shuffle, axis=1)
    return jnp.take_along_axis(x, shuffle[:, :keep, None], axis=1), restore

  @staticmethod
  def restore(x: jax.Array, restore: jax.Array, token: jax.Array) -> jax.Array:
    n, kept, dim = x.shape
    fill = jnp.broadcast_to(token.astype(x.dtype), (n, restore.shape[1] - kept, dim))
    return jnp.take_along_axis(jnp.concatenate([x, fill], axis=1), restore[:, :, None], axis=1)


class Attention(nnx.Module):
  """Multi-head self-attention; logits, softmax and the weighted sum in float32."""

  def __init__(self, dim: int, num_heads: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, bias=False, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, bias=True, dtype=dtype, rngs=rngs)
    self.proj_drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, length, dim = x.shape
    h = self.num_heads
    # [N, L, 3, H, D/H]: the reference's reshape order, so qkv.weight's rows split alike.
    qkv = self.qkv(x).reshape(n, length, 3, h, dim // h).astype(jnp.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (dim // h) ** -0.5
    out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)
    return self.proj_drop(self.proj(out.reshape(n, length, dim).astype(x.dtype)))


class Mlp(nnx.Module):
  """fc1 -> ReLU6 -> dropout -> fc2 -> dropout."""

  def __init__(self, dim: int, hidden: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, bias=True, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.drop(self.fc2(self.drop(jax.nn.relu6(self.fc1(x)))))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, dim, num_heads, dropout, drop_path, *, dtype, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dropout, dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, 4 * dim, dropout, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nnx.Module):
  """Non-overlapping ``patch`` x ``patch`` conv with bias; [N, H, W, 3] -> [N, L, D]."""

  def __init__(self, patch: int, dim: int, *, dtype, rngs: nnx.Rngs):
    init = _torch_default_uniform(3 * patch * patch)
    self.proj = nnx.Conv(3, dim, kernel_size=(patch, patch), strides=(patch, patch),
                         padding="VALID", use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=init, bias_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)
    # Row-major over the patch grid: torch's flatten(2).transpose(1, 2) order.
    return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nnx.Module):
  """arcface_torch's VisionTransformer for 112x112 faces (patch 9, no class token)."""

  def __init__(self, embed_dim: int, depth: int, num_heads: int, *, drop_path: float,
               mask_ratio: float, patch: int = 9, num_features: int = 512,
               dropout: float = 0.0, width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
    dim = embed_dim * width // 64
    if width < 1 or dim % num_heads:
      raise ValueError(f"width must be a positive number of channels giving an embedding "
                       f"dimension ({embed_dim} x width / 64) divisible by the {num_heads} "
                       f"heads, got {width}")
    self.dtype = dtype
    self.num_patches = (IMAGE_SIZE // patch) ** 2
    self.patch_embed = PatchEmbed(patch, dim, dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(_LINEAR_INIT(rngs.params(), (1, self.num_patches, dim)))
    self.pos_drop = nnx.Dropout(dropout, rngs=rngs)
    self.token_mask = TokenMask(mask_ratio, rngs=rngs)
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace
    self.blocks = nnx.List([Block(dim, num_heads, dropout, r, dtype=dtype, rngs=rngs)
                            for r in rates])
    self.norm = _layer_norm(dim, dtype=jnp.float32, rngs=rngs)
    head = dict(bias=False, dtype=jnp.float32, rngs=rngs)
    self.feature = nnx.List([_linear(dim * self.num_patches, dim, **head),
                             BatchNorm(dim, eps=2e-5),
                             _linear(dim, num_features, **head),
                             BatchNorm(num_features, eps=2e-5)])
    self.mask_token = nnx.Param(_LINEAR_INIT(rngs.params(), (1, 1, dim)))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
      raise ValueError(f"VisionTransformer expects NHWC [N, 112, 112, 3] input, got shape "
                       f"{x.shape}")
    x = self.patch_embed(x.astype(self.dtype))
    x = self.pos_drop(x + self.pos_embed[...].astype(x.dtype))
    masking = self.token_mask.active()
    if masking:
      x, restore = self.token_mask.mask(x)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x.astype(jnp.float32))
    if masking:
      x = self.token_mask.restore(x, restore, self.mask_token[...])
    x = x.reshape(x.shape[0], -1)
    for layer in self.feature:
      x = layer(x)
    return x
