"""Times several step implementations alternately, each in its own worker process.

This machine is shared, so a rate measured minutes apart says little; steps of the
implementations being compared are interleaved instead (A, B, C, A, B, C, ...) so that load
changes hit all of them alike. Each implementation runs in its own process because what is
compared often differs in process-wide settings fixed at start-up (``XLA_FLAGS``, the
allocator's ``GLIBC_TUNABLES``, PyTorch vs. JAX), and so that one framework's allocator and
threads do not tax the other's.

Protocol: a worker is this same benchmark script run with ``--worker=NAME``. It builds its
step, prints one line ``READY <json>`` (facts such as FLOPs per step), then for every ``step``
line on stdin runs one step and prints ``TIME <seconds>``, and for every ``rate`` line
measures its framework's matmul rate and prints ``RATE <flop/s>``; ``quit`` (or EOF) ends it.
The matmul rate is measured after every round, by every worker, and the best counts as the
ceiling: a rate measured once, at a moment when other jobs held the cores, would understate
it and inflate the MFU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


@dataclasses.dataclass
class Worker:
  """One implementation to time: the worker command line and extra environment."""
  name: str
  argv: Sequence[str]
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  base_env: dict[str, str] | None = None  # default: this process's environment


def serve(build: Callable[[], tuple[Callable[[], None], dict, Callable[[], float]]]) -> None:
  """Worker side: builds (step, facts, matmul-rate function), then answers requests."""
  run_once, info, matmul_rate = build()
  out = sys.stdout
  out.write("READY " + json.dumps(info) + "\n")
  out.flush()
  for line in sys.stdin:
    request = line.strip()
    if request == "step":
      t = time.perf_counter()
      run_once()
      out.write(f"TIME {time.perf_counter() - t!r}\n")
    elif request == "rate":
      out.write(f"RATE {matmul_rate()!r}\n")
    else:
      break
    out.flush()


def _read(proc: subprocess.Popen, prefix: str, name: str) -> str:
  while True:
    line = proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {name} exited (status {proc.wait()}) before {prefix}")
    if line.startswith(prefix + " "):
      return line[len(prefix) + 1:].strip()


def _ask(proc: subprocess.Popen, request: str, prefix: str, name: str) -> float:
  proc.stdin.write(request + "\n")
  proc.stdin.flush()
  return float(_read(proc, prefix, name))


def run(workers: Sequence[Worker], rounds: int
        ) -> tuple[dict[str, dict], dict[str, list], dict[str, list]]:
  """Starts the workers one after the other, then times ``rounds`` interleaved steps.

  Workers are built one at a time (compilation is CPU-heavy) and all stay alive while timed.

  Returns:
    ``(info, times, rates)``: each worker's READY facts, its per-step seconds and its matmul
    rates (one per round).
  """
  procs, info = {}, {}
  try:
    for w in workers:
      env = dict(os.environ if w.base_env is None else w.base_env)
      # On a GPU several workers share the device: JAX must not grab 75% of it up front.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      env.update(w.env)
      procs[w.name] = subprocess.Popen(
          list(w.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
          bufsize=1)
      info[w.name] = json.loads(_read(procs[w.name], "READY", w.name))
    times = {w.name: [] for w in workers}
    rates = {w.name: [] for w in workers}
    for _ in range(rounds):
      for w in workers:
        times[w.name].append(_ask(procs[w.name], "step", "TIME", w.name))
      for w in workers:
        rates[w.name].append(_ask(procs[w.name], "rate", "RATE", w.name))
    return info, times, rates
  finally:
    for p in procs.values():
      if p.poll() is None:
        try:
          p.stdin.write("quit\n")
          p.stdin.close()
        except OSError:
          pass
        try:
          p.wait(timeout=60)
        except subprocess.TimeoutExpired:
          p.kill()


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (other jobs on this shared machine)."""
  return [round(x, 2) for x in os.getloadavg()]


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
  """'name:A=1,B=2' -> ('name', {'A': '1', 'B': '2'})."""
  name, _, rest = spec.partition(":")
  env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
  return name, env


def xla_matmul_rate(dtype: str, n: int = 0, reps: int = 10) -> float:
  """FLOP/s of a large square matmul under XLA on the default devices (n: 2048 on CPU,
  8192 on an accelerator, where 2048 is too small to fill it)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times) * jax.device_count()


def torch_matmul_rate(bf16: bool, device: str, n: int = 0, reps: int = 10) -> float:
  """FLOP/s of a large square matmul in PyTorch (oneDNN/MKL on CPU, cuBLAS on GPU)."""
  import torch  # pylint: disable=import-outside-toplevel
  n = n or (2048 if device == "cpu" else 8192)
  a = torch.ones(n, n, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
  times = []
  for _ in range(reps + 1):
    t = time.perf_counter()
    (a @ a).sum().item()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times[1:])


def compare(script: str, common: Sequence[str], jax_specs: Sequence[str], compare_torch: bool,
            rounds: int, images_per_step: int, what: str,
            base_env: dict[str, str] | None = None) -> dict:
  """Runs the JAX variants (and PyTorch) of ``script`` alternately; prints a table.

  Each JAX worker reports ``flops`` (cost analysis of its compiled program) and
  ``analytic_flops``. MFU of every variant is the first JAX variant's FLOPs (the work
  itself, whoever does it) over the measured time and the fastest matmul rate any worker
  measured in any round. The FLOPs are the cost analysis's unless it is off the analytic
  count by more than 2x (on GPU it misses cuDNN's convolutions); then the analytic count.

  ``base_env`` is the environment the workers start from (default: this process's).

  Returns:
    The result dict that the caller prints as its last (JSON) line.
  """
  workers = []
  for spec in jax_specs:
    name, env = parse_variant(spec)
    workers.append(Worker(name, [sys.executable, script, "--worker=jax", *common], env,
                          base_env))
  jax_names = [w.name for w in workers]
  if compare_torch:
    workers.append(Worker("torch", [sys.executable, script, "--worker=torch", *common],
                          base_env=base_env))
  load_before = load_average()
  info, times, rates = run(workers, rounds)
  load_after = load_average()
  ceiling = max(max(r) for r in rates.values())
  first = info[jax_names[0]]
  flops, flops_source = first["flops"], "cost_analysis"
  if not 0.5 <= flops / first["analytic_flops"] <= 2.0:
    # XLA:GPU's cost analysis does not see inside cuDNN convolution custom calls (it counted
    # 1% of an iresnet50 step on an H200): count the network analytically instead.
    flops, flops_source = first["analytic_flops"], "analytic"
  rows = {}
  for name, ts in times.items():
    sec = statistics.median(ts)
    rows[name] = {"img_s": round(images_per_step / sec, 3), "seconds": round(sec, 4),
                  "mfu": round(flops / sec / ceiling, 4), "all_seconds": [round(t, 3) for t in ts]}
  result = {
      "jax_img_s": rows[jax_names[0]]["img_s"], "mfu": rows[jax_names[0]]["mfu"],
      "devices": first["devices"], "backend": first["backend"],
      f"flops_per_{what}": first["flops"], f"analytic_flops_per_{what}": first["analytic_flops"],
      "mfu_flops": flops_source,
      "matmul_ceiling_flop_s": ceiling,
      "matmul_rate_best": {n: round(max(r)) for n, r in rates.items()},
      "xla_flags": {n: info[n]["xla_flags"] for n in jax_names},
      "load_average": {"before": load_before, "after": load_after},
      "variants": rows,
  }
  print(f"FLOPs per {what}: cost analysis {first['flops'] / 1e9:.1f} G, analytic "
        f"{first['analytic_flops'] / 1e9:.1f} G (MFU uses {flops_source}); "
        f"matmul ceiling {ceiling / 1e9:.1f} GFLOP/s; "
        f"load average {load_before} -> {load_after}")
  if max(row["mfu"] for row in rows.values()) > 1:
    print("WARNING: MFU > 100%: the matmul ceiling was measured under load; rerun")
  print(f"{'':>16} {'img/s':>8} {'MFU':>7}")
  for name, row in rows.items():
    print(f"{name:>16} {row['img_s']:8.2f} {row['mfu']:7.1%}")
  if compare_torch:
    result["torch_img_s"] = rows["torch"]["img_s"]
    result["ratio"] = round(rows[jax_names[0]]["img_s"] / rows["torch"]["img_s"], 3)
    for name in jax_names:
      rows[name]["ratio"] = round(rows[name]["img_s"] / rows["torch"]["img_s"], 3)
      print(f"ratio {name}/torch: {rows[name]['ratio']:.3f}")
  return result
