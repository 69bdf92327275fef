"""Times the test suite of one commit in a fresh clone: wall time, CPU time, the sum of the
tests' durations, per module, and the ten slowest (BENCHMARKS.md, "The test suite").

  python benchmarks/test_suite.py [--commit=HEAD] [--not_slow] [-- PYTEST_ARGS...]

The clone is run from its own directory with itself first on PYTHONPATH (the child processes
the tests start import it from there too), on the packages installed here; nothing is
installed. Prints a table, then the result as one JSON line.
"""

import collections
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_COMMIT = flags.DEFINE_string("commit", "HEAD", "The commit to time.")
_NOT_SLOW = flags.DEFINE_bool("not_slow", False, "Run -m 'not slow' only.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)")


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main(argv):
  with tempfile.TemporaryDirectory(prefix="unitsface_suite_") as tmp:
    clone = pathlib.Path(tmp) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", _COMMIT.value], cwd=clone, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True,
                            capture_output=True, text=True).stdout.strip()
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
               "--durations=0", *(["-m", "not slow"] if _NOT_SLOW.value else []), *argv[1:],
               "tests"]
    env = dict(os.environ, PYTHONPATH=str(clone))
    cpu, start = _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
  lines = proc.stdout.splitlines()
  durations = []
  for line in lines:
    m = _DURATION.match(line)
    if m:
      durations.append((float(m.group(1)), m.group(2), m.group(3)))
  per_module = collections.Counter()
  for seconds, _, test in durations:
    per_module[test.split("::")[0]] += seconds
  summary = next((l for l in reversed(lines) if " in " in l and ("passed" in l or "failed" in l)),
                 "")
  print(f"commit {commit}: {summary}")
  total = sum(d[0] for d in durations)
  print(f"wall {wall:.0f} s, CPU (user + sys) {cpu:.0f} s, tests {total:.0f} s")
  for seconds, phase, test in durations[:10]:
    print(f"  {seconds:6.0f} s  {test}{' (fixture)' if phase == 'setup' else ''}")
  print(json.dumps({
      "commit": commit, "returncode": proc.returncode, "summary": summary,
      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
      "test_duration_sum_s": round(total, 1),
      "slowest": [[round(s, 1), t, p] for s, p, t in durations[:10]],
      "per_module_s": {k: round(v, 1) for k, v in per_module.most_common()}}))
  return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
  app.run(main)
