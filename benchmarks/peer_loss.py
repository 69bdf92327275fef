r"""Seconds from one process's death to the other's exit, in a two-process run on 127.0.0.1.

  python benchmarks/peer_loss.py [--after_step=5] [--src=/path/to/other/checkout] -- \
      --config=configs/demo.py:smoke --config.model.width=4 --config.model.num_features=32

Starts two processes of ``python -m unitsface_jax.main`` (the arguments after ``--``, one
simulated CPU device each, jax.distributed on a free 127.0.0.1 port, a fresh temporary
--workdir). Process 1 kills itself with SIGKILL after step ``--after_step`` (the drill,
``config.debug``); the survivor's exit status, its ``error:`` lines and the seconds from
process 1's death to its exit are reported (the survivor is killed after ``--timeout``).
``--src`` runs another checkout's package. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--after_step", type=int, default=5)
  parser.add_argument("--src", default=ROOT)
  parser.add_argument("--timeout", type=float, default=600)
  parser.add_argument("main_args", nargs="+")
  args = parser.parse_args()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=args.src, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  with tempfile.TemporaryDirectory(prefix="peer_loss_bench_") as workdir:
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    drill = [[], [f"--config.debug.signal_after_step={args.after_step}",
                  "--config.debug.signal=SIGKILL"]]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "unitsface_jax.main", *args.main_args, f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *drill[i]], cwd=args.src, env=env, stdout=subprocess.DEVNULL, stderr=logs[i])
             for i in range(2)]
    try:
      procs[1].wait(timeout=args.timeout)
      died = time.time()
      try:
        procs[0].wait(timeout=args.timeout)
      except subprocess.TimeoutExpired:
        pass
      seconds = time.time() - died
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    logs[0].seek(0)
    errors = [l for l in logs[0].read().splitlines() if l.startswith("error:")]
  print(json.dumps({"killed_status": procs[1].returncode, "survivor_status": procs[0].returncode,
                    "death_to_exit_s": round(seconds, 2), "survivor_errors": errors,
                    "src": args.src, "load_average": os.getloadavg()[0],
                    "args": args.main_args}))


if __name__ == "__main__":
  main()
