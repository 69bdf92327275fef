"""Shared pytest fixtures: where the bundled test data lives; the runner of tests/multidevice."""

import os
import pathlib
import subprocess
import sys
from xml.etree import ElementTree

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
MULTIDEVICE_DIR = TESTS_DIR / "multidevice"

# Tests that need 8 simulated devices, set before JAX starts: tests/test_head.py runs them in
# their own process (``python -m pytest tests/multidevice``, where this list does not apply).
collect_ignore = ["multidevice"]


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The repository's own copy of the test data (present on a fresh clone)."""
  return DATA_DIR


# Modules whose tests are child-process trainings or benchmarks (a minute or more each):
# they are collected first, so that `pytest -n 2` starts them on both workers at once and the
# many short tests fill in around them, instead of the long ones running last on one worker.
_SLOW_MODULES = ("test_train.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in _SLOW_MODULES)


@pytest.fixture
def multidevice_pytest(tmp_path):
  """``run(name, expected, timeout=..., xla_flags=())`` runs ``tests/multidevice/<name>`` in
  a child pytest with 8 simulated CPU devices and asserts that it passed with exactly
  ``expected`` tests, none failed, errored or skipped."""
  def run(name, expected, *, timeout, xla_flags=()):
    report = tmp_path / f"{name}.xml"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        ("--xla_force_host_platform_device_count=8", *xla_flags)))
    env.pop("JAX_ENABLE_X64", None)
    env.pop("PYTEST_ADDOPTS", None)  # options meant for this session (-k, -x) would cut the run
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(MULTIDEVICE_DIR / name)],
        cwd=TESTS_DIR.parent, env=env, capture_output=True, text=True, timeout=timeout)
    # The first failure in full and the summary of all (one bug can fail dozens).
    out = proc.stdout if len(proc.stdout) < 16000 else (
        f"{proc.stdout[:8000]}\n[...]\n{proc.stdout[-8000:]}")
    output = f"{out}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output  # exit 5, no tests collected, fails here too
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts == dict(tests=expected, failures=0, errors=0, skipped=0), output

  return run
