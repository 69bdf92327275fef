"""Shared pytest setup: where the bundled test data lives, the one CPU device this process
runs on, ports for jax.distributed, Hypothesis's fixed examples, and the slow tests first."""

import os
import pathlib
import socket
import sys

import hypothesis
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


# Tests marked slow (child-process trainings, benchmarks, multi-device runs) are collected
# first, so that `pytest -n 2` starts them on both workers at once and the many short tests
# fill in around them, instead of the long ones running last on one worker.
def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# The same examples on every run and machine: a failure is reproduced by running the test
# again, and no example depends on what an earlier run saved (no example database).
hypothesis.settings.register_profile("unitsface", derandomize=True, deadline=None,
                                     database=None)
hypothesis.settings.load_profile("unitsface")


# The tests here assume one CPU device (batches of 4 over `parallel.make_mesh()`, results
# compared with one device's); the tests that need more start processes with their own
# XLA_FLAGS. Pinned before JAX starts, so neither a GPU nor a device count in the caller's
# XLA_FLAGS changes what they test, and checked once it has. A session of only
# tests/multidevice (which tests/test_head.py starts with 8 devices) sets its own count.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _multidevice_session(config) -> bool:
  paths = [pathlib.Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
           for arg in config.args]
  return bool(paths) and all(p.is_relative_to(TESTS_DIR / "multidevice") for p in paths)


def pytest_configure(config):
  if _multidevice_session(config) or "jax" in sys.modules:
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(_DEVICE_COUNT_FLAG)]
  if kept:
    os.environ["XLA_FLAGS"] = " ".join(kept)
  else:
    os.environ.pop("XLA_FLAGS", None)


@pytest.fixture(scope="session", autouse=True)
def one_cpu_device(request):
  if _multidevice_session(request.config):
    return
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  assert len(devices) == 1 and devices[0].platform == "cpu", (
      f"the tests in {TESTS_DIR} assume one CPU device, and JAX has {devices}: it started "
      "before tests/conftest.py could pin JAX_PLATFORMS=cpu and drop "
      f"{_DEVICE_COUNT_FLAG} from XLA_FLAGS (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
