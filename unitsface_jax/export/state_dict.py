"""Flax <-> PyTorch state dicts, with insightface's and the official UniTSFace key names.

The NNX modules are named like their PyTorch twins (``layer1`` is a list of blocks, a
downsample is a list ``[conv, bn]``), so a module's path joined by dots is its PyTorch prefix;
only the leaf names and the layouts differ:

  nnx.Conv   kernel [kh, kw, in, out]  <->  weight [out, in, kh, kw]  (OIHW)
  nnx.Linear kernel [in, out], bias    <->  weight [out, in], bias
  BatchNorm  scale, bias, mean, var    <->  weight, bias, running_mean, running_var
  PReLU      slope                     <->  weight
  LayerNorm  scale, bias               <->  weight, bias
  ViT        pos_embed, mask_token     <->  pos_embed, mask_token (same layout)

``num_batches_tracked`` is neither written nor needed (PyTorch's BatchNorm fills it in when it
is missing, and it plays no part with the default momentum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitsface_jax import models
from unitsface_jax.models.layers import BatchNorm, PReLU
from unitsface_jax.models.vit import VisionTransformer

_IGNORED_SUFFIXES = ("num_batches_tracked",)

# (flax leaf, torch leaf, flax->torch layout, torch->flax layout) per module type.
_Entry = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_same = lambda a: a  # noqa: E731


def _entries(module) -> list[_Entry]:
  if isinstance(module, nnx.Conv):
    out = [("kernel", "weight", lambda a: a.transpose(3, 2, 0, 1),
            lambda a: a.transpose(2, 3, 1, 0))]
    return out + ([("bias", "bias", _same, _same)] if module.bias is not None else [])
  if isinstance(module, nnx.Linear):
    out = [("kernel", "weight", lambda a: a.T, lambda a: a.T)]
    return out + ([("bias", "bias", _same, _same)] if module.bias is not None else [])
  if isinstance(module, BatchNorm):
    return [("scale", "weight", _same, _same), ("bias", "bias", _same, _same),
            ("mean", "running_mean", _same, _same), ("var", "running_var", _same, _same)]
  if isinstance(module, PReLU):
    return [("slope", "weight", _same, _same)]
  if isinstance(module, nnx.LayerNorm):
    return [("scale", "weight", _same, _same), ("bias", "bias", _same, _same)]
  if isinstance(module, VisionTransformer):
    return [("pos_embed", "pos_embed", _same, _same), ("mask_token", "mask_token", _same, _same)]
  return []


def _mapping(model: nnx.Module) -> dict[str, tuple[nnx.Variable, Callable, Callable]]:
  """torch key -> (NNX variable, to_torch, from_torch)."""
  table = {}
  for path, module in nnx.iter_modules(model):
    prefix = ".".join(str(p) for p in path)
    for flax_name, torch_name, to_torch, from_torch in _entries(module):
      key = f"{prefix}.{torch_name}" if prefix else torch_name
      table[key] = (getattr(module, flax_name), to_torch, from_torch)
  return table


def torch_keys(model: nnx.Module) -> list[str]:
  """The PyTorch key names of the model's weights and statistics, in
  :func:`torch_state_dict`'s order; an abstract model (``models.create_abstract``) will do."""
  return list(_mapping(model))


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's weights and BN statistics under PyTorch key names and layouts (float32)."""
  # np.array copies: the results are writable, contiguous and independent of the model.
  return {key: np.array(to_torch(np.asarray(var[...], np.float32)), order="C")
          for key, (var, to_torch, _) in _mapping(model).items()}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, object], *,
                          ignore_prefixes: Iterable[str] = ()) -> nnx.Module:
  """Loads a PyTorch state dict (NumPy arrays or torch tensors) into ``model`` in place.

  Args:
    model: a backbone from ``unitsface_jax.models.create`` of the matching architecture;
      an abstract one (``nnx.eval_shape``) gets concrete weights and statistics (its RNG
      streams are not in a state dict, so they are left as they are).
    state_dict: e.g. ``torch.load('backbone.pth')`` from insightface. A ``module.`` prefix
      (DistributedDataParallel) is stripped; ``num_batches_tracked`` entries are ignored.
    ignore_prefixes: keys to skip, e.g. ``("sample_to_class_loss.", "sample_to_sample_loss.")``
      for an official UniTSFace checkpoint that holds its loss modules too.

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: naming every missing and unexpected key, or the first shape mismatch.
  """
  ignore_prefixes = tuple(ignore_prefixes)
  given = {}
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if key.rsplit(".", 1)[-1] in _IGNORED_SUFFIXES or key.startswith(ignore_prefixes):
      continue
    given[key] = value
  table = _mapping(model)
  missing = sorted(set(table) - set(given))
  unexpected = sorted(set(given) - set(table))
  if missing or unexpected:
    raise ValueError(
        f"state dict does not match {type(model).__name__}: "
        f"{len(missing)} missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
        f"{len(unexpected)} unexpected key(s) {unexpected[:8]}"
        f"{' ...' if len(unexpected) > 8 else ''}")
  converted = {}
  for key, (var, to_torch, from_torch) in table.items():
    value = _to_numpy(given[key])
    expected = to_torch(np.empty(var.shape, np.float32)).shape
    if value.shape != expected:
      raise ValueError(f"shape mismatch for {key!r}: state dict has {value.shape}, "
                       f"{type(model).__name__} expects {expected}")
    converted[key] = from_torch(value)
  for key, (var, _, _) in table.items():  # assign only once everything checked out
    var.set_value(jnp.asarray(converted[key], jnp.float32))
  left = models.unfilled(model)
  if left:  # an abstract model (models.create_abstract) with variables no torch key sets
    raise ValueError(f"{type(model).__name__} has variables no state dict key sets: {left[:8]}")
  return model
