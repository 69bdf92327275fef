"""A pytest plugin: the CPU time each test costs, its own process's and its child processes'.

  PYTHONPATH=benchmarks python -m pytest -q -n 2 tests -p cpu_per_test
  python benchmarks/cpu_per_test.py [OUT_PREFIX]   # the table of what the run wrote

On two shared cores a test's duration is mostly the other worker's load; its CPU time is
what it costs the suite. Per test (setup, call and teardown): ``time.process_time()`` of the
pytest worker (every thread) and the user + system time of the child processes it waited
for (``RUSAGE_CHILDREN``; a child's own children count once it waited for them). One JSON
line a test, appended to ``OUT_PREFIX.<xdist worker>.jsonl`` (``CPU_PER_TEST_OUT``, default
``/tmp/cpu_per_test``; remove old files first).
"""

import glob
import json
import os
import resource
import sys
import time

import pytest

_OUT = os.environ.get("CPU_PER_TEST_OUT", "/tmp/cpu_per_test")


def _children_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  own, children, wall = time.process_time(), _children_s(), time.time()
  yield
  row = {"id": item.nodeid, "own_s": time.process_time() - own,
         "children_s": _children_s() - children, "wall_s": time.time() - wall}
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(f"{_OUT}.{worker}.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def _report(prefix: str) -> None:
  rows = [json.loads(line) for path in sorted(glob.glob(f"{prefix}.*.jsonl"))
          for line in open(path, encoding="utf-8")]
  rows.sort(key=lambda r: -(r["own_s"] + r["children_s"]))
  total = sum(r["own_s"] + r["children_s"] for r in rows)
  print(f"{len(rows)} tests, {total:.0f} s of CPU time")
  for r in rows[:30]:
    print(f"{r['own_s'] + r['children_s']:7.1f} s  (wall {r['wall_s']:6.1f} s)  {r['id']}")


if __name__ == "__main__":
  _report(sys.argv[1] if len(sys.argv) > 1 else _OUT)
