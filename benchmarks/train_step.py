r"""Images/s of the project's real train step, its MFU, and PyTorch's on the same machine.

  python benchmarks/train_step.py --model=iresnet50 --batch=32 --dtype=float32 --compare_torch

The JAX step is ``unitsface_jax.train.make_train_step`` (backbone fwd+bwd, class-sharded head
with CosFace + USS, SGD update, PReLU clamp), on synthetic inputs, after the USS warm-up epoch
so the sample-to-sample term is active. FLOPs per step come from the compiled executable's
cost analysis; the matmul ceiling is measured in the same run (a large fp32/bf16 matmul
under XLA), and MFU = achieved FLOP/s / ceiling. With ``--compare_torch`` the same step in
PyTorch (the project's torch twin, channels_last, an equivalent CosFace head, SGD with
momentum and weight decay; fp32, and bf16 autocast when ``--dtype=bfloat16``) is timed
alternately with the JAX step, and the ratio jax/torch is reported. Ends with one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "iresnet50", "Backbone.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_CLASSES = flags.DEFINE_integer("classes", 10_572, "Head classes (CASIA-WebFace).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Devices (0: all).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Timed rounds (median reported).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time the PyTorch step.")


def matmul_ceiling(dtype: str, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of a large square matmul under XLA on the default devices (the MFU reference)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times) * jax.device_count()


def jax_step(config):
  """(run_once, flops_per_step) for the project's train step."""
  import jax
  import numpy as np
  from unitsface_jax import optim, parallel, train

  mesh = parallel.mesh_from_config(config)
  steps_per_epoch = 1000
  tx = optim.sgd(config, steps_per_epoch)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  # Start in epoch 1 so CosFace + USS are both active, as in most of a run.
  state["step"] = jax.device_put(np.int32(steps_per_epoch), state["step"].sharding)
  step_fn = train.make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (config.batch_size, 112, 112, 3)).astype(np.float32)
  labels = rng.integers(0, config.data.num_classes, config.batch_size).astype(np.int32)
  images, labels = parallel.global_batch((images, labels), mesh)
  compiled = step_fn.lower(state, images, labels).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))
  holder = {"state": state}

  def run_once():
    new_state, metrics = step_fn(holder["state"], images, labels)
    jax.block_until_ready(metrics["loss"])
    holder["state"] = new_state

  run_once()  # compile + warm up
  return run_once, flops


def torch_step(model_name: str, batch: int, classes: int, bf16: bool):
  """run_once for the same step in PyTorch: twin backbone + CosFace head + SGD."""
  import torch
  import torch.nn.functional as F
  from unitsface_jax.export import torch_modules

  torch.manual_seed(0)
  net = torch_modules.get_model(model_name).to(memory_format=torch.channels_last)
  weight = torch.nn.Parameter(torch.randn(classes, 512) * 0.01)
  opt = torch.optim.SGD(list(net.parameters()) + [weight], lr=0.1, momentum=0.9,
                        weight_decay=5e-4)
  x = torch.rand(batch, 3, 112, 112).mul(2).sub(1).contiguous(
      memory_format=torch.channels_last)
  y = torch.randint(0, classes, (batch,))

  def run_once():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      emb = net(x)
    cos = F.linear(F.normalize(emb.float()), F.normalize(weight))
    logits = 64.0 * (cos - 0.4 * F.one_hot(y, classes))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(net.parameters()) + [weight], 10.0)
    opt.step()

  run_once()
  return run_once


def main(argv):
  del argv
  import jax
  from configs import default
  config = default.get_config()
  config.model.name = _MODEL.value
  config.model.dtype = _DTYPE.value
  config.model.dropout = 0.0
  config.data.num_classes = _CLASSES.value
  config.batch_size = _BATCH.value
  config.num_devices = _DEVICES.value
  ceiling = matmul_ceiling(_DTYPE.value)
  run_jax, flops = jax_step(config)
  run_torch = None
  if _COMPARE_TORCH.value:
    run_torch = torch_step(_MODEL.value, _BATCH.value, _CLASSES.value,
                           _DTYPE.value == "bfloat16")
  jax_times, torch_times = [], []
  for _ in range(_ROUNDS.value):  # alternate, so machine noise hits both alike
    t = time.perf_counter()
    run_jax()
    jax_times.append(time.perf_counter() - t)
    if run_torch is not None:
      t = time.perf_counter()
      run_torch()
      torch_times.append(time.perf_counter() - t)
  jax_s = statistics.median(jax_times)
  result = {
      "model": _MODEL.value, "batch": _BATCH.value, "dtype": _DTYPE.value,
      "devices": jax.device_count() if not _DEVICES.value else _DEVICES.value,
      "backend": jax.default_backend(), "classes": _CLASSES.value,
      "jax_img_s": round(_BATCH.value / jax_s, 3),
      "flops_per_step": flops, "matmul_ceiling_flop_s": ceiling,
      "mfu": round(flops / jax_s / ceiling, 4),
  }
  if torch_times:
    torch_s = statistics.median(torch_times)
    result["torch_img_s"] = round(_BATCH.value / torch_s, 3)
    result["ratio"] = round(torch_s / jax_s, 3)
    result["torch_mfu_same_flops"] = round(flops / torch_s / ceiling, 4)
  print(f"{'':>14} {'img/s':>8} {'MFU':>7}")
  print(f"{'jax':>14} {result['jax_img_s']:8.2f} {result['mfu']:7.1%}")
  if torch_times:
    print(f"{'torch':>14} {result['torch_img_s']:8.2f} {result['torch_mfu_same_flops']:7.1%}")
    print(f"ratio jax/torch: {result['ratio']:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
