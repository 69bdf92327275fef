"""Benchmark of the class-sharded head at Glint360K or WebFace42M scale on simulated CPU
devices.

Measures, for ``--dataset=glint360k`` (C = 360,232 classes, global batch 1024, PartialFC
r = 0.1; issue 4) or ``--dataset=wf42m`` (C = 2,059,906, global batch 4096 as
``configs/wf42m_r100.py``, r = 0.3; issue 16), D = 512:
  * per-device memory of the compiled head step (loss + gradients + new state) from XLA's
    memory analysis, on 8 devices vs. the same head on 1 device (goal ≤ 1.15 × 1/8);
  * the largest array shapes in the compiled per-device program, and whether any array has
    a [global batch, C] block (it must not on 8 devices);
  * wall time of the compiled step on the 8 simulated devices (glint360k only: WebFace42M's
    step needs more host memory than a workstation has; its numbers come from compiling);
  * with ``--losses``, instead: every sample-to-class loss's per-device memory (r = 1 and
    r = 0.1) and step time (r = 0.1) on 8 devices beside CosFace's, as ratios, at Glint360K
    scale (issue 15).

Usage (from the repository root):
  python benchmarks/head.py [--dataset glint360k|wf42m] [--steps 3] [--skip_full_step_time]
  python benchmarks/head.py --losses [--steps 3]   (--steps 0: memory only, no timing)
Writes a Markdown section to stdout; paste it into BENCHMARKS.md.
"""

import os

# The simulated device count must be fixed before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from unitsface_jax import head  # noqa: E402
from unitsface_jax import parallel  # noqa: E402

# dataset: (classes, global batch, PartialFC sample rate)
DATASETS = {"glint360k": (360_232, 1024, 0.1), "wf42m": (2_059_906, 4096, 0.3)}
NUM_CLASSES, BATCH = DATASETS["glint360k"][:2]  # set by main() from --dataset
DIM = 512
GIB = 2.0**30


def step_fn(config, mesh):
  """The head's training-step core: loss, gradients (embeddings, W, b), new state.

  The state is donated, as a training step donates it, so the new memory bank reuses the
  old one's buffer.
  """

  def step(state, embeddings, labels, key):
    def objective(params, embeddings):
      terms, new_state = head.head_loss(head.HeadState(params, state.buffers), embeddings,
                                        labels, config=config, mesh=mesh, key=key)
      return jnp.mean(terms["s2c"]) + jnp.mean(terms["s2s"]), new_state

    (loss, new_state), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.params, embeddings)
    return loss, grads, new_state

  return jax.jit(step, donate_argnums=(0,))


def abstract_args(config, mesh):
  shardings = head.head_shardings(mesh, config)
  state = jax.eval_shape(lambda k: head.init_head_state(k, config, mesh), jax.random.key(0))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state, shardings)
  batch = parallel.batch_sharding(mesh)
  emb = jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32, sharding=batch)
  labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch)
  return state, emb, labels, jax.random.key(0)


def compile_step(config, mesh):
  return step_fn(config, mesh).lower(*abstract_args(config, mesh)).compile()


def per_device_bytes(compiled):
  """Peak-relevant bytes per device: arguments + outputs + temporaries − donated aliases."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total, m


def largest_shapes(compiled, top=6):
  """The largest distinct array shapes in the compiled (per-device) HLO, with counts."""
  counts = collections.Counter(re.findall(r"\b(f32|bf16|s32|pred)\[([0-9,]+)\]",
                                          compiled.as_text()))
  sizes = {k: eval("*".join(k[1].split(",")) or "1") for k in counts}  # noqa: S307
  ranked = sorted(counts, key=lambda k: -sizes[k])[:top]
  return [f"{t}[{s}]" for t, s in ranked]


def full_width_arrays(compiled, num_classes, batch):
  """Array shapes in the compiled per-device program with a [batch, C] block (C the real or
  the padded class count): the logits of the whole head on one device."""
  shapes = set(re.findall(r"\b(?:f32|bf16|s32|pred)\[([0-9,]+)\]", compiled.as_text()))
  wide = []
  for shape in shapes:
    dims = [int(d) for d in shape.split(",") if d]
    if batch in dims and any(d >= num_classes for d in dims):
      wide.append(f"[{shape}]")
  return sorted(wide)


def time_step(config, mesh, steps):
  step = step_fn(config, mesh)
  state = head.init_head_state(jax.random.key(0), config, mesh)
  keys = jax.random.split(jax.random.key(1), 2)
  emb = jax.device_put(jax.random.normal(keys[0], (BATCH, DIM)), parallel.batch_sharding(mesh))
  labels = jax.device_put(jax.random.randint(keys[1], (BATCH,), 0, NUM_CLASSES),
                          parallel.batch_sharding(mesh))
  loss, grads, state = step(state, emb, labels, jax.random.key(2))  # compile + first step
  jax.block_until_ready((loss, grads, state))
  times = []
  for i in range(steps):
    start = time.perf_counter()
    loss, grads, state = step(state, emb, labels, jax.random.key(3 + i))
    jax.block_until_ready((loss, grads, state))
    times.append(time.perf_counter() - start)
  return min(times), sum(times) / len(times), float(loss)


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def header(command, what):
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
  print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"commit: {commit.strip()}; jax {jax.__version__}")
  print(f"- machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores "
        f"(shared with other jobs; load average {os.getloadavg()[0]:.1f} at the start), "
        f"8 simulated CPU devices (`--xla_force_host_platform_device_count=8`)")
  print(f"- command: `{command}`")
  print(f"- C = {NUM_CLASSES:,}, D = {DIM}, global batch {BATCH}, fp32 storage, {what}; "
        "step = loss + gradients (embeddings, W, b) + memory write, state donated\n")


def losses_table(steps):
  """Each sample-to-class loss (USS on) beside CosFace on 8 devices: memory and step time."""
  mesh8 = parallel.make_mesh(8)
  print("## Every sample-to-class loss in the head (benchmarks/head.py --losses)\n")
  header(f"python benchmarks/head.py --losses --steps {steps}", "USS (code), every s2c loss")
  print("| loss | per device, r = 1 (GiB) | × CosFace | per device, r = 0.1 (GiB) | × CosFace "
        "| step r = 0.1, best (s) | × CosFace |")
  print("|---|---|---|---|---|---|---|")
  base = None
  for name in head.S2C_LOSSES:
    full = head.HeadConfig(NUM_CLASSES, DIM, s2c_loss=name)
    sampled = head.HeadConfig(NUM_CLASSES, DIM, s2c_loss=name, sample_rate=0.1)
    row = (per_device_bytes(compile_step(full, mesh8))[0],
           per_device_bytes(compile_step(sampled, mesh8))[0],
           time_step(sampled, mesh8, steps)[0] if steps else float("nan"))
    base = base or row
    print(f"| {name} | {row[0] / GIB:.3f} | {row[0] / base[0]:.3f} | {row[1] / GIB:.3f} | "
          f"{row[1] / base[1]:.3f} | {row[2]:.2f} | {row[2] / base[2]:.2f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--skip_full_step_time", action="store_true",
                      help="time only r = 0.1 (the r = 1 step needs ~10 GB of host memory)")
  parser.add_argument("--dataset", choices=sorted(DATASETS), default="glint360k")
  parser.add_argument("--losses", action="store_true",
                      help="every sample-to-class loss beside CosFace (memory, step time)")
  args = parser.parse_args()
  assert jax.device_count() >= 8, "needs 8 (simulated) devices"
  if args.losses:
    losses_table(args.steps)
    return
  global NUM_CLASSES, BATCH
  NUM_CLASSES, BATCH, rate = DATASETS[args.dataset]
  full = head.HeadConfig(NUM_CLASSES, DIM)
  sampled = head.HeadConfig(NUM_CLASSES, DIM, sample_rate=rate)
  mesh1, mesh8 = parallel.make_mesh(1), parallel.make_mesh(8)
  r_name = f"r = {rate:g}"

  rows = []
  for name, config in (("r = 1", full), (r_name, sampled)):
    compiled1 = compile_step(config, mesh1)
    one, _ = per_device_bytes(compiled1)
    compiled8 = compile_step(config, mesh8)
    eight, m8 = per_device_bytes(compiled8)
    # The one-device program holds the whole [batch, C] logits: the check below finds them.
    wide1 = full_width_arrays(compiled1, NUM_CLASSES, BATCH)
    del compiled1
    rows.append((name, one, eight, m8, compiled8, wide1))

  print("## Class-sharded head (benchmarks/head.py)\n")
  header(f"python benchmarks/head.py --dataset {args.dataset} --steps {args.steps}"
         f"{' --skip_full_step_time' if args.skip_full_step_time else ''}", "USS (code), CosFace")
  print("| head | 1 device (GiB) | 8 devices, per device (GiB) | ratio × 8 "
        "| args / outputs / temps / aliased per device (GiB) |")
  print("|---|---|---|---|---|")
  for name, one, eight, m8, _, _ in rows:
    print(f"| {name} | {one / GIB:.3f} | {eight / GIB:.3f} | {8 * eight / one:.3f} | "
          f"{m8.argument_size_in_bytes / GIB:.3f} / {m8.output_size_in_bytes / GIB:.3f} / "
          f"{m8.temp_size_in_bytes / GIB:.3f} / {m8.alias_size_in_bytes / GIB:.3f} |")
  print()
  print("Largest array shapes in the compiled per-device program on 8 devices (fused "
        "intermediates included):\n")
  print(f"- {r_name} (k = {head.num_sampled(sampled, 8, BATCH)} sampled of "
        f"{head.num_local_classes(sampled, 8)} local classes): "
        + ", ".join(f"`{s}`" for s in largest_shapes(rows[1][4])))
  print("- r = 1: " + ", ".join(f"`{s}`" for s in largest_shapes(rows[0][4])) + "\n")
  for name, _, _, _, compiled8, wide1 in rows:
    wide = full_width_arrays(compiled8, NUM_CLASSES, BATCH)
    print(f"- arrays with a [global batch {BATCH}, C ≥ {NUM_CLASSES:,}] block, {name}: "
          f"{', '.join(f'`{w}`' for w in wide) if wide else 'none'} on 8 devices "
          f"(on 1 device: {', '.join(f'`{w}`' for w in wide1) or 'none'})")
    assert not wide, wide
  print()

  if args.dataset != "glint360k":
    return
  print("| head, 8 simulated devices | step time, best (s) | mean (s) |")
  print("|---|---|---|")
  for name, config in (("r = 1", full), (r_name, sampled)):
    if name == "r = 1" and args.skip_full_step_time:
      print(f"| {name} | not measured (--skip_full_step_time) | |")
      continue
    best, mean, _ = time_step(config, mesh8, args.steps)
    print(f"| {name} | {best:.2f} | {mean:.2f} |", flush=True)


if __name__ == "__main__":
  main()
