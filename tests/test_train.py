"""Training end to end on the bundled demo faces: logs, checkpoints, resume, devices, hosts.

Every run is a child process (``tests/train_run.py``) so it can have its own simulated device
count and be killed. ``configs/demo.py:smoke`` is 16 steps of batch 8 on 64 images: CosFace
alone in epoch 0 (steps 1-8), CosFace + USS in epoch 1 (steps 9-16), checkpoints every 4.
"""

import atexit
import json
import os
import pathlib
import random
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "train_run.py"
SMOKE = "--config=configs/demo.py:smoke"


# One compilation cache for every run of this module: the runs compile the same few programs
# (the smoke step on 1, 2 and 4 devices), and a cached executable is the same program, so
# results stay bitwise comparable. Without it this module is most of the suite's time.
_CACHE = tempfile.mkdtemp(prefix="unitsface_test_jax_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=_CACHE, **extra)
  env.pop("XLA_FLAGS", None)
  return env


def start(devices, workdir, *flags, env=None):
  return subprocess.Popen([sys.executable, str(RUN), str(devices), SMOKE, f"--workdir={workdir}",
                           *flags], cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


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
  lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
           if l]
  return {m["step"]: m for m in lines if "loss" in m}  # a resumed step overwrites


def steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def saved_state(workdir, step):
  """Every array of a checkpoint's state, keyed by path (restored on this process's CPU)."""
  import jax  # the test process has one CPU device; the run may have saved from several
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
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


def wait_for_checkpoint(proc, workdir, at_least, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s >= at_least for s in steps(workdir)):
      return
    if proc.poll() is not None:
      pytest.fail(f"run ended before checkpoint {at_least}: {proc.stderr.read()[-3000:]}")
    time.sleep(0.2)
  proc.kill()
  pytest.fail(f"no checkpoint >= {at_least} in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted one-device smoke run."""
  workdir = tmp_path_factory.mktemp("reference")
  ok(run(1, workdir))
  return workdir


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


def test_export_from_workdir_equals_the_checkpoint(reference, tmp_path):
  out = tmp_path / "final.npz"
  proc = subprocess.run([sys.executable, "-m", "unitsface_jax.export", f"--workdir={reference}",
                         "--format=npz", f"--out={out}"], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  ok(proc)
  state = saved_state(reference, 16)
  weights = np.load(out)
  # conv1.weight (OIHW) is the checkpoint's HWIO stem kernel, bit for bit.
  np.testing.assert_array_equal(weights["conv1.weight"],
                                state["/params/backbone/conv1/kernel/value"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(weights["features.running_mean"],
                                state["/model_state/features/mean/value"])


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  workdir = tmp_path / "interrupted"
  rng = random.Random(0)
  # SIGTERM (preemption) after the first checkpoint: saves where it is and exits 0.
  proc = start(1, workdir)
  wait_for_checkpoint(proc, workdir, 4)
  time.sleep(rng.uniform(0, 2))
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=300)
  assert proc.returncode == 0
  first = steps(workdir)
  assert first and max(first) < 16
  # SIGKILL at a random moment after the next checkpoint: nothing is saved on the way out.
  proc = start(1, workdir)
  wait_for_checkpoint(proc, workdir, max(first) + 1)
  time.sleep(rng.uniform(0, 3))
  proc.kill()
  proc.communicate()
  ok(run(1, workdir))
  assert steps(workdir)[-1] == 16
  want, got = saved_state(reference, 16), saved_state(workdir, 16)
  assert want.keys() == got.keys()
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert not different, different[:10]  # weights, memory bank, optimizer state, b, step


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


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  # 8 steps, USS from step 5. The two runs agree to 1e-5 only if they reduce in the same
  # order: both use jax.distributed's gloo collectives, XLA's default convolutions, full width.
  flags = ["--config.data.max_examples=32", "--config.checkpoint_every_steps=4",
           "--config.model.width=64"]
  env = _env(UNITSFACE_NO_XLA_FLAGS="1")
  one = tmp_path / "one"
  ok(run(4, one, *flags, f"--coordinator_address=127.0.0.1:{_free_port()}",
         "--num_processes=1", "--process_id=0", env=env))
  two = tmp_path / "two"
  port = _free_port()
  procs = [start(2, two, *flags, f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}", env=env) for i in range(2)]
  deadline = time.time() + 600
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pytest.fail("a process of the two-process run did not finish in 600 s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p in procs:
    assert p.returncode == 0, p.stderr.read()[-4000:]
  a, b = metrics(one), metrics(two)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s]["loss"] for s in a], [a[s]["loss"] for s in a], rtol=1e-5)


def test_nan_guard_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
  # An absurd learning rate without clipping overflows the weights within a few steps.
  proc = run(1, tmp_path, "--config.optimizer.lr=1e30", "--config.optimizer.clip_norm=0")
  assert proc.returncode != 0
  assert "NaN/inf at step" in proc.stderr
  bad = int(proc.stderr.split("NaN/inf at step ")[1].split()[0])
  assert all(s < bad for s in steps(tmp_path))


def test_resume_where_the_class_padding_changes(tmp_path):
  """40 classes pad to 42 rows on 3 devices and stay 40 on 4: W, M, seen and W's momentum
  are re-padded on restore, and the rows of real classes carry over unchanged."""
  flags = ["--config.batch_size=12"]  # 64 images -> 5 steps per epoch
  ok(run(3, tmp_path, *flags, "--config.num_epochs=1"))
  before = saved_state(tmp_path, 5)
  assert before["/params/head/w"].shape == (42, 512)
  proc = ok(run(4, tmp_path, *flags, "--config.num_epochs=2", "--config.keep_checkpoints=5"))
  assert "resumed from step 5" in proc.stderr
  assert max(metrics(tmp_path)) == 10
  after = saved_state(tmp_path, 10)
  assert after["/params/head/w"].shape == (40, 512)
  assert after["/head_buffers/memory"].shape == (40, 512)
  # seen rows only ever turn on: what was seen before the move still is.
  assert np.all(after["/head_buffers/seen"][before["/head_buffers/seen"][:40]])


def test_evaluate_cli_reads_the_latest_checkpoint(reference, tmp_path):
  from unitsface_jax.data import demo
  proc = subprocess.run([sys.executable, "-m", "unitsface_jax.evaluate",
                         "--protocol=verification", f"--workdir={reference}",
                         f"--data={demo.demo_bin_path()}", f"--out={tmp_path}",
                         "--batch_size=32"], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)
  ok(proc)
  result = json.loads((tmp_path / "verification.json").read_text())["orl_val"]
  assert 0.5 <= result["accuracy"] <= 1.0 and "orl_val" in proc.stdout


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
