"""``python -m unitsface_jax.export --params=FILE --format=torch|safetensors|onnx|npz --out=FILE``.

Reads a weight file (.npz, .safetensors or a PyTorch .pth such as insightface's
``backbone.pth``) or the latest checkpoint of a training run (``--workdir``), infers the
architecture unless ``--model`` names it, and writes it in the requested format. On the CPU
JAX is tuned (``unitsface_jax.cpu_tuning``) unless ``--nocpu_tuning`` or
``UNITSFACE_NO_XLA_FLAGS=1``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from unitsface_jax import cpu_tuning, storage
from unitsface_jax.export import load_params, save_params, torch_state_dict

_PARAMS = flags.DEFINE_string("params", None, "Weight file to read (.npz/.safetensors/.pth).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run whose latest checkpoint to read.")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step, not the latest.")
_MODEL = flags.DEFINE_string("model", None, "Architecture; inferred from the keys if unset.")
_FORMAT = flags.DEFINE_enum("format", None, ["torch", "safetensors", "onnx", "npz"],
                            "Output format.")
_OUT = flags.DEFINE_string("out", None, "Output file.")
_OPSET = flags.DEFINE_integer("opset", 18, "ONNX opset.")
_CPU_TUNING = cpu_tuning.define_flag()
flags.mark_flags_as_required(["format", "out"])
flags.mark_flags_as_mutual_exclusive(["params", "workdir"], required=True)

_SUFFIX = {"torch": ".pth", "safetensors": ".safetensors", "npz": ".npz"}


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # First, before JAX starts its backends (XLA reads XLA_FLAGS then).
  cpu_tuning.skip_absent_tpu()  # before JAX starts: no TPU probe without a TPU
  if _CPU_TUNING.value:
    cpu_tuning.enable()
  from unitsface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_abandoned_reads()  # an unreadable checkpoint is reported in one line
  try:
    storage.require_gcs_all({"--params": _PARAMS.value, "--workdir": _WORKDIR.value,
                             "--out": _OUT.value})
    if _WORKDIR.value:
      from unitsface_jax import checkpoint  # pylint: disable=g-import-not-at-top
      name, model = checkpoint.backbone_from_workdir(_WORKDIR.value, _STEP.value)
    else:
      name, model = load_params(_PARAMS.value, _MODEL.value)
  except (ValueError, FileNotFoundError, storage.MissingExtraError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = _OUT.value
  if _FORMAT.value == "onnx":
    from unitsface_jax.export.onnx_export import export_onnx  # pylint: disable=g-import-not-at-top
    export_onnx(name, torch_state_dict(model), out, opset=_OPSET.value)
  else:
    suffix = _SUFFIX[_FORMAT.value]
    if not out.endswith(suffix):
      print(f"error: --format={_FORMAT.value} writes a {suffix} file; got --out={out}",
            file=sys.stderr)
      return 2
    save_params(out, model, name)
  print(f"wrote {name} ({_FORMAT.value}) to {out}")
  return 0


if __name__ == "__main__":
  app.run(main)
