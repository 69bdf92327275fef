"""ONNX export of the inference graph, as insightface's ``torch2onnx.py`` and MFR expect.

One input named ``data`` of shape [N, 3, 112, 112] (N dynamic), already normalised with
(x - 127.5) / 127.5 outside the graph, no flip inside it, and one output: the embedding
(512-d in the published models). The graph is traced from the project's PyTorch twin
(:mod:`.torch_modules`) with the weights of the Flax model. Needs the ``[torch]`` extra.
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath


def export_onnx(model_name: str, state_dict: dict[str, np.ndarray], out, *,
                opset: int = 18) -> None:
  """Writes the ONNX inference graph of ``model_name`` with ``state_dict`` to ``out``."""
  import torch  # pylint: disable=g-import-not-at-top
  from unitsface_jax.export import params_io, torch_modules  # pylint: disable=g-import-not-at-top

  net = torch_modules.get_model(model_name, width=params_io.infer_width(state_dict, model_name),
                                num_features=params_io.infer_num_features(state_dict))
  net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()},
                      strict=True)
  net.eval()
  dummy = torch.zeros(2, 3, 112, 112)
  # The torch.export-based exporter gives a plain Conv/BatchNormalization/PRelu/Gemm graph
  # with the batch axis symbolic ("N"), which insightface's tools and MFR accept.
  program = torch.onnx.export(
      net, (dummy,), input_names=["data"], output_names=["embedding"],
      dynamic_shapes=({0: torch.export.Dim("N")},), opset_version=opset, dynamo=True,
      verbose=False)
  buf = io.BytesIO()
  program.save(buf)
  epath.Path(out).write_bytes(buf.getvalue())
