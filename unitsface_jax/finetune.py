"""Fine-tuning: a run's backbone starts from released or earlier weights (``config.init``).

``config.init.backbone`` names an insightface ``backbone.pth`` (a PyTorch state dict with
insightface's key names), a ``.safetensors``/``.npz`` of this package
(:mod:`unitsface_jax.export.params_io`) or another run's workdir (its latest checkpoint,
:func:`unitsface_jax.checkpoint.backbone_from_workdir`). Every format is read as a PyTorch
state dict and loaded into the backbone ``config.model`` describes, so a file for another
architecture, width or embedding size fails here, before training, naming the first keys
that do not match. The head is never read: it starts fresh for the new classes.
"""

from __future__ import annotations

import ml_collections
from etils import epath
from flax import nnx

from unitsface_jax import checkpoint, errors, models
from unitsface_jax.export import params_io, state_dict


class InitError(errors.UserError, ValueError):
  """``config.init.backbone`` cannot start this run's backbone (one line, naming the key)."""


def read_state_dict(path) -> tuple[str | None, dict]:
  """(architecture if recorded, PyTorch-layout state dict) of a weight file or a workdir."""
  if epath.Path(path).is_dir():
    name, model = checkpoint.backbone_from_workdir(path)
    return name, state_dict.torch_state_dict(model)
  return params_io.read_params(path)


def load_backbone(path, model_config: ml_collections.ConfigDict) -> nnx.Module:
  """The backbone ``model_config`` describes, with the weights and BatchNorm statistics of
  ``path``. Raises InitError naming ``path`` and the keys or the architecture that differ."""
  where = f"config.init.backbone = {str(path)!r}"
  try:
    stored, weights = read_state_dict(path)
  except (OSError, ValueError) as e:
    raise InitError(f"{where}: {e}") from e
  model = models.abstract_from_config(model_config)
  try:
    state_dict.load_torch_state_dict(model, weights,
                                     ignore_prefixes=params_io.OFFICIAL_HEAD_PREFIXES)
  except ValueError as e:
    raise InitError(f"{where}: {e} (config.model.name = {model_config.name!r}, width "
                    f"{model_config.width}, {model_config.num_features} features)") from e
  if stored is not None and stored != model_config.name:
    raise InitError(f"{where} holds a {stored!r} backbone; config.model.name = "
                    f"{model_config.name!r}")
  return model


def backbone_arrays(path, model_config: ml_collections.ConfigDict
                    ) -> tuple[nnx.State, nnx.State]:
  """(parameters, model state) of :func:`load_backbone`, split as the train state holds
  them (``nnx.Param`` and ``models.MODEL_STATE``)."""
  model = load_backbone(path, model_config)
  _, params, model_state, _ = nnx.split(model, nnx.Param, models.MODEL_STATE, ...)
  return params, model_state
