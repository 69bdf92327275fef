"""Weights across frameworks: PyTorch state dicts (insightface/official key names), weight
files (.npz, .safetensors, .pth) and ONNX. The PyTorch-side modules need the ``[torch]`` extra
and are imported lazily."""

from unitsface_jax.export.params_io import (OFFICIAL_HEAD_PREFIXES, infer_model_name, infer_width,
                                            load_params, read_params, save_params)
from unitsface_jax.export.state_dict import load_torch_state_dict, torch_keys, torch_state_dict

__all__ = ["OFFICIAL_HEAD_PREFIXES", "infer_model_name", "infer_width", "load_params",
           "load_torch_state_dict", "read_params", "save_params", "torch_keys",
           "torch_state_dict"]
