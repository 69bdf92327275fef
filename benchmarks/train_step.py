r"""Images/s of the project's real train step, its MFU, and PyTorch's on the same machine.

  python benchmarks/train_step.py --model=iresnet50 --batch=32 --dtype=float32 --compare_torch

The JAX step is ``unitsface_jax.train.make_train_step`` (backbone fwd+bwd, class-sharded head
with CosFace + USS, SGD update, PReLU clamp), on synthetic inputs, after the USS warm-up epoch
so the sample-to-sample term is active; it runs under ``jax.transfer_guard("disallow")``, so a
host round trip inside the step fails the benchmark. FLOPs per step come from the compiled
executable's cost analysis and are checked against 3 x 2 x forward MACs x batch (the
backward pass costs twice the forward). The matmul ceiling is measured in the same run (a
large matmul in XLA and, with ``--compare_torch``, in PyTorch; the faster counts) and MFU =
achieved FLOP/s / ceiling. With ``--compare_torch`` the same step in PyTorch (the project's
torch twin, channels_last, an equivalent CosFace head, SGD with momentum, weight decay and
the same gradient clip; fp32, or bf16 autocast when ``--dtype=bfloat16``) is timed, and the
ratio jax/torch is reported (> 1: JAX faster).

Every implementation runs in its own worker process and their steps alternate
(``benchmarks/alternate.py``). ``--jax`` adds JAX variants that differ in environment, e.g.

  --jax=flags_off:UNITSFACE_NO_XLA_FLAGS=1 --jax=tuned

and ``UNITSFACE_BENCH_SRC=/path/to/other/checkout`` in a variant's environment runs that
checkout's package (before/after pairs of a code change in one run). Each JAX worker calls
``cpu_tuning.enable()`` first unless ``--nocpu_tuning`` (or the variant sets
``UNITSFACE_NO_XLA_FLAGS=1``). Ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

# The package from the checkout named by UNITSFACE_BENCH_SRC when a worker compares another
# version of the code.
_ROOT = os.environ.get("UNITSFACE_BENCH_SRC") or os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import alternate  # noqa: E402
from absl import app, flags  # noqa: E402

from unitsface_jax import cpu_tuning  # noqa: E402

_MODEL = flags.DEFINE_string("model", "iresnet50", "Backbone.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_CLASSES = flags.DEFINE_integer("classes", 10_572, "Head classes (CASIA-WebFace).")
_WIDTH = flags.DEFINE_integer("width", 64, "Backbone width, models.create's (64: the "
                              "published models).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Devices (0: all).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Timed rounds (median reported).")
_STEPS = flags.DEFINE_integer(
    "steps", 1, "Steps per timed round, waited for once at the end (on a GPU several, so "
    "that the host can queue the next step while the device runs one, as in training).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time the PyTorch step.")
_JAX = flags.DEFINE_multi_string(
    "jax", ["jax"], "JAX variants, NAME[:VAR=VALUE,...] (extra environment for that worker).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run as the worker 'jax' or 'torch'.")
_CPU_TUNING = cpu_tuning.define_flag()


def config_from_flags():
  """The default training config with this script's model, dtype, width, classes, batch."""
  from configs import default
  config = default.get_config()
  config.model.name = _MODEL.value
  config.model.dtype = _DTYPE.value
  config.model.dropout = 0.0
  config.model.width = _WIDTH.value
  config.data.num_classes = _CLASSES.value
  config.batch_size = _BATCH.value
  config.num_devices = _DEVICES.value
  return config


def compile_step(config):
  """The project's train step for ``config``, AOT-compiled on synthetic uint8 inputs.

  Returns ``(compiled, state, images, labels, cost)``: the state starts in epoch 1 (step
  1000 of 1000 per epoch) so CosFace + USS are both active, as in most of a run; ``cost`` is
  the executable's cost analysis. Traced here, so settings that steer tracing (e.g.
  ``cpu_tuning.strided_conv_gradients``) apply as set during this call.
  """
  import jax
  import numpy as np
  from unitsface_jax import optim, parallel, train

  mesh = parallel.mesh_from_config(config)
  steps_per_epoch = 1000
  tx = optim.sgd(config, steps_per_epoch)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  # Start in epoch 1 so CosFace + USS are both active, as in most of a run.
  state = state._replace(step=jax.device_put(np.int32(steps_per_epoch), state.step.sharding))
  step_fn = train.make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch)
  rng = np.random.default_rng(0)
  # uint8, as the input pipeline ships it (the step normalises on the device).
  images = rng.integers(0, 256, (config.batch_size, 112, 112, 3), dtype=np.uint8)
  labels = rng.integers(0, config.data.num_classes, config.batch_size).astype(np.int32)
  images, labels = parallel.global_batch((images, labels), mesh)
  compiled = step_fn.lower(state, train.Batch(images, labels)).compile()
  cost = compiled.cost_analysis()
  return compiled, state, images, labels, cost[0] if isinstance(cost, list) else cost


def build_jax():
  """(run_once, info, matmul_rate) for the project's train step."""
  import jax
  from unitsface_jax import models, train
  from flax import nnx

  config = config_from_flags()
  compiled, state, images, labels, cost = compile_step(config)
  macs = models.macs_per_image(nnx.eval_shape(lambda: models.from_config(
      config.model, jax.random.key(0))))
  holder = {"state": state}

  def run_once():
    # No host transfer may happen inside a step: inputs and state are already on device.
    with jax.transfer_guard("disallow"):
      for _ in range(_STEPS.value):
        # The AOT-compiled step (calling step_fn would compile it a second time).
        holder["state"], metrics = compiled(holder["state"], train.Batch(images, labels))
      jax.block_until_ready(metrics["loss"])

  run_once()  # warm up (first execution allocates)
  return run_once, {
      # Per timed round (``--steps`` steps).
      "flops": float(cost.get("flops", 0.0)) * _STEPS.value,
      "analytic_flops": 3 * 2 * macs * config.batch_size * _STEPS.value,
      "forward_gmacs_per_image": macs / 1e9,
      "backend": jax.default_backend(),
      "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax": jax.__version__}, lambda: alternate.xla_matmul_rate(_DTYPE.value)


def build_torch():
  """(run_once, info, matmul_rate) for the same step in PyTorch: twin backbone + CosFace head + SGD."""
  import torch
  import torch.nn.functional as F
  from unitsface_jax.export import torch_modules

  bf16 = _DTYPE.value == "bfloat16"
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # cuDNN picks the fastest convolution algorithms for these shapes, as PyTorch users set
  # for fixed-size inputs (the stronger baseline).
  torch.backends.cudnn.benchmark = True
  batch, classes = _BATCH.value, _CLASSES.value
  torch.manual_seed(0)
  net = torch_modules.get_model(_MODEL.value, dropout=0.0, width=_WIDTH.value).to(device).to(
      memory_format=torch.channels_last)
  net.train()
  weight = torch.nn.Parameter(torch.randn(classes, 512, device=device) * 0.01)
  params = list(net.parameters()) + [weight]
  opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
  images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, device=device)
  images = images.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, classes, (batch,), device=device)

  def one_step():
    opt.zero_grad(set_to_none=True)
    x = images.float() * (2.0 / 255.0) - 1.0
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      emb = net(x)
    cos = F.linear(F.normalize(emb.float()), F.normalize(weight))
    logits = 64.0 * (cos - 0.4 * F.one_hot(y, classes))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    opt.step()
    return loss

  def run_once():
    for _ in range(_STEPS.value):
      loss = one_step()
    loss.item()  # waits for the device (GPU), as block_until_ready does for JAX

  run_once()
  return run_once, {"torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": device}, \
      lambda: alternate.torch_matmul_rate(bf16, device)


def main(argv):
  del argv
  if _WORKER.value:
    # Each worker tunes itself, so a variant's environment (e.g. UNITSFACE_NO_XLA_FLAGS=1)
    # decides for it; this process runs no JAX and hands the workers its environment as is.
    if _CPU_TUNING.value:
      cpu_tuning.enable()
    alternate.serve(build_jax if _WORKER.value == "jax" else build_torch)
    return
  result = {"model": _MODEL.value, "batch": _BATCH.value, "dtype": _DTYPE.value,
            "classes": _CLASSES.value, "steps_per_round": _STEPS.value}
  result.update(alternate.compare(
      os.path.abspath(__file__),
      [f"--model={_MODEL.value}", f"--batch={_BATCH.value}", f"--dtype={_DTYPE.value}",
       f"--classes={_CLASSES.value}", f"--width={_WIDTH.value}", f"--devices={_DEVICES.value}",
       f"--steps={_STEPS.value}", f"--cpu_tuning={_CPU_TUNING.value}"],
      _JAX.value, _COMPARE_TORCH.value, _ROUNDS.value, _BATCH.value * _STEPS.value,
      "step" if _STEPS.value == 1 else f"{_STEPS.value}_steps"))
  print(json.dumps(result))

if __name__ == "__main__":
  app.run(main)
