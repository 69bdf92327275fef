"""ONNX export of the inference graph, as insightface's ``torch2onnx.py`` and MFR expect.

One input named ``data`` of shape [N, 3, 112, 112] (N dynamic), already normalised with
(x - 127.5) / 127.5 outside the graph, no flip inside it, and one output: the 512-d embedding.
The graph is traced from the project's PyTorch twin (:mod:`.torch_modules`) with the weights
of the Flax model. Needs the ``[torch]`` extra.
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath


def export_onnx(model_name: str, state_dict: dict[str, np.ndarray], out, *,
                opset: int = 17) -> None:
  """Writes the ONNX inference graph of ``model_name`` with ``state_dict`` to ``out``."""
  import torch  # pylint: disable=g-import-not-at-top
  from unitsface_jax.export import torch_modules  # pylint: disable=g-import-not-at-top

  net = torch_modules.get_model(model_name)
  net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                      strict=True)
  net.eval()
  dummy = torch.zeros(2, 3, 112, 112)
  buf = io.BytesIO()
  # The TorchScript exporter (dynamo=False) gives the plain Conv/BN/PRelu graph insightface's
  # tools expect, with the batch axis named dynamic.
  torch.onnx.export(net, (dummy,), buf, input_names=["data"], output_names=["embedding"],
                    dynamic_axes={"data": {0: "N"}, "embedding": {0: "N"}},
                    opset_version=opset, do_constant_folding=True, dynamo=False)
  epath.Path(out).write_bytes(buf.getvalue())
