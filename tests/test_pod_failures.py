"""The failures a preemptible pod run meets: the host running ahead of the device, a peer
process lost mid-run, an unreadable latest checkpoint. Tiny smoke runs in child processes
(``tests/train_run.py``), as in tests/test_train.py."""

import pathlib
import signal

import jax
import jax.numpy as jnp
import pytest

import command_lines
from test_launch import launch_local
from test_train import _env, metrics, ok, run, run_two_processes, steps
from unitsface_jax import run_control
from unitsface_jax.data import demo as demo_data

# 8 steps of batch 8 (4 an epoch), checkpoints at 4, 6, 8; a trunk of width 4.
TINY = ["--config.model.width=4", "--config.model.num_features=32",
        "--config.data.max_examples=32", "--config.checkpoint_every_steps=2"]


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


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
          key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[:1000])


def _tree(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_unreadable_checkpoints_are_skipped_kept_aside_and_saved_again(tmp_path, capsys,
                                                                       caplog):
  workdir = tmp_path / "run"
  ok(run(1, workdir, *TINY))
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
def test_no_readable_checkpoint_stops_naming_the_directory(tmp_path, capsys):
  workdir = tmp_path / "run"
  ok(run(1, workdir, *TINY, "--config.num_epochs=1"))
  ckpts = workdir / "checkpoints"
  for step in steps(workdir):
    _truncate_largest_array_file(ckpts / str(step))
  proc = run(1, workdir, *TINY)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: no readable checkpoint in {ckpts} (steps [4, 2] cannot be read")
  assert "Traceback" not in proc.stderr and steps(workdir) == [2, 4]  # nothing moved
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
  code, err, left = launch_local(tmp_path, workdir, *flags, devices=2, env=env, timeout=300)
  logs = [(tmp_path / f"unitsface_proc{i}.log").read_text() for i in range(2)]
  assert code == 0 and not left, (err, [log[-3000:] for log in logs])
  for log in logs:
    assert "Connecting to JAX distributed service on 127.0.0.1:" in log
    assert "resumed from step 4" in log
  assert steps(workdir) == [4, 8] and max(metrics(workdir)) == 8
