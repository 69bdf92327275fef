"""Weight files: read and write a backbone's weights as .npz, .safetensors or PyTorch .pth.

Every format holds the PyTorch-layout state dict of :mod:`unitsface_jax.export.state_dict`, so
a file written here loads into insightface's models and a file from insightface loads here.
The architecture is stored with the weights (``__model__`` in .npz, metadata in .safetensors)
and otherwise inferred from the keys (``fc5`` means LResNet-EIR, the block counts per stage
give the depth); the trunk's width is always read from the stem's ``conv1.weight`` and the
embedding size from the rows of ``fc.weight`` / ``fc5.weight``.
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

_DEPTHS = {
    ("iresnet", (2, 2, 2, 2)): "iresnet18",
    ("iresnet", (3, 4, 6, 3)): "iresnet34",
    ("iresnet", (3, 4, 14, 3)): "iresnet50",
    ("iresnet", (3, 13, 30, 3)): "iresnet100",
    ("iresnet", (6, 26, 60, 6)): "iresnet200",
    ("lresnet", (3, 4, 14, 3)): "lresnet50_eir",
    ("lresnet", (3, 13, 30, 3)): "lresnet100_eir",
    ("lresnet", (3, 33, 60, 3)): "lresnet200_eir",
}
# The official UniTSFace checkpoints hold the loss modules beside the backbone.
OFFICIAL_HEAD_PREFIXES = ("sample_to_class_loss.", "sample_to_sample_loss.")


def infer_model_name(state_dict) -> str:
  """The registered model whose PyTorch key layout ``state_dict`` has."""
  keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
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


def infer_width(state_dict) -> int:
  """The trunk width (first-stage channels) of a state dict: ``conv1.weight``'s outputs."""
  for key in ("conv1.weight", "module.conv1.weight"):
    if key in state_dict:
      return int(np.shape(state_dict[key])[0])
  raise ValueError("cannot infer the width: the state dict has no conv1.weight")


def infer_num_features(state_dict) -> int:
  """The embedding size of a state dict: the outputs of ``fc.weight`` (IResNet) or
  ``fc5.weight`` (LResNet-EIR)."""
  for key in ("fc.weight", "fc5.weight", "module.fc.weight", "module.fc5.weight"):
    if key in state_dict:
      return int(np.shape(state_dict[key])[0])
  raise ValueError("cannot infer the embedding size: the state dict has no fc.weight or "
                   "fc5.weight")


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
    create_kwargs.setdefault("width", infer_width(state))
    create_kwargs.setdefault("num_features", infer_num_features(state))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  model = models.create(name, rngs=rngs or nnx.Rngs(0), **create_kwargs)
  try:
    load_torch_state_dict(model, state, ignore_prefixes=OFFICIAL_HEAD_PREFIXES)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return name, model
