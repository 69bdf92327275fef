"""Shared pytest fixtures: where the bundled test data lives, ports for jax.distributed."""

import pathlib
import socket

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


@pytest.fixture
def free_port():
  """A function that returns a free 127.0.0.1 port, held for this test until it ends.

  A port found by binding port 0 and closing is free for anyone (every outgoing connection
  takes an ephemeral port from the same range) until the coordinator binds it, seconds later
  in a child process. So the socket stays bound, with SO_REUSEPORT: the kernel gives the port
  to no one else, and jax.distributed's gRPC coordinator, which sets SO_REUSEPORT too, binds
  it beside ours; ours does not listen, so every connection goes to the coordinator.
  """
  held = []

  def take() -> int:
    s = socket.socket()
    held.append(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

  yield take
  for s in held:
    s.close()


# Modules whose tests are child-process trainings or benchmarks (a minute or more each):
# they are collected first, so that `pytest -n 2` starts them on both workers at once and the
# many short tests fill in around them, instead of the long ones running last on one worker.
_SLOW_MODULES = ("test_train.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in _SLOW_MODULES)
