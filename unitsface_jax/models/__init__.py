"""Backbones by name: insightface's ``iresnet*``, ``mbf*`` (MobileFaceNet) and ``vit_*``, and the
official UniTSFace ``lresnet*_eir``.

``create(name, rngs=...)`` builds a Flax NNX module whose ``__call__`` maps NHWC images in
[-1, 1] of shape [N, 112, 112, 3] to [N, 512] float32 embeddings; ``model.eval()`` and
``model.train()`` switch BatchNorm and dropout between inference and training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitsface_jax.models.iresnet import IResNet
from unitsface_jax.models.layers import BatchNorm, Frozen, IRTrunk, PReLU, target_platform
from unitsface_jax.models.lresnet_eir import LResNetEIR
from unitsface_jax.models.mobilefacenet import MobileFaceNet
from unitsface_jax.models.summary import count_params, macs_per_image, summary
from unitsface_jax.models.vit import VisionTransformer


# insightface arcface_torch backbones/__init__.py get_model: the names and, per name, the
# IResNet's blocks per stage, the MobileFaceNet's (blocks per stage, channel scale) and the
# ViT's (embedding dimension, depth, drop-path rate, mask ratio; 8 heads and patch 9 in all)
# arguments there; the LResNet-EIR's blocks per stage from CVI-SZU/UniTSFace backbone.py
# (LResNet200EIR = [3, 33, 60, 3]).
IRESNET_ARCHS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3),
                 "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3),
                 "iresnet200": (6, 26, 60, 6)}
LRESNET_ARCHS = {"lresnet50_eir": (3, 4, 14, 3), "lresnet100_eir": (3, 13, 30, 3),
                 "lresnet200_eir": (3, 33, 60, 3)}
MBF_ARCHS = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}
VIT_ARCHS = {
    "vit_t": (256, 12, 0.1, 0.1),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0),
    "vit_s": (512, 12, 0.1, 0.1),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0),
    "vit_b": (512, 24, 0.1, 0.1),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05),
    "vit_h": (1024, 48, 0.1, 0.0),
}

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    **{name: functools.partial(IResNet, layers) for name, layers in IRESNET_ARCHS.items()},
    **{name: functools.partial(LResNetEIR, layers) for name, layers in LRESNET_ARCHS.items()},
    **{name: functools.partial(MobileFaceNet, *arch) for name, arch in MBF_ARCHS.items()},
    **{name: functools.partial(VisionTransformer, dim, depth, 8, drop_path=dp, mask_ratio=mask)
       for name, (dim, depth, dp, mask) in VIT_ARCHS.items()},
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The model's state that is saved but not optimised: BatchNorm statistics and frozen scales.
MODEL_STATE = nnx.Any(nnx.BatchStat, Frozen)


def list_models() -> list[str]:
  """The registered backbone names."""
  return sorted(_REGISTRY)


def register(name: str, factory: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
  """Adds the backbone ``factory`` under ``name`` (``config.model.name``) and returns it.

  ``factory(*, dtype, num_features, width, rngs, dropout=...)`` builds an NNX module with
  :func:`create`'s contract: NHWC images in [-1, 1], [N, 112, 112, 3] -> [N, num_features]
  float32 embeddings; BatchNorm statistics as ``nnx.BatchStat``; ``dropout`` optional (a
  family's default when the config gives none). Raises ValueError if ``name`` is taken.
  """
  if _REGISTRY.get(name, factory) is not factory:
    raise ValueError(f"a backbone named {name!r} is already registered")
  _REGISTRY[name] = factory
  return factory


def unregister(name: str) -> None:
  """Removes a backbone added with :func:`register` (a test's own)."""
  del _REGISTRY[name]


def create(name: str, *, rngs: nnx.Rngs, dtype: str | jnp.dtype = "float32",
           dropout: float | None = None, num_features: int = 512,
           width: int = 64) -> nnx.Module:
  """Builds the backbone ``name`` (parameters float32; activations in ``dtype``).

  Args:
    name: one of :func:`list_models`.
    rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training with dropout > 0).
    dtype: activation dtype, "float32" or "bfloat16" (or the jnp dtype).
    dropout: dropout rate before the embedding layer (ViT: the reference's ``drop_rate``,
      models/vit.py); None keeps the family's default (insightface 0.0, official UniTSFace
      0.4).
    num_features: embedding size.
    width: channels of the first stage (the stages have width x 1, 2, 4, 8). The published
      models all have 64; a narrower trunk trains and runs in a fraction of the time (the
      demo's smoke run and the tests use 16). Weight files record it in ``conv1.weight``.
      MobileFaceNet scales every channel count by width / 64, ViT its embedding dimension.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype]
  kwargs = {} if dropout is None else {"dropout": dropout}
  return _REGISTRY[name](dtype=dtype, num_features=num_features, width=int(width), rngs=rngs,
                         **kwargs)


def create_abstract(name: str, **kwargs) -> nnx.Module:
  """:func:`create`'s backbone without a random initialisation, for a weight loader to fill.

  Its weights and statistics are ``jax.ShapeDtypeStruct`` until set (``Variable.set_value``,
  as ``export.load_torch_state_dict`` and ``checkpoint.backbone_from_workdir`` do); its RNG
  streams are concrete (key 0, count 0), so the filled model runs. Creating eagerly compiles
  each initialiser's shapes on its own: seconds a model on a CPU, all of it overwritten by a
  loader. :func:`unfilled` lists what a loader left abstract.

  Args:
    name: one of :func:`list_models`.
    **kwargs: :func:`create`'s other arguments but ``rngs``.
  """
  model = nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), **kwargs))
  nnx.update(model, jax.tree.map(_concrete_rng, nnx.state(model, nnx.RngState)))
  return model


def _concrete_rng(leaf: jax.ShapeDtypeStruct) -> jax.Array | np.ndarray:
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return key if leaf.shape == () else jax.random.split(key, leaf.shape)
  return np.zeros(leaf.shape, leaf.dtype)


def unfilled(model: nnx.Module) -> list[str]:
  """The paths of the model's variables that are still abstract (:func:`create_abstract`)."""
  return ["/".join(str(p) for p in path) for path, var in nnx.to_flat_state(nnx.state(model))
          if isinstance(var.get_raw_value(), jax.ShapeDtypeStruct)]


REMAT_ERROR = "rematerialisation is implemented for the IR-ResNet trunks (iresnet*, lresnet*_eir),"


def supports_remat(name: str) -> bool:
  """Whether ``config.model.remat`` applies to the backbone ``name`` (an IR-ResNet trunk)."""
  return name.startswith(("iresnet", "lresnet"))


def width_error(name: str, width: int) -> str | None:
  """Why ``create(name, width=width)`` would fail (None when it builds)."""
  if width < 1:
    return "must be a positive number of channels"
  if name in VIT_ARCHS and VIT_ARCHS[name][0] * width // 64 % 8:
    return (f"gives {name} an embedding dimension ({VIT_ARCHS[name][0]} x width / 64) not "
            f"divisible by its 8 heads")
  return None


def from_config(model_config: Any, key: jax.Array) -> nnx.Module:
  """The backbone a run's ``config.model`` describes, initialised from ``key`` (parameters
  and dropout stream). A config without ``width`` (written before the field existed) means
  the published width, 64."""
  model = create(model_config.name, rngs=nnx.Rngs(params=key, dropout=key),
                 **_config_kwargs(model_config))
  return _with_remat(model, model_config)


def abstract_from_config(model_config: Any) -> nnx.Module:
  """:func:`from_config`'s backbone without a random initialisation (:func:`create_abstract`),
  for a loader to fill with saved weights."""
  return _with_remat(create_abstract(model_config.name, **_config_kwargs(model_config)),
                     model_config)


def _config_kwargs(model_config: Any) -> dict[str, Any]:
  return dict(dtype=model_config.dtype, dropout=model_config.dropout,
              num_features=model_config.num_features, width=model_config.get("width", 64))


def _with_remat(model: nnx.Module, model_config: Any) -> nnx.Module:
  if model_config.get("remat", False):
    if not isinstance(model, IRTrunk):
      raise ValueError(f"model.remat: {REMAT_ERROR} not {model_config.name!r}")
    model.remat = True
  return model


__all__ = ["MODEL_STATE", "from_config", "abstract_from_config", "BatchNorm", "Frozen",
           "IResNet", "LResNetEIR", "MobileFaceNet", "PReLU", "VisionTransformer",
           "count_params", "create", "create_abstract", "list_models", "macs_per_image",
           "summary", "supports_remat", "target_platform", "unfilled", "width_error"]
