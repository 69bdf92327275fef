"""Weight files: read and write a backbone's weights as .npz, .safetensors or PyTorch .pth.

Every format holds the PyTorch-layout state dict of :mod:`unitsface_jax.export.state_dict`, so
a file written here loads into insightface's models and a file from insightface loads here.
The architecture is stored with the weights (``__model__`` in .npz, metadata in .safetensors)
and otherwise inferred from the keys (``fc5`` means LResNet-EIR, ``conv_sep`` MobileFaceNet,
``feature.0`` a ViT; the block counts give the depth, a ViT's embedding dimension its size);
the width is read from the stem's ``conv1.weight`` (MobileFaceNet: ``conv_sep``'s 8 x width
channels; ViT: the embedding dimension against the named model's) and the embedding size from
the rows of the last Linear or conv.
"""

from __future__ import annotations

import collections
import io
import re

import numpy as np
from etils import epath
from flax import nnx

from unitsface_jax import models
from unitsface_jax.export.state_dict import load_torch_state_dict, torch_state_dict

# (family, blocks per stage) -> the registered name.
_DEPTHS = {**{("iresnet", layers): name for name, layers in models.IRESNET_ARCHS.items()},
           **{("lresnet", layers): name for name, layers in models.LRESNET_ARCHS.items()}}
# (embedding dimension, depth) of a published ViT -> the first registered name with them.
_VITS = {}
for _name, _arch in models.VIT_ARCHS.items():
  _VITS.setdefault(_arch[:2], _name)
# The official UniTSFace checkpoints hold the loss modules beside the backbone.
OFFICIAL_HEAD_PREFIXES = ("sample_to_class_loss.", "sample_to_sample_loss.")


def infer_model_name(state_dict) -> str:
  """The registered model whose PyTorch key layout ``state_dict`` has."""
  state_dict = _strip_module(state_dict)
  keys = list(state_dict)
  if "feature.0.weight" in keys:
    depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    dim = int(np.shape(state_dict.get("pos_embed", np.zeros((0, 0, 0))))[-1])
    if (dim, depth) not in _VITS:
      raise ValueError(f"cannot infer the architecture from the state dict (a ViT of embedding "
                       f"dimension {dim} and depth {depth}, not a published one); pass the "
                       f"model name explicitly")
    return _VITS[(dim, depth)]
  if "conv_sep.layers.0.weight" in keys:
    blocks = len({k.split(".")[3] for k in keys if k.startswith("layers.3.layers.")})
    by_blocks = {arch[0][1]: name for name, arch in models.MBF_ARCHS.items()}
    if blocks not in by_blocks:
      raise ValueError(f"cannot infer the architecture from the state dict (a MobileFaceNet "
                       f"with {blocks} blocks in its second stage); pass the model name "
                       f"explicitly")
    return by_blocks[blocks]
  family = "lresnet" if "fc5.weight" in keys else "iresnet" if "fc.weight" in keys else None
  blocks = collections.defaultdict(set)
  for key in keys:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  depth = tuple(len(blocks[i]) for i in range(1, 5))
  name = _DEPTHS.get((family, depth))
  if name is None:
    raise ValueError(f"cannot infer the architecture from the state dict (head "
                     f"{family or 'unknown: neither fc.weight nor fc5.weight'}, blocks per "
                     f"stage {depth}); pass the model name explicitly")
  return name


def _strip_module(state_dict):
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def infer_width(state_dict, model_name: str | None = None) -> int:
  """The width (``models.create``'s ``width``) of a state dict: ``conv1.weight``'s outputs
  (IR-ResNets), an eighth of ``conv_sep``'s (MobileFaceNet), or 64 x the embedding dimension
  over the published one of ``model_name`` (ViT; inferred when None)."""
  state_dict = _strip_module(state_dict)
  if "conv1.weight" in state_dict:
    return int(np.shape(state_dict["conv1.weight"])[0])
  if "conv_sep.layers.0.weight" in state_dict:
    return int(np.shape(state_dict["conv_sep.layers.0.weight"])[0]) // 8
  if "pos_embed" in state_dict:
    name = model_name or infer_model_name(state_dict)
    if name not in models.VIT_ARCHS:
      raise ValueError(f"the state dict holds a ViT, not a {name}")
    return int(np.shape(state_dict["pos_embed"])[-1]) * 64 // models.VIT_ARCHS[name][0]
  raise ValueError("cannot infer the width: the state dict has no conv1.weight, "
                   "conv_sep.layers.0.weight or pos_embed")


# The last Linear or conv of each family, whose rows are the embedding.
_EMBEDDING_LAYERS = ("fc.weight", "fc5.weight", "features.layers.2.weight", "feature.2.weight")


def infer_num_features(state_dict) -> int:
  """The embedding size of a state dict: the outputs of its last Linear or conv (``fc``
  IResNet, ``fc5`` LResNet-EIR, ``features.layers.2`` MobileFaceNet, ``feature.2`` ViT)."""
  state_dict = _strip_module(state_dict)
  for key in _EMBEDDING_LAYERS:
    if key in state_dict:
      return int(np.shape(state_dict[key])[0])
  raise ValueError(f"cannot infer the embedding size: the state dict has none of "
                   f"{', '.join(_EMBEDDING_LAYERS)}")


def save_params(path, model: nnx.Module, model_name: str) -> None:
  """Writes the model's weights to ``path`` (.npz, .safetensors, .pth or .pt)."""
  path = epath.Path(path)
  state = torch_state_dict(model)
  suffix = path.suffix.lower()
  if suffix == ".npz":
    buf = io.BytesIO()
    np.savez(buf, __model__=np.array(model_name), **state)
    path.write_bytes(buf.getvalue())
  elif suffix == ".safetensors":
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    path.write_bytes(save(state, metadata={"model": model_name}))
  elif suffix in (".pth", ".pt"):
    import torch  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buf)
    path.write_bytes(buf.getvalue())
  else:
    raise ValueError(f"{path}: unknown weight format {suffix!r} (use .npz, .safetensors, .pth)")


def read_params(path) -> tuple[str | None, dict[str, np.ndarray]]:
  """Reads a weight file; returns (model name if stored, PyTorch-layout state dict)."""
  path = epath.Path(path)
  suffix = path.suffix.lower()
  data = path.read_bytes()
  try:
    if suffix == ".npz":
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        state = {k: z[k] for k in z.files if k != "__model__"}
        name = str(z["__model__"]) if "__model__" in z.files else None
      return name, state
    if suffix == ".safetensors":
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
      state = load(data)
      with safe_open(str(path), framework="numpy") as f:
        name = (f.metadata() or {}).get("model")
      return name, state
    if suffix in (".pth", ".pt"):
      import torch  # pylint: disable=g-import-not-at-top
      state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
      if not isinstance(state, dict):
        raise ValueError("expected a state dict (a mapping of tensors)")
      return None, {k: v.detach().float().numpy() for k, v in state.items()
                    if hasattr(v, "detach")}
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  raise ValueError(f"{path}: unknown weight format {suffix!r} (use .npz, .safetensors, .pth)")


def load_params(path, model_name: str | None = None, *, rngs: nnx.Rngs | None = None,
                **create_kwargs) -> tuple[str, nnx.Module]:
  """Builds the backbone stored in ``path`` and loads its weights; returns (name, model)."""
  stored, state = read_params(path)
  name = model_name or stored or infer_model_name(state)
  try:
    create_kwargs.setdefault("width", infer_width(state, name))
    create_kwargs.setdefault("num_features", infer_num_features(state))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  # Without rngs the weights need no random initialisation first (models.create_abstract).
  model = (models.create_abstract(name, **create_kwargs) if rngs is None else
           models.create(name, rngs=rngs, **create_kwargs))
  try:
    load_torch_state_dict(model, state, ignore_prefixes=OFFICIAL_HEAD_PREFIXES)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return name, model
