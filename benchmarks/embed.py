r"""Images/s of embedding extraction with flip fusion, its MFU, and PyTorch's.

  python benchmarks/embed.py --model=iresnet50 --batch=64 --compare_torch

The JAX side is the project's evaluation path: ``unitsface_jax.evaluation.extract.embed`` on
``nnx_apply_fn(model)`` of an eval-mode backbone, i.e. uint8 crops in, f(x) and f(flip x) on
the device, L2(f(x) + f(flip x)) out on the host. The PyTorch side does the same with the
project's torch twin in eval mode under ``torch.inference_mode()``, channels_last (fp32, or bf16
autocast with ``--dtype=bfloat16``). An image counts once although the network runs on it
twice (the field's test embedding). FLOPs per batch come from the compiled forward's cost
analysis and are checked against 2 x 2 x MACs x batch; the matmul ceiling and the
alternating worker processes are as in ``benchmarks/train_step.py``, as is ``--jax`` for
variants. Ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

_ROOT = os.environ.get("UNITSFACE_BENCH_SRC") or os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import alternate  # noqa: E402
from absl import app, flags  # noqa: E402

from unitsface_jax import cpu_tuning  # noqa: E402

_MODEL = flags.DEFINE_string("model", "iresnet50", "Backbone.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch (the network sees twice as many).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_WIDTH = flags.DEFINE_integer("width", 64, "Backbone width, models.create's (64: the "
                              "published models).")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Timed rounds (median reported).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time PyTorch.")
_JAX = flags.DEFINE_multi_string(
    "jax", ["jax"], "JAX variants, NAME[:VAR=VALUE,...] (extra environment for that worker).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run as the worker 'jax' or 'torch'.")
_CPU_TUNING = cpu_tuning.define_flag()


def _images(batch: int):
  import numpy as np
  return np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)


def calibrated_model():
  """The JAX backbone with BatchNorm running statistics taken from one batch.

  Random weights with the initial running statistics (mean 0, variance 1) overflow to inf in
  eval mode; one training-mode pass with momentum 1 makes the activations finite and
  realistic. PyTorch gets the same weights (``export.torch_state_dict``), so both
  frameworks compute the same embeddings.
  """
  import jax.numpy as jnp
  from flax import nnx
  from unitsface_jax import models
  model = models.create(_MODEL.value, rngs=nnx.Rngs(0), dtype=_DTYPE.value, width=_WIDTH.value)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, models.BatchNorm):
      module.momentum = 1.0
  model.train()
  # One compiled program (nnx.jit writes the statistics back), not op by op: eagerly, each
  # of the trunk's operations would compile on its own.
  nnx.jit(lambda m, x: m(x))(model, jnp.asarray(_images(_BATCH.value), jnp.float32) / 127.5 - 1.0)
  model.eval()
  return model


def build_jax():
  """(run_once, info, matmul_rate) for the project's flip-fused extraction."""
  import jax
  from unitsface_jax import models, parallel
  from unitsface_jax.evaluation import extract

  model = calibrated_model()
  apply_fn = extract.nnx_apply_fn(model)
  images = _images(_BATCH.value)
  mesh = extract.batch_mesh()
  # FLOPs of one batch: the compiled forward on x and flip(x) that extract_raw runs.
  sharded = jax.device_put(images, parallel.batch_sharding(mesh))
  fn = jax.device_put(apply_fn, parallel.replicated(mesh))
  cost = extract._forward.lower(fn, sharded).compile().cost_analysis()  # pylint: disable=protected-access
  cost = cost[0] if isinstance(cost, list) else cost
  macs = models.macs_per_image(model)

  def run_once():
    extract.embed(apply_fn, images, batch_size=_BATCH.value, mesh=mesh, progress=False)

  run_once()
  return run_once, {
      "flops": float(cost.get("flops", 0.0)),
      "analytic_flops": 2 * 2 * macs * _BATCH.value,
      "backend": jax.default_backend(),
      "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax": jax.__version__}, lambda: alternate.xla_matmul_rate(_DTYPE.value)


def build_torch():
  """(run_once, info, matmul_rate) for the same extraction in PyTorch."""
  # JAX only calibrates the weights here: keep it off a GPU that PyTorch is timed on.
  os.environ["JAX_PLATFORMS"] = "cpu"
  import numpy as np
  import torch
  import torch.nn.functional as F
  from unitsface_jax.export import torch_modules

  bf16 = _DTYPE.value == "bfloat16"
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True  # as in benchmarks/train_step.py
  from unitsface_jax import export
  net = torch_modules.get_model(_MODEL.value, width=_WIDTH.value)
  net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in
                       export.torch_state_dict(calibrated_model()).items()})
  net = net.to(device).to(memory_format=torch.channels_last)
  net.eval()
  images = _images(_BATCH.value)

  def run_once():
    with torch.inference_mode():
      # NHWC uint8 -> NCHW view in channels_last memory, as a data loader would hand it over.
      x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
      x = (x.float() / 255.0 - 0.5) / 0.5
      both = torch.cat([x, torch.flip(x, dims=[3])]).contiguous(
          memory_format=torch.channels_last)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        out = net(both).float()
      n = images.shape[0]
      F.normalize(out[:n] + out[n:]).cpu().numpy()

  run_once()
  return run_once, {"torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": device,
                    "numpy": np.__version__}, \
      lambda: alternate.torch_matmul_rate(bf16, device)


def main(argv):
  del argv
  if _WORKER.value:
    # Each worker tunes itself (as in benchmarks/train_step.py).
    if _CPU_TUNING.value:
      cpu_tuning.enable()
    alternate.serve(build_jax if _WORKER.value == "jax" else build_torch)
    return
  result = {"model": _MODEL.value, "width": _WIDTH.value, "batch": _BATCH.value,
            "dtype": _DTYPE.value, "flip": True}
  result.update(alternate.compare(
      os.path.abspath(__file__),
      [f"--model={_MODEL.value}", f"--width={_WIDTH.value}", f"--batch={_BATCH.value}",
       f"--dtype={_DTYPE.value}", f"--cpu_tuning={_CPU_TUNING.value}"],
      _JAX.value, _COMPARE_TORCH.value, _ROUNDS.value, _BATCH.value, "batch"))
  print(json.dumps(result))

if __name__ == "__main__":
  app.run(main)
