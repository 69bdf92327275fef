"""``python -m unitsface_jax.export --params=FILE --format=torch|safetensors|onnx|npz --out=FILE``.

Reads a weight file (.npz, .safetensors or a PyTorch .pth such as insightface's
``backbone.pth``) or the latest checkpoint of a training run (``--workdir``), infers the
architecture unless ``--model`` names it, and writes it in the requested format. On the CPU
JAX is tuned (``unitsface_jax.cpu_tuning``) unless ``--nocpu_tuning`` or
``UNITSFACE_NO_XLA_FLAGS=1``.
"""

from __future__ import annotations

from absl import flags

from unitsface_jax import checkpoint, cli, storage
from unitsface_jax.export import load_params, save_params, torch_state_dict

_PARAMS = flags.DEFINE_string("params", None, "Weight file to read (.npz/.safetensors/.pth).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run whose latest checkpoint to read.")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step, not the latest.")
_MODEL = flags.DEFINE_string("model", None, "Architecture; inferred from the keys if unset.")
_FORMAT = flags.DEFINE_enum("format", None, ["torch", "safetensors", "onnx", "npz"],
                            "Output format.")
_OUT = flags.DEFINE_string("out", None, "Output file.")
_OPSET = flags.DEFINE_integer("opset", 18, "ONNX opset.")
cli.define_flags()
flags.mark_flags_as_required(["format", "out"])
flags.mark_flags_as_mutual_exclusive(["params", "workdir"], required=True)

_SUFFIX = {"torch": ".pth", "safetensors": ".safetensors", "npz": ".npz"}


class UsageError(ValueError):
  """Flags that do not go together."""


# A weight file or checkpoint that cannot be read or does not fit, a missing file or extra.
@cli.command(usage_errors=(ValueError, FileNotFoundError))
def main(argv) -> int:
  del argv
  storage.require_gcs_all({"--params": _PARAMS.value, "--workdir": _WORKDIR.value,
                           "--out": _OUT.value})
  if _WORKDIR.value:
    name, model = checkpoint.backbone_from_workdir(_WORKDIR.value, _STEP.value)
  else:
    name, model = load_params(_PARAMS.value, _MODEL.value)
  out = _OUT.value
  if _FORMAT.value == "onnx":
    from unitsface_jax.export.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top
    export_onnx(name, torch_state_dict(model), out, opset=_OPSET.value)
  else:
    suffix = _SUFFIX[_FORMAT.value]
    if not out.endswith(suffix):
      raise UsageError(f"--format={_FORMAT.value} writes a {suffix} file; got --out={out}")
    save_params(out, model, name)
  print(f"wrote {name} ({_FORMAT.value}) to {out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
