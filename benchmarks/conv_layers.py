r"""Where an iresnet50 train step's convolution time goes, per layer shape, JAX vs PyTorch.

  python benchmarks/conv_layers.py [--batch=32] [--reps=3]

For every distinct convolution of iresnet50 (input size, channels, kernel, stride) times the
forward, the input gradient and the weight gradient separately, JAX (XLA:CPU, jitted, NHWC)
and PyTorch (channels_last) interleaved in one process, and multiplies by how often the shape
occurs in the network. The sum is the step's convolution time; its difference to the whole
step is BatchNorm, PReLU, the head, the optimiser and layout changes. Prints a table
(milliseconds per step, GFLOP/s) and ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from unitsface_jax import cpu_tuning  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 32, "Batch.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions (the minimum is kept).")
_CPU_TUNING = cpu_tuning.define_flag()

# (input size, in channels, out channels, kernel, stride, occurrences in iresnet50).
R50_CONVS = (
    (112, 3, 64, 3, 1, 1),     # stem
    (112, 64, 64, 3, 1, 1),    # layer1.0.conv1
    (112, 64, 64, 3, 2, 1),    # layer1.0.conv2
    (112, 64, 64, 1, 2, 1),    # layer1.0.downsample
    (56, 64, 64, 3, 1, 4),     # layer1.{1,2}
    (56, 64, 128, 3, 1, 1),    # layer2.0.conv1
    (56, 128, 128, 3, 2, 1),   # layer2.0.conv2
    (56, 64, 128, 1, 2, 1),    # layer2.0.downsample
    (28, 128, 128, 3, 1, 6),   # layer2.{1..3}
    (28, 128, 256, 3, 1, 1),   # layer3.0.conv1
    (28, 256, 256, 3, 2, 1),   # layer3.0.conv2
    (28, 128, 256, 1, 2, 1),   # layer3.0.downsample
    (14, 256, 256, 3, 1, 26),  # layer3.{1..13}
    (14, 256, 512, 3, 1, 1),   # layer4.0.conv1
    (14, 512, 512, 3, 2, 1),   # layer4.0.conv2
    (14, 256, 512, 1, 2, 1),   # layer4.0.downsample
    (7, 512, 512, 3, 1, 4),    # layer4.{1,2}
)


def _best(fn, reps):
  fn()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def jax_fns(batch, size, cin, cout, k, s, project_layer):
  """Forward, input-gradient and weight-gradient thunks of one conv under XLA.

  ``project_layer``: the convolution the backbones build (``models.layers.conv``) instead of a
  plain ``lax.conv_general_dilated``: with ``cpu_tuning`` enabled its strided cases have the
  tuning's gradients, otherwise it times like "lax".
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from unitsface_jax.models import layers
  pad = k // 2
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.1
  module = layers.conv(cin, cout, k, s, pad, kernel_init=nnx.initializers.zeros,
                       dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)

  def conv(x, w):
    if project_layer:
      return nnx.merge(graphdef, jax.tree.map(lambda _: w, state))(x)
    return jax.lax.conv_general_dilated(x, w, (s, s), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  out = jax.eval_shape(conv, x, w)
  dy = jnp.ones(out.shape, out.dtype)
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return (lambda: fwd(x, w).block_until_ready(),
          lambda: dx(x, w, dy).block_until_ready(),
          lambda: dw(x, w, dy).block_until_ready())


def torch_fns(batch, size, cin, cout, k, s):
  import torch
  pad = k // 2
  cl = torch.channels_last
  x = torch.randn(batch, cin, size, size).contiguous(memory_format=cl)
  w = (torch.randn(cout, cin, k, k) * 0.1).contiguous(memory_format=cl)
  y = torch.nn.functional.conv2d(x, w, stride=s, padding=pad)
  dy = torch.ones_like(y).contiguous(memory_format=cl)
  # The gradients as autograd computes them in a train step (oneDNN backward kernels).
  return (lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=pad),
          lambda: torch.ops.aten.convolution_backward(
              dy, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
              [True, False, False]),
          lambda: torch.ops.aten.convolution_backward(
              dy, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
              [False, True, False]))


def main(argv):
  del argv
  if _CPU_TUNING.value:
    cpu_tuning.enable()
  batch, reps = _BATCH.value, _REPS.value
  impls = ("lax", "project", "torch")
  rows, totals = [], {i: [0.0] * 3 for i in impls}
  print(f"{'size cin cout k s x n':>24} | " + " | ".join(
      f"{i + ' fwd/dx/dw ms':>20}" for i in impls) + " | GFLOP/s " + " | ".join(impls))
  for size, cin, cout, k, s, n in R50_CONVS:
    out = size // s
    flops = 2 * batch * out * out * cout * cin * k * k
    fns = {"lax": jax_fns(batch, size, cin, cout, k, s, False),
           "project": jax_fns(batch, size, cin, cout, k, s, True),
           "torch": torch_fns(batch, size, cin, cout, k, s)}
    ts = {i: [] for i in impls}
    for part in range(3):  # interleaved, so load changes hit all alike
      for i in impls:
        ts[i].append(_best(fns[i][part], reps))
    for i in impls:
      for part in range(3):
        totals[i][part] += n * ts[i][part]
    rows.append({"size": size, "cin": cin, "cout": cout, "k": k, "stride": s, "count": n,
                 **{f"{i}_ms": [round(1e3 * v, 2) for v in ts[i]] for i in impls}})
    print(f"{f'{size} {cin} {cout} {k} {s} x{n}':>24} | " + " | ".join(
        f"{'/'.join(f'{1e3 * v:.0f}' for v in ts[i]):>20}" for i in impls) + " | " + " | ".join(
            "/".join(f"{flops / v / 1e9:.0f}" for v in ts[i]) for i in impls))
  print("per step (ms, fwd/dx/dw = sum): " + "; ".join(
      f"{i} " + "/".join(f"{1e3 * v:.0f}" for v in totals[i]) + f" = {1e3 * sum(totals[i]):.0f}"
      for i in impls) + f"; load {os.getloadavg()[0]:.2f}")
  print(json.dumps({"batch": batch, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "totals_ms": {k: [round(1e3 * v) for v in vs] for k, vs in totals.items()},
                    "layers": rows}))


if __name__ == "__main__":
  app.run(main)
