"""Backbones by name: insightface's ``iresnet*`` and the official UniTSFace ``lresnet*_eir``.

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
from flax import nnx

from unitsface_jax.models.iresnet import IResNet
from unitsface_jax.models.layers import BatchNorm, Frozen, PReLU
from unitsface_jax.models.lresnet_eir import LResNetEIR
from unitsface_jax.models.summary import count_params, macs_per_image, summary

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "iresnet18": functools.partial(IResNet, (2, 2, 2, 2)),
    "iresnet34": functools.partial(IResNet, (3, 4, 6, 3)),
    "iresnet50": functools.partial(IResNet, (3, 4, 14, 3)),
    "iresnet100": functools.partial(IResNet, (3, 13, 30, 3)),
    "iresnet200": functools.partial(IResNet, (6, 26, 60, 6)),
    "lresnet50_eir": functools.partial(LResNetEIR, (3, 4, 14, 3)),
    "lresnet100_eir": functools.partial(LResNetEIR, (3, 13, 30, 3)),
    # CVI-SZU/UniTSFace backbone.py: LResNet200EIR = [3, 33, 60, 3].
    "lresnet200_eir": functools.partial(LResNetEIR, (3, 33, 60, 3)),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The model's state that is saved but not optimised: BatchNorm statistics and frozen scales.
MODEL_STATE = nnx.Any(nnx.BatchStat, Frozen)


def list_models() -> list[str]:
  """The registered backbone names."""
  return sorted(_REGISTRY)


def create(name: str, *, rngs: nnx.Rngs, dtype: str | jnp.dtype = "float32",
           dropout: float | None = None, num_features: int = 512,
           width: int = 64) -> nnx.Module:
  """Builds the backbone ``name`` (parameters float32; activations in ``dtype``).

  Args:
    name: one of :func:`list_models`.
    rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training with dropout > 0).
    dtype: activation dtype, "float32" or "bfloat16" (or the jnp dtype).
    dropout: dropout rate before the embedding layer; None keeps the family's default
      (insightface 0.0, official UniTSFace 0.4).
    num_features: embedding size.
    width: channels of the first stage (the stages have width x 1, 2, 4, 8). The published
      models all have 64; a narrower trunk trains and runs in a fraction of the time (the
      demo's smoke run and the tests use 16). Weight files record it in ``conv1.weight``.
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


def from_config(model_config: Any, key: jax.Array) -> nnx.Module:
  """The backbone a run's ``config.model`` describes, initialised from ``key`` (parameters
  and dropout stream). A config without ``width`` (written before the field existed) means
  the published width, 64."""
  return create(model_config.name, rngs=nnx.Rngs(params=key, dropout=key),
                dtype=model_config.dtype, dropout=model_config.dropout,
                num_features=model_config.num_features,
                width=model_config.get("width", 64))


__all__ = ["MODEL_STATE", "from_config", "BatchNorm", "Frozen", "IResNet", "LResNetEIR", "PReLU", "count_params", "create",
           "list_models", "macs_per_image", "summary"]
