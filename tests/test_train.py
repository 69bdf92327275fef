"""Training end to end on the bundled demo faces: logs, checkpoints, resume, devices, hosts.

Every run is a child process (``tests/train_run.py``) so it can have its own simulated device
count and be killed. ``configs/demo.py:smoke`` is 16 steps of batch 8 on 64 images: CosFace
alone in epoch 0 (steps 1-8), CosFace + USS in epoch 1 (steps 9-16), checkpoints every 4.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import tiny_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "train_run.py"
SMOKE = "--config=configs/demo.py:smoke"
# Every run here trains the smoke recipe on the tests' own backbone (tests/tiny_backbone.py,
# registered by tests/train_run.py) with a 32-d embedding: what these tests check (logs,
# checkpoints, resume, devices, hosts) does not depend on the trunk, and tests/test_gcs.py,
# test_pod_failures.py and test_user_errors.py train the same program (one compile in the
# session's cache).
BACKBONE = tiny_backbone.FLAGS

# Trainings, most in child processes: seconds to minutes each (tests/conftest.py starts them
# first).
pytestmark = pytest.mark.slow


def _env(**extra):
  """The runs' environment: CPU, the repository on the path, the session's compilation cache
  and XLA flags (tests/conftest.py: the runs compile the same few programs, the smoke step on
  1, 2 and 4 devices; no device count of the caller's)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
  return env


def start(devices, workdir, *flags, env=None):
  return subprocess.Popen([sys.executable, str(RUN), str(devices), SMOKE, *BACKBONE,
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(devices, workdir, *flags, timeout=600, env=None):
  proc = start(devices, workdir, *flags, env=env)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"training run in {workdir} did not finish in {timeout} s")
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def metrics(workdir):
  lines = [json.loads(l) for l in (epath.Path(workdir) / "metrics.jsonl").read_text().split("\n")
           if l]
  return {m["step"]: m for m in lines if "loss" in m}  # a resumed step overwrites


def steps(workdir):
  d = epath.Path(workdir) / "checkpoints"  # local or gs:// (tests/test_gcs.py)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def saved_state(workdir, step):
  """Every array of a checkpoint's state, keyed by path (restored on this process's CPU)."""
  import jax  # the test process has one CPU device; the run may have saved from several
  path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        meta.tree if hasattr(meta, "tree") else meta,
                        is_leaf=lambda m: hasattr(m, "shape"))
  tree = ckptr.restore(path, target)
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(f"{prefix}/{i}", v)
    else:
      flat[prefix] = np.asarray(node)

  walk("", tree)
  return flat


def smoke_reference(shared_dir):
  """An uninterrupted one-device (narrow) smoke run that evaluates the demo pairs after step
  16, trained once in the session (tests/test_gcs.py compares with it too). Read-only: a test
  that changes it copies it first."""
  return shared_dir("smoke_reference",
                    lambda workdir: ok(run(1, workdir, "--config.eval.every_steps=16")))


@pytest.fixture(scope="session")
def reference(shared_dir):
  return smoke_reference(shared_dir)


def test_smoke_run_logs_losses_threshold_and_checkpoints(reference):
  m = metrics(reference)
  assert sorted(m) == list(range(1, 17))
  for step, line in m.items():
    assert np.isfinite([line["loss"], line["s2c"], line["s2s"], line["threshold_t"]]).all()
    if step <= 8:  # epoch 0: CosFace alone, the memory bank fills
      assert line["s2s"] == 0.0 and line["loss"] == pytest.approx(line["s2c"])
    else:
      assert line["s2s"] > 0.0 and line["loss"] == pytest.approx(line["s2c"] + line["s2s"],
                                                                   rel=1e-5)
  # On the real faces the CosFace loss falls during epoch 0 (mean of the last 3 vs first 3).
  assert np.mean([m[s]["s2c"] for s in (6, 7, 8)]) < 0.5 * np.mean([m[s]["s2c"]
                                                                    for s in (1, 2, 3)])
  assert m[8]["threshold_t"] == 0.0 and m[9]["threshold_t"] != 0.0  # b is set on first use
  assert steps(reference) == [8, 12, 16]  # every 4 steps, the latest 3 kept
  assert (reference / "config.json").exists() and any((reference / "tensorboard").iterdir())


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  """Preempted, crashed, resumed: the state and every step's loss are bitwise those of the
  uninterrupted run. The drill (config.debug) has the run signal itself at a chosen step."""
  workdir = tmp_path / "interrupted"
  # SIGTERM after step 6, between the checkpoints at 4 and 8: saves 6 and exits 0.
  proc = ok(run(1, workdir, "--config.debug.signal_after_step=6"))
  assert "preemption requested: saving step 6 and stopping" in proc.stderr
  assert steps(workdir) == [4, 6] and max(metrics(workdir)) == 6
  assert not (workdir / "lease.json").exists()  # given back
  # SIGKILL after step 14: steps 13 and 14 are lost, checkpoint 12 is the latest.
  proc = run(1, workdir, "--config.debug.signal_after_step=14", "--config.debug.signal=SIGKILL")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
  assert "resumed from step 6" in proc.stderr and "taking over the lease" not in proc.stderr
  assert steps(workdir) == [6, 8, 12] and max(metrics(workdir)) == 14
  killed = json.loads((workdir / "lease.json").read_text())["pid"]
  # Relaunched at once: the killed run's lease names a process that has ended.
  proc = ok(run(1, workdir))
  assert f"its process {killed} on this host has ended" in proc.stderr, proc.stderr[-4000:]
  assert "resumed from step 12" in proc.stderr and steps(workdir) == [8, 12, 16]
  want, got = metrics(reference), metrics(workdir)
  assert {s: (m["loss"], m["data_fingerprint"]) for s, m in got.items()} == {
      s: (m["loss"], m["data_fingerprint"]) for s, m in want.items()}
  want, got = saved_state(reference, 16), saved_state(workdir, 16)
  assert want.keys() == got.keys()
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert not different, different[:10]  # weights, memory bank, optimizer state, b, step


def test_a_second_run_on_the_workdir_is_refused_and_the_first_finishes_as_if_alone(
    reference, tmp_path):
  """Two runs on one workdir (a relaunch while the old job still runs): the second stops
  before it touches anything, in one line naming the first; the first, paused by its drill
  while the second tries, finishes bitwise as the uninterrupted run."""
  workdir = tmp_path / "shared"
  first = start(1, workdir, "--config.eval.every_steps=16", "--config.debug.signal_after_step=6",
                "--config.debug.signal=SIGSTOP")
  try:
    _, status = os.waitpid(first.pid, os.WUNTRACED)  # paused after step 6, checkpoint 4 on disk
    assert os.WIFSTOPPED(status), first.stderr.read()[-4000:]
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    second = run(1, workdir, "--config.eval.every_steps=16")
    assert second.returncode == 2, second.stderr[-4000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-4000:]
    assert errors[0].startswith(f"error: {workdir} is in use by another run (process "
                                f"{first.pid} on {socket.gethostname()}"), errors[0]
    after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    assert after.keys() == before.keys()
    assert [p for p in before if before[p] != after[p]] in ([], [workdir / "lease.json"])
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert first.returncode == 0, err[-4000:]
  assert not (workdir / "lease.json").exists()
  want, got = metrics(reference), metrics(workdir)
  assert {s: m["loss"] for s, m in got.items()} == {s: m["loss"] for s, m in want.items()}
  want, got = saved_state(reference, 16), saved_state(workdir, 16)
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert want.keys() == got.keys() and not different, different[:10]


def test_resume_on_other_device_counts_continues_the_uninterrupted_run(reference, tmp_path):
  """The reference's step-8 checkpoint (1 device, the end of epoch 0) resumed on 2 and on 8
  devices: steps 9-16 train on the batches the uninterrupted run trained on (the same data
  fingerprints: labels, pixels, flips) from the same state (the same losses)."""
  want = metrics(reference)
  for devices in (2, 8):  # more devices than saved it, batch split and not
    workdir = tmp_path / f"resume_on_{devices}"
    shutil.copytree(reference, workdir)
    for step in steps(workdir):
      if step > 8:
        shutil.rmtree(workdir / "checkpoints" / str(step))
    log = workdir / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["step"] <= 8))
    proc = ok(run(devices, workdir))
    assert "resumed from step 8" in proc.stderr
    got = metrics(workdir)
    assert sorted(got) == list(range(1, 17))
    resumed = range(9, 17)
    assert ([got[s]["data_fingerprint"] for s in resumed] ==
            [want[s]["data_fingerprint"] for s in resumed])
    # The first resumed step (the first USS step, where b initialises) starts from the same
    # state and agrees up to float reduction order (~1e-7 relative). After it the weights
    # differ by that rounding, which the loss's curvature (scales of 64) amplifies: the
    # losses of step 10 still agree to ~4e-7, its gradient norm only to ~6e-4, and by step
    # 16 the losses differ by percents, as any two float orders do in training.
    for s, keys in ((9, ("loss", "s2c", "s2s", "threshold_t", "grad_norm")),
                    (10, ("loss", "s2c", "s2s", "threshold_t"))):
      for key in keys:
        np.testing.assert_allclose(got[s][key], want[s][key], rtol=1e-4,
                                   err_msg=f"{devices} devices, step {s} {key}")


def run_two_processes(workdir, port, *flags, env, process_flags=((), ()), timeout=600):
  """One run of two processes of two devices each (jax.distributed on 127.0.0.1:``port``),
  ``process_flags[i]`` added for process i. Returns each process's (returncode, stderr)."""
  # stderr goes to files: a pipe that fills would stall a process, and the other with it in
  # the next collective.
  logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, str(RUN), "2", SMOKE, *BACKBONE, f"--workdir={workdir}", *flags,
       *process_flags[i],
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=logs[i], text=True)
           for i in range(2)]
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    hung = [p.poll() is None for p in procs]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for log in logs:
    log.seek(0)
  results = [(p.returncode, log.read()) for p, log in zip(procs, logs)]
  if any(hung):  # e.g. one process stopped and the other waits for it in a collective
    pytest.fail(f"processes {[i for i, h in enumerate(hung) if h]} of the two-process run did "
                f"not finish in {timeout} s:\n" +
                "\n".join(f"[process {i}] ...{err[-2000:]}" for i, (_, err) in enumerate(results)))
  return results


def test_two_processes_preempted_and_resumed_match_one_process(tmp_path, free_port):
  # 8 steps of batch 4 (one image a device), USS from step 5, on the tests' own backbone. The
  # two runs agree to 1e-5 only if they reduce in the same order: both use jax.distributed's
  # gloo collectives and XLA's default convolutions, at width 64 (at width 4 XLA's CPU
  # convolution sums depend on how many devices share a process: 4e-5 apart by step 8).
  flags = ["--config.model.width=64", "--config.data.max_examples=16",
           "--config.batch_size=4", "--config.checkpoint_every_steps=4",
           "--config.log_every_steps=2"]
  env = _env(UNITSFACE_NO_XLA_FLAGS="1")
  one = tmp_path / "one"
  ok(run(4, one, *flags, f"--coordinator_address=127.0.0.1:{free_port()}",
         "--num_processes=1", "--process_id=0", env=env))
  two = tmp_path / "two"
  # SIGTERM reaches process 1 only, after step 5 (neither a log nor a checkpoint step): it
  # proposes step 5 + run_control.MAX_STEPS_IN_FLIGHT = 7, where both save and exit 0.
  first = run_two_processes(two, free_port(), *flags, env=env,
                            process_flags=((), ["--config.debug.signal_after_step=5"]))
  for returncode, stderr in first:
    assert returncode == 0, stderr[-4000:]
    assert "preemption requested: saving step 7 and stopping" in stderr, stderr[-4000:]
  assert steps(two) == [4, 7]
  for returncode, stderr in run_two_processes(two, free_port(), *flags, env=env):
    assert returncode == 0, stderr[-4000:]
    assert "resumed from step 7" in stderr, stderr[-4000:]
  a, b = metrics(one), metrics(two)
  assert sorted(a) == sorted(b) == [2, 4, 6, 8]
  assert [b[s]["data_fingerprint"] for s in a] == [a[s]["data_fingerprint"] for s in a]
  np.testing.assert_allclose([b[s]["loss"] for s in a], [a[s]["loss"] for s in a], rtol=1e-5)


def test_free_port_is_held_for_the_coordinator_alone(free_port):
  port = free_port()
  with socket.socket() as other, pytest.raises(OSError, match="in use"):  # no one else's ...
    other.bind(("127.0.0.1", port))
  with socket.socket() as server:  # ... but a coordinator (SO_REUSEPORT) binds it and serves
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    server.settimeout(10)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
      server.accept()[0].close()


def test_resume_where_the_class_padding_changes(tmp_path):
  """40 classes pad to 42 rows on 3 devices and stay 40 on 4: W, M, seen and W's momentum
  are re-padded on restore, and the rows of real classes carry over unchanged."""
  flags = ["--config.batch_size=12"]  # 64 images -> 5 steps per epoch
  ok(run(3, tmp_path, *flags, "--config.num_epochs=1"))
  before = saved_state(tmp_path, 5)
  assert before["/params/head/w"].shape == (42, 32)
  proc = ok(run(4, tmp_path, *flags, "--config.num_epochs=2", "--config.keep_checkpoints=5"))
  assert "resumed from step 5" in proc.stderr
  assert max(metrics(tmp_path)) == 10
  after = saved_state(tmp_path, 10)
  assert after["/params/head/w"].shape == (40, 32)
  assert after["/head_buffers/memory"].shape == (40, 32)
  # seen rows only ever turn on: what was seen before the move still is.
  assert np.all(after["/head_buffers/seen"][before["/head_buffers/seen"][:40]])


def test_evaluate_cli_reads_the_latest_checkpoint(reference, tmp_path, capsys):
  """``unitsface_jax.evaluate``'s main, in this process (tests/command_lines.py), where the
  tests' backbone is registered."""
  import command_lines
  from unitsface_jax.data import demo
  capsys.readouterr()
  status = command_lines.run_main(
      "unitsface_jax.evaluate", "--protocol=verification", f"--workdir={reference}",
      f"--data={demo.demo_bin_path()}", f"--out={tmp_path}", "--batch_size=64")
  out = capsys.readouterr().out
  assert not status
  result = json.loads((tmp_path / "verification.json").read_text())["orl_val"]
  # What the run logged for its step 16 (the same batch size: config.eval.batch_size).
  logged = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
  during = {m["step"]: m["eval/orl_val/accuracy"] for m in logged
            if "eval/orl_val/accuracy" in m}
  assert result["accuracy"] == during[16] and "orl_val" in out


def test_data_fingerprint_depends_on_pixels_labels_order_and_mirroring():
  import jax
  from unitsface_jax import train
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
  labels = np.array([3, 1, 4, 1], np.int32)
  fingerprint = jax.jit(train.data_fingerprint)
  one_pixel = images.copy()
  one_pixel[2, 50, 60, 1] ^= 1
  mirrored = images.copy()
  mirrored[1] = mirrored[1, :, ::-1]
  swapped = [1, 0, 2, 3]
  batches = {"batch": (images, labels), "same labels, one pixel": (one_pixel, labels),
             "same labels, one image mirrored": (mirrored, labels),
             "same images, other labels": (images, np.array([3, 1, 4, 2], np.int32)),
             "two examples swapped": (images[swapped], labels[swapped])}
  digests = {name: int(fingerprint(*batch)) for name, batch in batches.items()}
  assert len(set(digests.values())) == len(digests), digests
  assert all(0 <= d < 999_983 for d in digests.values())
  assert int(fingerprint(images.copy(), labels.copy())) == digests["batch"]


def test_compilation_cache_goes_to_the_workdir_unless_one_is_set(tmp_path):
  import jax
  import ml_collections
  from unitsface_jax import train
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    off = ml_collections.ConfigDict({"compilation_cache": False})
    assert train.use_compilation_cache(off, tmp_path) is None
    assert jax.config.jax_compilation_cache_dir is None
    on = ml_collections.ConfigDict({"compilation_cache": True})
    assert train.use_compilation_cache(on, tmp_path) == str(tmp_path / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    # A directory the user chose is kept.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert train.use_compilation_cache(on, tmp_path / "other") == str(tmp_path / "mine")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_the_initialiser_compiled_at_o1_gives_the_default_compiles_parameters():
  """``init_state`` compiles at LLVM -O1 on the CPU (for its compile time): the state is
  bitwise the one the default optimisation level (XLA's -O3, asked for by name: the session
  compiles at -O0) gives, for the backbone, the head (with a class bias and statistics:
  AdaFace) and the optimiser."""
  import jax
  from configs import demo
  from unitsface_jax import optim
  from unitsface_jax import parallel
  from unitsface_jax import train
  config = demo.get_config("smoke,adaface")
  config.model.name = tiny_backbone.IRESNET_NAME  # the IR trunk's layers, one block a stage
  config.model.width = 4
  mesh = parallel.mesh_from_config(config)
  tx = optim.make(config, 2)
  _, _, state = train.init_state(config, mesh, tx, jax.random.key(3))
  _, _, _, shardings, create = train._state_layout(config, mesh, tx)  # pylint: disable=protected-access
  key = jax.random.key(3)
  want = jax.jit(lambda k: create(k)[2], out_shardings=shardings).lower(key).compile(
      {"xla_backend_optimization_level": 3})(key)
  got, want = jax.tree.leaves(state), jax.tree.leaves(want)
  assert len(got) == len(want) > 50
  different = [i for i, (g, w) in enumerate(zip(got, want))
               if np.asarray(g).tobytes() != np.asarray(w).tobytes()]
  assert not different, different
