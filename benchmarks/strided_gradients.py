r"""The strided-convolution gradients of ``cpu_tuning`` on and off, in one process.

  python benchmarks/strided_gradients.py [--model=iresnet50] [--batch=32] --rounds=10

Compiles the project's real train step (``train.make_train_step``: backbone fwd+bwd, head
with CosFace + USS, SGD) twice in this process, once with the rewrite and once with XLA's own
gradients (``cpu_tuning.strided_conv_gradients(False)`` while tracing; the CPU XLA flags are
those of ``cpu_tuning.enable()`` for both, or none with ``--nocpu_tuning``), and alternates
their steps. One process means one allocator, one thread pool and one set of cores for both,
so the paired per-round difference is a steadier measure of a few percent than two worker
processes compared by ``train_step.py`` on a shared VM. Ends with one JSON line (medians, the
paired difference, in how many rounds the rewrite was faster). The step and its flags are
``train_step.py``'s (``compile_step``, ``config_from_flags``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# train_step defines the flags used here: --model, --batch, --width, --classes, --rounds,
# --cpu_tuning (and others this script ignores).
import train_step  # noqa: E402
from absl import app, flags  # noqa: E402

from unitsface_jax import cpu_tuning  # noqa: E402

_ROUNDS = flags.FLAGS["rounds"]


def _build(rewrite: bool):
  """(run one step, FLOPs of the step) with the rewrite on or off."""
  import jax  # pylint: disable=g-import-not-at-top
  from unitsface_jax import train  # pylint: disable=g-import-not-at-top
  with cpu_tuning.strided_conv_gradients(rewrite):
    assert cpu_tuning.strided_conv_gradients_active() == rewrite
    compiled, state, images, labels, cost = train_step.compile_step(
        train_step.config_from_flags())
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], train.Batch(images, labels))
    jax.block_until_ready(metrics["loss"])

  run()  # the first execution allocates
  return run, float(cost.get("flops", 0.0))


def main(argv):
  del argv
  if flags.FLAGS.cpu_tuning:
    cpu_tuning.enable()
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    raise SystemExit("the rewrite is applied on the CPU backend only")
  variants = {"rewrite": _build(rewrite=True), "xla": _build(rewrite=False)}
  times = {name: [] for name in variants}
  load_before = os.getloadavg()
  for _ in range(_ROUNDS.value):
    for name, (run, _) in variants.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  ours, theirs = times["rewrite"], times["xla"]
  paired = [a - b for a, b in zip(ours, theirs)]
  result = {
      "model": flags.FLAGS.model, "width": flags.FLAGS.width, "batch": flags.FLAGS.batch,
      "rounds": _ROUNDS.value,
      "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
      "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
      "flops": {k: v[1] for k, v in variants.items()},
      "paired_difference_median_s": round(statistics.median(paired), 3),
      "speedup_median": round(statistics.median(theirs) / statistics.median(ours), 3),
      "rewrite_faster_rounds": sum(d < 0 for d in paired),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average": {"before": load_before, "after": os.getloadavg()},
  }
  for name, values in times.items():
    print(f"{name:>8}: median {statistics.median(values):.3f} s/step "
          f"({flags.FLAGS.batch / statistics.median(values):.3f} img/s)")
  print(f"rewrite faster in {result['rewrite_faster_rounds']} of {_ROUNDS.value} rounds; "
        f"speedup {result['speedup_median']}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
