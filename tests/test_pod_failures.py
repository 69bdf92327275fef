"""The failures a preemptible pod run meets: the host running ahead of the device, a peer
process lost mid-run, an unreadable latest checkpoint. Tiny smoke runs in child processes
(``tests/train_run.py``), as in tests/test_train.py."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import command_lines
import tiny_backbone
from test_launch import launch_local
from test_train import ROOT, RUN, SMOKE, _env, metrics, ok, run, run_two_processes, steps
from unitsface_jax import run_control
from unitsface_jax.data import demo as demo_data

# 8 steps of batch 8 (4 an epoch), checkpoints at 4, 6, 8; the tests' own backbone
# (tests/tiny_backbone.py, which tests/train_run.py registers).
TINY = [*tiny_backbone.FLAGS, "--config.data.max_examples=32",
        "--config.checkpoint_every_steps=2"]


def test_step_queue_lets_at_most_one_pushed_step_run():
  @jax.jit
  def slow_step(x):  # ~tens of ms on a CPU: far longer than a push takes
    for _ in range(20):
      x = jnp.tanh(x @ x) / 64
    return x

  queue, x, pushed = run_control.StepQueue(), jnp.ones((256, 256)), []
  for _ in range(6):
    x = slow_step(x)
    pushed.append(x)
    queue.push(x)
    assert len(queue.pending) == run_control.MAX_STEPS_IN_FLIGHT - 1
    assert all(p.is_ready() for p in pushed[:-1])  # every earlier step has finished


class _NeverReady:
  def is_ready(self):
    return False


class _Ready:
  def is_ready(self):
    return True


def test_the_automatic_step_timeout_is_twenty_median_steps_with_a_floor():
  watchdog = run_control.StepWatchdog(0.0)
  watchdog._thread = object()  # pylint: disable=protected-access  # timed, not started
  for step in range(1, run_control.WATCHDOG_WARMUP_STEPS + 1):
    watchdog.dispatched(step, _Ready())
  assert watchdog.bound() is None  # the warm-up steps are not timed
  times = watchdog._dispatch_times  # pylint: disable=protected-access
  times.extend([0.0, 20.0, 40.0, 60.0, 90.0])  # median interval 20 s
  assert watchdog.bound() == 400.0
  times.clear()
  times.extend([0.0, 0.1, 0.2, 0.3])
  assert watchdog.bound() == run_control.WATCHDOG_FLOOR_S
  assert run_control.StepWatchdog(7.0).bound() == 7.0


_HUNG = """
import sys, time
from unitsface_jax import run_control

class Output:
  def __init__(self, ready):
    self.ready = ready
  def is_ready(self):
    return self.ready

with run_control.StepWatchdog(float(sys.argv[1])) as watchdog:
  for step in range(1, 6):
    watchdog.dispatched(step, Output(True))
  watchdog.dispatched(6, Output(False))
  print("dispatched", flush=True)
  time.sleep(60)
print("not stopped")
"""


def test_a_step_that_does_not_finish_ends_the_process_in_one_line():
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", _HUNG, "2"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
  elapsed = time.monotonic() - start
  assert proc.returncode == run_control.HUNG_STATUS, proc.stderr[-3000:]
  assert proc.stdout.split() == ["dispatched"] and elapsed < 30
  assert proc.stderr.startswith("error: step 6 has not finished after "), proc.stderr
  assert (f" s (config.step_timeout_s bound 2 s) on {socket.gethostname()}, process 0 of 1: a "
          "peer process or a collective hangs; stopping." in proc.stderr), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
          key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[:1000])


def _tree(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def tiny_run(shared_dir, tmp_path):
  """A copy of the tiny run's workdir (trained once in the session): checkpoints 4, 6, 8."""
  trained = shared_dir("pod_tiny_run", lambda workdir: ok(run(1, workdir, *TINY)))
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


@pytest.mark.slow
def test_unreadable_checkpoints_are_skipped_kept_aside_and_saved_again(tiny_run, tmp_path,
                                                                       capsys, caplog):
  workdir = tiny_run
  assert steps(workdir) == [4, 6, 8]
  ckpts = workdir / "checkpoints"
  _truncate_largest_array_file(ckpts / "8")
  for item in (ckpts / "6" / "data").iterdir():  # the data iterator item, gone
    item.unlink()
  (ckpts / "6" / "data").rmdir()
  bad = {s: _tree(ckpts / str(s)) for s in (6, 8)}

  # Export needs no data item: it skips 8 only, and moves nothing.
  status, err = command_lines.run_main_stderr(
      capsys, "unitsface_jax.export.__main__", f"--workdir={workdir}", "--format=npz",
      f"--out={tmp_path / 'w.npz'}")
  assert status == 0, err
  assert (f"checkpoint 8 in {ckpts} is unreadable (ValueError: OUT_OF_RANGE: Error reading"
          in caplog.text)
  assert (tmp_path / "w.npz").exists() and steps(workdir) == [4, 6, 8]

  # Training resumes from 4 (one warning line for each bad one), keeps 6 and 8 beside the
  # checkpoints for inspection, and saves those steps again.
  proc = ok(run(1, workdir, *TINY, "--config.num_epochs=3"))
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("W") and "checkpoint " in l]
  assert len(warnings) == 4, warnings  # two "is unreadable", two "moved to"
  assert "checkpoint 8 in" in warnings[0] and "OUT_OF_RANGE" in warnings[0]
  assert "checkpoint 6 in" in warnings[1] and 'Item "data" was not found' in warnings[1]
  assert "resumed from step 4" in proc.stderr
  assert {s: _tree(ckpts / f"{s}.unreadable") for s in (6, 8)} == bad
  assert steps(workdir) == [8, 10, 12] and max(metrics(workdir)) == 12


@pytest.mark.slow
def test_no_readable_checkpoint_stops_naming_the_directory(tiny_run, tmp_path, capsys):
  workdir = tiny_run
  ckpts = workdir / "checkpoints"
  for step in steps(workdir):
    _truncate_largest_array_file(ckpts / str(step))
  proc = run(1, workdir, *TINY)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: no readable checkpoint in {ckpts} (steps [8, 6, 4] cannot be read")
  assert "Traceback" not in proc.stderr and steps(workdir) == [4, 6, 8]  # nothing moved
  # One warning line per checkpoint, not orbax's echo of every abandoned array read.
  assert "Exception ignored" not in proc.stderr and len(proc.stderr.splitlines()) < 30
  status, err = command_lines.run_main_stderr(
      capsys, "unitsface_jax.export.__main__", f"--workdir={workdir}", "--format=npz",
      f"--out={tmp_path / 'w.npz'}")
  assert status == 2 and err.splitlines()[-1].startswith(
      f"error: no readable checkpoint in {ckpts}"), err
  status, err = command_lines.run_main_stderr(
      capsys, "unitsface_jax.evaluate", f"--data={demo_data.demo_bin_path()}",
      f"--workdir={workdir}", f"--out={tmp_path / 'eval'}")
  assert status == 2 and err.splitlines()[-1].startswith(
      f"error: no readable checkpoint in {ckpts}"), err


@pytest.mark.slow
def test_a_lost_peer_stops_the_other_process_and_both_resume(tmp_path, free_port):
  """Process 1 is SIGKILLed after step 5 (its checkpoint 4 on disk): process 0 exits 3 with
  one line naming the cause, instead of hanging until a heartbeat timeout aborts it. The same
  run started again by launch/local_multiprocess.sh (two real processes) resumes from 4."""
  env = _env(UNITSFACE_NO_XLA_FLAGS="1")
  flags = [*TINY, "--config.checkpoint_every_steps=4"]
  kill = ["--config.debug.signal_after_step=5", "--config.debug.signal=SIGKILL"]
  workdir = tmp_path / "run"
  (code0, err0), (code1, _) = run_two_processes(workdir, free_port(), *flags, env=env,
                                                process_flags=((), kill), timeout=300)
  assert code1 == -signal.SIGKILL
  assert code0 == 3, err0[-3000:]
  lines = [l for l in err0.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith(
      "error: lost a peer process of this multi-process run ("), err0[-3000:]
  assert "Traceback" not in err0 and steps(workdir) == [4]
  code, err, left = launch_local(tmp_path, workdir, *flags, devices=2, env=env, timeout=300,
                                 tiny=True)
  logs = [(tmp_path / f"unitsface_proc{i}.log").read_text() for i in range(2)]
  assert code == 0 and not left, (err, [log[-3000:] for log in logs])
  for log in logs:
    assert "Connecting to JAX distributed service on 127.0.0.1:" in log
    assert "resumed from step 4" in log
  assert steps(workdir) == [4, 8] and max(metrics(workdir)) == 8


@pytest.mark.slow
def test_a_hung_peer_ends_the_other_process_within_the_step_timeout(tmp_path, free_port):
  """Process 1 stops itself (SIGSTOP) after step 5, alive but silent, its checkpoint 4 on
  disk: process 0 waits in step 6's collectives until its step timeout (5 s) ends it, one
  line naming the step and the host, exit 3, well before the coordination service's 100 s
  heartbeat timeout. (It leaves what a lost peer leaves: checkpoint 4, and process 0's lease
  of a process that has ended; the test above starts such a run again.)"""
  env = _env(UNITSFACE_NO_XLA_FLAGS="1")
  # 5 s: the test waits that long with one core idle.
  flags = [*TINY, "--config.checkpoint_every_steps=4", "--config.step_timeout_s=5"]
  stop = ["--config.debug.signal_after_step=5", "--config.debug.signal=SIGSTOP"]
  workdir, port = tmp_path / "run", free_port()
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(
      [sys.executable, str(RUN), "2", SMOKE, f"--workdir={workdir}", *flags,
       *(stop if i else ()), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=logs[i])
           for i in range(2)]
  try:
    _, status = os.waitpid(procs[1].pid, os.WUNTRACED)
    stopped = time.monotonic()
    assert os.WIFSTOPPED(status), status
    code0 = procs[0].wait(timeout=300)
    elapsed = time.monotonic() - stopped
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs[0].seek(0)
  err0 = logs[0].read()
  assert code0 == run_control.HUNG_STATUS, err0[-3000:]
  lines = [l for l in err0.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith("error: step 6 has not finished after "), err0[-3000:]
  assert f"on {socket.gethostname()}, process 0 of 2" in lines[0] and "Traceback" not in err0
  assert elapsed <= 5 + 10, elapsed
  assert steps(workdir) == [4]


@pytest.mark.slow
def test_both_processes_of_a_run_stop_on_a_workdir_another_run_holds(tmp_path, free_port):
  """Process 0 finds the lease of a live run (this test's process); the other process learns
  it through jax.distributed's key-value store: both stop in the same one line, exit 2,
  before touching the workdir."""
  import json  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), "token": "the other run"}
  (workdir / "lease.json").write_text(json.dumps(holder))
  results = run_two_processes(workdir, free_port(), *TINY, env=_env(UNITSFACE_NO_XLA_FLAGS="1"),
                              timeout=300)
  lines = []
  for code, err in results:
    assert code == 2, err[-3000:]
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    lines.append(errors[0])
  assert lines[0] == lines[1] and lines[0].startswith(
      f"error: {workdir} is in use by another run (process {os.getpid()} on "), lines
  assert sorted(p.name for p in workdir.iterdir()) == ["lease.json"]
  assert json.loads((workdir / "lease.json").read_text()) == holder
