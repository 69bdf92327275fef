r"""Seconds from SIGTERM to the exit of a training run, and which step it saved.

  python benchmarks/preemption.py --after=90 [--src=/path/to/other/checkout] -- \
      --config=configs/demo.py:smoke --config.data.max_examples=0 --config.num_epochs=20 \
      --config.log_every_steps=1000 --config.checkpoint_every_steps=1000

Starts ``python -m unitsface_jax.main`` (the arguments after ``--``, a fresh temporary
--workdir) in a child process, sends it SIGTERM ``--after`` seconds after its start, and
reports the exit status, the seconds from the signal to the exit, the step the run saved
("preemption requested: saving step N") and the last step the host had logged. ``--src``
runs another checkout's package instead (a before/after pair of a change, one at a time).
Large ``log_every_steps`` and ``checkpoint_every_steps`` keep the loop from syncing with the
device for its own reasons, so what is measured is how far the host ran ahead. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--after", type=float, required=True, help="seconds before SIGTERM")
  parser.add_argument("--src", default=ROOT, help="checkout whose package runs")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("main_args", nargs="+")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="preemption_bench_") as workdir:
    env = dict(os.environ, PYTHONPATH=args.src)
    with tempfile.TemporaryFile("w+") as log:
      proc = subprocess.Popen([sys.executable, "-m", "unitsface_jax.main", *args.main_args,
                               f"--workdir={workdir}"], cwd=args.src, env=env,
                              stdout=subprocess.DEVNULL, stderr=log)
      try:
        try:
          proc.wait(timeout=args.after)
          sys.exit(f"the run ended before the signal (status {proc.returncode}): "
                   "raise num_epochs or lower --after")
        except subprocess.TimeoutExpired:
          pass
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=args.timeout)
        seconds = time.time() - signalled
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
      log.seek(0)
      text = log.read()
  saved = re.findall(r"preemption requested: saving step (\d+)", text)
  result = {"status": proc.returncode, "sigterm_to_exit_s": round(seconds, 1),
            "saved_step": int(saved[-1]) if saved else None, "src": args.src,
            "load_average": os.getloadavg()[0], "args": args.main_args}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
