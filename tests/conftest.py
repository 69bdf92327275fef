"""Shared pytest fixtures: where the bundled test data lives."""

import pathlib

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"

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
