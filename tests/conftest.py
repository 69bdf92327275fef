"""Shared pytest setup: where the bundled test data lives, the one CPU device this process
runs on, the session's XLA flags (LLVM -O0) and compilation cache, ports for jax.distributed,
the runner of tests/multidevice, Hypothesis's fixed examples, and the slow tests first."""

import gc
import os
import pathlib
import socket
import shutil
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

import hypothesis
import pytest

import gc_settings

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
# first, the longest of them (LONGEST, measured: BENCHMARKS.md, "The test suite") first of
# all, so that `pytest -n 2` starts them early and the many short tests fill in around them,
# instead of a long one running last on one worker; and a worker that runs out of tests
# takes the other's queued ones from the end of its queue (`--dist worksteal`,
# pyproject.toml), so neither waits idle at the end. A name here that no longer exists only
# loses its place.
LONGEST = (
    "test_plan.py::test_the_demo_step_compiles_for_a_v5e_slice",
    "test_finetune.py::test_finetuning_raises_held_out_accuracy",
    "test_head.py::test_sharded_head_and_every_s2c_loss_pass_on_8_devices",
    "test_finetune.py::test_resumed_finetuning_restores_its_own_checkpoint",
    "test_train.py::test_two_processes_preempted_and_resumed_match_one_process",
    "test_pod_failures.py::test_a_lost_peer_stops_the_other_process_and_both_resume",
    "test_benchmarks.py::test_train_step_benchmark_reports_ratio_and_mfu",
    "test_train_backbones.py::test_demo_smoke_trains_and_reports_held_out_accuracy[mbf_test]",
    "test_plan.py::test_the_abstract_state_is_init_states_on_8_devices",
    "test_benchmarks.py::test_embed_benchmark_reports_ratio_and_mfu",
    "test_train_backbones.py::test_remat_gives_the_same_step",
    "test_benchmarks.py::test_strided_gradients_benchmark_compiles_two_different_steps",
    "test_checkpoint.py::test_restores_onto_other_device_counts_pass_on_8_devices",
)


def pytest_collection_modifyitems(items):
  def order(item):
    name = f"{item.path.name}::{item.name}"
    return (item.get_closest_marker("slow") is None,
            LONGEST.index(name) if name in LONGEST else len(LONGEST))

  items.sort(key=order)


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

# XLA:CPU flags of the whole session, added to XLA_FLAGS before JAX starts (a flag of the same
# name in the caller's XLA_FLAGS wins): the workers, the child processes (trainings, command
# lines, benchmark scripts: they inherit the environment) and the 8-device sessions
# (``multidevice_pytest``) compile with them. LLVM at -O0: the suite's programs are small and
# run a few steps, so compiling is most of its CPU time, and -O0 compiles in a fraction of
# the default's (-O3) time (BENCHMARKS.md, "The test suite"). It changes no operation's
# meaning but the bits of some results (a smoke run's losses part from the default's by step
# 14): a comparison is between two computations of the session, or within a tolerance of a
# file made at the default. Where the default itself is the subject (the initialiser
# compiled at -O1 against it) the test asks for it by name. The command lines of
# tests/test_plan.py run as from a user's shell, without these flags: the XLA:TPU compile,
# and the CPU training beside libtpu (the suite's one training at XLA's default level).
SESSION_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child process with ``devices`` simulated CPU devices: the session's
  (``pytest_configure``), and the device count."""
  return " ".join((*os.environ.get("XLA_FLAGS", "").split(),
                   f"{_DEVICE_COUNT_FLAG}={devices}"))


def _multidevice_session(config) -> bool:
  paths = [pathlib.Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
           for arg in config.args]
  return bool(paths) and all(p.is_relative_to(TESTS_DIR / "multidevice") for p in paths)


# One persistent compilation cache for the whole session, set in the environment before JAX
# starts: the xdist workers, the in-process trainings and every child process (trainings,
# command lines, tests/multidevice) share it, so a program compiled once (the smoke step, its
# initialiser, the evaluation) is loaded by every later run of the same configuration. A cached
# executable is the same program, so results stay bitwise comparable. No maximum size: with
# one, JAX's cache lists, stats and reads the access time of every entry on each write (to
# evict), 0.4 s a write at 10,000 entries, quadratic over a session that writes thousands.
# Without one it takes no lock either: a process that reads an entry while another writes it
# gets a warning from JAX and compiles the program itself. The test of the workdir's own
# cache (``config.compilation_cache``) removes the directory's variable for its run.
SESSION_CACHE_DIR_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
_session_cache = None


def pytest_configure(config):
  global _session_cache
  gc.set_threshold(*gc_settings.THRESHOLDS)
  if _multidevice_session(config) or "jax" in sys.modules:
    return
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller: its workers inherit it
    _session_cache = tempfile.mkdtemp(prefix="unitsface_test_jax_cache_")
    os.environ[SESSION_CACHE_DIR_VARIABLE] = _session_cache
    # Every program, not only those over 1 s: each child process compiles the same small ones
    # (the evaluation's forward pass, the data fingerprint, the device_put helpers).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PLATFORMS"] = "cpu"
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(_DEVICE_COUNT_FLAG)]
  names = {_flag_name(f) for f in kept}
  added = [f for f in SESSION_XLA_FLAGS if _flag_name(f) not in names]
  os.environ["XLA_FLAGS"] = " ".join((*kept, *added))


def pytest_unconfigure(config):
  del config
  if _session_cache is not None:
    shutil.rmtree(_session_cache, ignore_errors=True)


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


@pytest.fixture(scope="session", autouse=True)
def tiny_backbone_registered():
  """The tests' own backbones (tests/tiny_backbone.py) registered while the tests run (not
  while they are collected: parametrisations over ``models.list_models()`` are the package's
  backbones); tests/train_run.py, tests/plan_run.py and tests/launch_site/sitecustomize.py
  register them in child processes."""
  import tiny_backbone  # pylint: disable=g-import-not-at-top
  tiny_backbone.register()
  yield
  tiny_backbone.unregister()


@pytest.fixture
def multidevice_pytest(tmp_path):
  """``run(names, expected, timeout=...)`` runs ``tests/multidevice/<name>`` (a name or a
  tuple of them) in one child pytest with 8 simulated CPU devices (and the session's XLA
  flags) and asserts that it passed with exactly ``expected`` tests, none failed, errored or
  skipped."""
  def run(names, expected, *, timeout):
    names = (names,) if isinstance(names, str) else tuple(names)
    report = tmp_path / "multidevice.xml"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    env.pop("JAX_ENABLE_X64", None)
    env.pop("PYTEST_ADDOPTS", None)  # options meant for this session (-k, -x) would cut the run
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         *(str(MULTIDEVICE_DIR / name) for name in names)],
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


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
  """``shared_dir(name, build)``: the directory ``build(path)`` filled, built once for the
  whole session, whichever xdist worker asks first; the others wait for it and reuse it.

  For trained workdirs several tests read: a module- or session-scoped fixture alone is built
  once per worker, and ``pytest -n 2`` runs most modules on both. A test that changes what it
  gets copies it first. A ``build`` that failed is tried again by the next caller (and fails
  there too, naming its own error).
  """
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:  # each worker's basetemp is inside the session's
    root = root.parent
  root = root / "shared"
  root.mkdir(exist_ok=True)

  def get(name, build):
    path, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
      if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        build(path)
        done.touch()
    return path

  return get


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS server on 127.0.0.1 (``tests/gcs_server.py``) for this session, with bucket
  ``gs://test``; its client variables are set in os.environ for this process and the
  processes it starts, and removed, with the server stopped, at the end."""
  import gcs_server  # pylint: disable=g-import-not-at-top
  server = gcs_server.GcsServer(tmp_path_factory.mktemp("gcs") / "root",
                                gcs_server.unused_port())
  saved = dict(os.environ)
  try:
    server.start()
    os.environ.update(server.env())
    server.create_bucket("test")
    yield server
  finally:
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def demo_on_gcs(gcs):
  """The bundled demo RecordIO set, uploaded to gs://test/demo."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from unitsface_jax.data import demo  # pylint: disable=g-import-not-at-top
  url = "gs://test/demo"
  for name in ("train.rec", "train.idx", "property"):
    (epath.Path(url) / name).write_bytes((demo.demo_path() / name).read_bytes())
  return url
