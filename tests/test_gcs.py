"""gs:// paths against a real GCS server on 127.0.0.1 (fake-gcs-server, ``tests/gcs_server.py``):
the extra's one-line check, the data sources and the request count of a RecordIO epoch, and
training, export and evaluation with data and workdir in the bucket; and storage that fails
under a run: a bucket that goes away, a local disk that fills up (``tests/full_disk_run.py``)."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import conftest
import numpy as np
import pytest
from etils import epath

import tiny_backbone
from unitsface_jax import storage
from unitsface_jax.data import demo, pipeline, recordio, sources

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_require_gcs_names_the_field_and_the_extra(monkeypatch):
  storage.require_gcs_all({"--workdir": "/tmp/run", "config.eval.bins": [], "--params": None})
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the extra were not installed
  storage.require_gcs("/local/path", "config.data.path")  # local paths need nothing
  with pytest.raises(storage.MissingExtraError) as e:
    storage.require_gcs_all({"--workdir": "/tmp/run",
                             "config.eval.bins": ["/a.bin", "gs://b/lfw.bin"]})
  assert str(e.value) == ("config.eval.bins[1] = 'gs://b/lfw.bin' is in Google Cloud Storage, "
                          "which needs the gcs extra: pip install 'unitsface_jax[gcs]'")


@pytest.mark.slow
def test_main_with_a_gs_path_and_no_gcsfs_stops_in_one_line_naming_the_extra(tmp_path):
  code = ("import sys; sys.modules['gcsfs'] = None; from unitsface_jax import main; "
          "main.run(sys.argv)")
  proc = subprocess.run(
      [sys.executable, "-c", code, "--config=configs/demo.py:smoke",
       "--config.data.path=gs://bucket/glint360k", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.data.path = 'gs://bucket/glint360k' is in Google Cloud Storage, which "
      "needs the gcs extra: pip install 'unitsface_jax[gcs]'")
  assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def _epoch(source):
  """One shuffled epoch of the demo set in batches of 32, read by two threads of this process
  (sharing the reader: its block cache, one remote filesystem)."""
  config = pipeline.PipelineConfig(batch_size=32, seed=3, num_epochs=1, normalize=False,
                                   read_threads=2)
  return list(pipeline.make_batches(source, config))


def test_a_recordio_epoch_from_gcs_is_the_local_epoch_at_one_request_per_block(
    gcs, demo_on_gcs):
  local = _epoch(sources.RecordIOSource(demo.demo_path()))
  rec = r"^/download/.*/o/demo%2Ftrain\.rec\?"  # the media reads of the .rec
  before = gcs.requests("GET", rec)
  remote = sources.RecordIOSource(demo_on_gcs)
  got = _epoch(remote)
  requests = gcs.requests("GET", rec) - before
  records = len(got) * 32
  assert records == 320 and remote.reader.file_size > 1 << 20  # more than one 1 MiB block
  for a, b in zip(local, got):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # The whole file is one 8 MiB block: read once, whatever the order.
  assert 1 <= requests <= records / 64, requests
  # With 256 KiB blocks, six of them; a file larger than the cache: one request per record
  # (the 64 KiB of its first read hold any of these records whole).
  for cache_bytes, block_bytes, most in ((1 << 30, 1 << 18, 6), (0, 1 << 20, records)):
    source = sources.RecordIOSource(demo_on_gcs)
    source.reader = recordio.RecordIOReader(f"{demo_on_gcs}/train.rec",
                                            f"{demo_on_gcs}/train.idx",
                                            cache_bytes=cache_bytes, block_bytes=block_bytes)
    before = gcs.requests("GET", rec)
    got = _epoch(source)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(local, got))
    assert gcs.requests("GET", rec) - before == most


def test_an_image_folder_on_gcs_reads_as_on_disk(gcs, data_dir, tmp_path):
  local = tmp_path / "faces"
  for c in range(2):
    (local / f"id{c}").mkdir(parents=True)
  rec = sources.RecordIOSource(demo.demo_path())
  for i in range(4):
    image = rec[i]["image"]
    (local / f"id{i % 2}" / f"{i}.jpg").write_bytes(image)
  import gcs_server  # pylint: disable=g-import-not-at-top
  gcs_server.upload_tree(local, "gs://test/faces")
  want, got = sources.ImageFolderSource(local), sources.ImageFolderSource("gs://test/faces")
  assert got.class_names == want.class_names and got.files == want.files
  assert [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))]



def test_metrics_jsonl_on_gcs_keeps_every_line_across_writers(gcs):
  """An object store cannot append: each write replaces the object, so the writer must carry
  what an earlier run wrote and every line since."""
  from unitsface_jax import metric_writer  # pylint: disable=g-import-not-at-top
  workdir = "gs://test/runs/metrics"
  for steps in ((1, 2, 3), (3, 4)):  # a resumed run writes step 3 again, then goes on
    writer = metric_writer.MetricWriter(workdir, tensorboard=False)
    for step in steps:
      writer.write(step, {"loss": 1.0 / step})
    writer.close()
  lines = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 3, 4]

def test_an_arrayrecord_set_on_gcs_reads_as_on_disk(gcs, tmp_path):
  """The ArrayRecord conversion (data/prepare.py) read from the bucket: TFDS reads its metadata
  through gcsfs, ArrayRecord its records through riegeli's own GCS client."""
  import gcs_server  # pylint: disable=g-import-not-at-top
  from unitsface_jax.data import prepare  # pylint: disable=g-import-not-at-top
  built = pathlib.Path(prepare.prepare(demo.demo_path(), tmp_path / "tfds")["dir"])
  gcs_server.upload_tree(built, "gs://test/demo_tfds")
  want, got = sources.TFDSSource(built), sources.TFDSSource("gs://test/demo_tfds")
  assert len(got) == len(want) == 320 and got.num_classes == want.num_classes == 40
  for i in (0, 17, 319):
    assert got[i]["label"] == want[i]["label"] and got[i]["image"] == want[i]["image"]

# ------------------------------------------------------------------------------------------
# Training, export and evaluation with data and workdir in the bucket (child processes).
# ------------------------------------------------------------------------------------------

# The smoke run (16 steps of batch 8 on 64 demo images, checkpoints every 4) on the tests' own
# backbone, as tests/test_train.py's runs (for the commands started here directly): what these
# tests check is the storage, not the model.
TINY = list(tiny_backbone.FLAGS)


def _fresh() -> None:
  """Forgets the listings gcsfs keeps in this process (epath's instance): the runs wrote to
  the bucket from other processes since."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


@pytest.fixture(scope="session")
def tiny_reference(shared_dir):
  """The uninterrupted tiny smoke run, data and workdir on the local disk: tests/test_train.py's
  reference (the same flags, and an evaluation at step 16 that changes no weight)."""
  import test_train  # pylint: disable=g-import-not-at-top  # its runner and readers
  return test_train.smoke_reference(shared_dir)


@pytest.fixture(scope="module")
def gs_run(gcs, demo_on_gcs, tiny_reference):
  """The tiny smoke run with data and workdir in the bucket, SIGKILLed after step 6 (its
  checkpoint 4 written) and run again to the end. The first run keeps its compiled programs
  in gs://.../jax_cache (config.compilation_cache), the second loads them from there."""
  import test_train  # pylint: disable=g-import-not-at-top
  workdir = "gs://test/runs/killed"
  env = _train_env()
  # This run keeps its own cache, in the workdir; of every program, as the session's (its
  # minimum compile time of 0 s stays: at the session's LLVM -O0 no program of this run
  # takes JAX's default of 1 s).
  env.pop(conftest.SESSION_CACHE_DIR_VARIABLE, None)
  flags = [*TINY, f"--config.data.path={demo_on_gcs}"]
  proc = test_train.run(1, workdir, *flags, "--config.debug.signal_after_step=6",
                        "--config.debug.signal=SIGKILL", env=env)
  assert proc.returncode == -9, proc.stderr[-4000:]
  _fresh()
  first = {"steps": test_train.steps(workdir), "metrics": sorted(test_train.metrics(workdir)),
           "cache": [p.name for p in (epath.Path(workdir) / "jax_cache").iterdir()]}
  second = test_train.ok(test_train.run(1, workdir, *flags, env=env))
  _fresh()
  return workdir, first, second


@pytest.mark.slow
def test_killed_run_on_gcs_resumes_to_the_local_runs_weights_bitwise(gs_run, tiny_reference):
  import test_train  # pylint: disable=g-import-not-at-top
  workdir, first, second = gs_run
  assert first["steps"] == [4] and first["metrics"] == list(range(1, 7))
  assert any(name.endswith("-cache") for name in first["cache"]), first["cache"]
  assert "resumed from step 4 in gs://test/runs/killed/checkpoints" in second.stderr
  # The killed run's lease, left in the bucket, names a process that has ended: taken over.
  assert "taking over the lease of gs://test/runs/killed" in second.stderr
  assert "on this host has ended" in second.stderr
  assert not epath.Path(f"{workdir}/lease.json").exists()  # given back at the end
  assert test_train.steps(workdir) == [8, 12, 16]
  want, got = test_train.metrics(tiny_reference), test_train.metrics(workdir)
  assert {s: (m["loss"], m["data_fingerprint"]) for s, m in got.items()} == {
      s: (m["loss"], m["data_fingerprint"]) for s, m in want.items()}
  want, got = test_train.saved_state(tiny_reference, 16), test_train.saved_state(workdir, 16)
  assert want.keys() == got.keys()
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert not different, different[:10]
  config = json.loads((epath.Path(workdir) / "config.json").read_text())
  assert config["data"]["path"] == "gs://test/demo"
  events = list((epath.Path(workdir) / "tensorboard").iterdir())
  assert events and all(e.stat().length > 0 for e in events)


def _train_env():
  """The environment of tests/test_train.py's runs (its compilation cache, CPU, PYTHONPATH)."""
  import test_train  # pylint: disable=g-import-not-at-top
  return test_train._env()  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_second_run_on_a_gcs_workdir_is_refused_and_the_first_finishes_as_if_alone(
    gcs, tiny_reference):
  """tests/test_train.py's two runs on one workdir, with the workdir in the bucket: the lease
  object is created with ifGenerationMatch=0, so the second run finds it and stops in one
  line, exit 2; the first, paused by its drill meanwhile, ends with the local run's weights."""
  import test_train  # pylint: disable=g-import-not-at-top
  workdir = "gs://test/runs/shared"
  env = _train_env()
  first = test_train.start(1, workdir, *TINY, "--config.debug.signal_after_step=6",
                           "--config.debug.signal=SIGSTOP", env=env)
  try:
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), first.stderr.read()[-4000:]
    second = test_train.run(1, workdir, *TINY, env=env)
    assert second.returncode == 2, second.stderr[-4000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-4000:]
    assert errors[0].startswith(f"error: {workdir} is in use by another run (process "
                                f"{first.pid} on "), errors[0]
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert first.returncode == 0, err[-4000:]
  _fresh()
  assert not epath.Path(f"{workdir}/lease.json").exists()
  want, got = test_train.saved_state(tiny_reference, 16), test_train.saved_state(workdir, 16)
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert want.keys() == got.keys() and not different, different[:10]


@pytest.mark.slow
def test_export_and_evaluate_read_and_write_gcs(gs_run, tmp_path, capsys):
  """The export and evaluation command lines' mains, in this process (tests/command_lines.py),
  where the tests' backbone is registered."""
  import command_lines  # pylint: disable=g-import-not-at-top
  import test_train  # pylint: disable=g-import-not-at-top
  workdir = gs_run[0]
  out = "gs://test/exports/final.npz"
  assert not command_lines.run_main("unitsface_jax.export.__main__", f"--workdir={workdir}",
                                    "--format=npz", f"--out={out}")
  _fresh()
  weights = np.load(io.BytesIO(epath.Path(out).read_bytes()))
  state = test_train.saved_state(workdir, 16)
  np.testing.assert_array_equal(weights["conv1.weight"],
                                state["/params/backbone/conv1/kernel/value"].transpose(3, 2, 0, 1))
  bin_url = "gs://test/bins/orl_val.bin"
  epath.Path(bin_url).write_bytes(demo.demo_bin_path().read_bytes())
  reports = "gs://test/reports"
  results = {}
  for source in (f"--workdir={workdir}", f"--params={out}"):
    capsys.readouterr()
    assert not command_lines.run_main("unitsface_jax.evaluate", "--protocol=verification",
                                      source, f"--data={bin_url}", f"--out={reports}",
                                      "--batch_size=64")
    assert "orl_val" in capsys.readouterr().out
    _fresh()
    results[source] = json.loads((epath.Path(reports) / "verification.json").read_text())
  assert (epath.Path(reports) / "verification_roc.png").read_bytes()[:4] == b"\x89PNG"
  # The checkpoint and its export are the same weights: the same accuracy, to the bit.
  first, second = results.values()
  assert first["orl_val"]["accuracy"] == second["orl_val"]["accuracy"]


@pytest.mark.slow
def test_two_processes_train_from_one_gcs_recordio_into_one_gcs_workdir(gcs, demo_on_gcs,
                                                                        free_port):
  import test_train  # pylint: disable=g-import-not-at-top
  workdir = "gs://test/runs/two_processes"
  flags = [*tiny_backbone.FLAGS, f"--config.data.path={demo_on_gcs}",
           "--config.data.max_examples=32"]
  # Without the CPU tuning, as tests/test_pod_failures.py's two-process runs, whose settings
  # that shape the step (the tests' own backbone, 32 examples, 2 x 2 devices) these share:
  # the session's compilation cache can serve both.
  env = test_train._env(UNITSFACE_NO_XLA_FLAGS="1")  # pylint: disable=protected-access
  for returncode, stderr in test_train.run_two_processes(workdir, free_port(), *flags, env=env):
    assert returncode == 0, stderr[-4000:]
  _fresh()
  assert test_train.steps(workdir) == [4, 8]
  assert sorted(test_train.metrics(workdir)) == list(range(1, 9))
  # Each process saved its own data-iterator state beside the shared arrays.
  data = [p.name for p in (epath.Path(workdir) / "checkpoints" / "8" / "data").iterdir()]
  assert sorted(n for n in data if n.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"], data


@pytest.mark.slow
def test_a_save_into_a_bucket_that_went_away_stops_naming_the_step_and_a_rerun_resumes(
    tmp_path, tiny_reference):
  """The workdir's bucket disappears between checkpoints 4 and 8 (its folder on the server is
  moved away: every write answers 404): the run stops with one line naming checkpoint 8;
  checkpoint 4 is untouched; with the bucket back, a rerun resumes from it and ends with the
  weights of the uninterrupted run."""
  import gcs_server  # pylint: disable=g-import-not-at-top
  import test_train  # pylint: disable=g-import-not-at-top
  root = tmp_path / "root"
  server = gcs_server.GcsServer(root, gcs_server.unused_port())
  try:
    server.start()
    server.create_bucket("run")
    env = {**_train_env(), **server.env()}
    workdir = "gs://run/smoke"
    # Logged only at step 16: the first write after step 5 is the save of step 8.
    flags = [*TINY, "--config.log_every_steps=16"]
    with open(tmp_path / "stderr", "w+") as log:
      proc = subprocess.Popen(
          [sys.executable, str(test_train.RUN), "1", test_train.SMOKE, f"--workdir={workdir}",
           *flags, "--config.debug.signal_after_step=5", "--config.debug.signal=SIGSTOP"],
          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
      try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops after step 5
        if not os.WIFSTOPPED(status):
          log.seek(0)
          pytest.fail(f"the run ended ({status}) before its drill stopped it: {log.read()[-4000:]}")
        saved = root / "run" / "smoke" / "checkpoints" / "4"
        before = {p: p.read_bytes() for p in sorted(saved.rglob("*")) if p.is_file()}
        assert saved / "commit_success.txt" in before
        os.rename(root / "run", root / "run.away")  # the bucket is gone
        proc.send_signal(signal.SIGCONT)
        returncode = proc.wait(timeout=600)
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
      log.seek(0)
      stderr = log.read()
    assert returncode == 1, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0].startswith(
        "error: saving checkpoint 8 to gs://run/smoke/checkpoints failed ("), stderr[-4000:]
    assert errors[0].endswith("the checkpoints before it are kept"), stderr[-4000:]
    os.rename(root / "run.away", root / "run")
    after = {p: p.read_bytes() for p in sorted(saved.rglob("*")) if p.is_file()}
    assert after == before
    proc = test_train.ok(test_train.run(1, workdir, *flags, env=env))
    assert "resumed from step 4" in proc.stderr
    want = test_train.saved_state(tiny_reference, 16)
    # The server keeps each object as a file at its name: the bucket's folder is the workdir.
    got = test_train.saved_state(root / "run" / "smoke", 16)
    different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
    assert want.keys() == got.keys() and not different, different[:10]
  finally:
    server.stop()


@pytest.mark.slow
def test_a_full_disk_stops_the_save_in_one_line_and_the_next_start_resumes(tiny_reference,
                                                                            tmp_path):
  """A local file system that fills up (here a 64 MiB tmpfs, filled while the run is paused
  after step 5): the save of step 8 fails, one line naming the step, the path and the cause,
  exit 1, checkpoint 4 untouched; the next start removes the half-written save, resumes from
  4 and ends with the uninterrupted run's weights, bit for bit."""
  import test_train  # pylint: disable=g-import-not-at-top
  if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                    capture_output=True, check=False).returncode != 0:
    pytest.skip("this kernel refuses unprivileged user and mount namespaces (unshare), which "
                "the test needs to mount a small tmpfs")
  mount = tmp_path / "mount"
  mount.mkdir()
  # Logged at step 16 only: the first write after the pause is the save of step 8.
  command = [sys.executable, str(test_train.RUN), "1", test_train.SMOKE, *TINY,
             "--config.log_every_steps=16"]
  proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable,
                         str(ROOT / "tests" / "full_disk_run.py"), str(mount), str(tmp_path),
                         *command],
                        cwd=ROOT, env=_train_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  first = (tmp_path / "first.err").read_text()
  second = (tmp_path / "second.err").read_text()
  assert result["stopped"] and result["free_bytes"] < 1 << 16, result
  assert result["first"] == 1, first[-4000:]
  errors = [line for line in first.splitlines() if line.startswith("error: ")]
  assert errors == [f"error: saving checkpoint 8 to {mount}/run/checkpoints failed (No space left "
                    "on device [errno 28]); the checkpoints before it are kept"], first[-4000:]
  assert "Traceback" not in first and len(first.splitlines()) < 40, first[-4000:]
  assert result["checkpoint_4_unchanged"], result
  assert result["left"] == ["4", "8.orbax-checkpoint-tmp"], result
  assert result["second"] == 0, second[-4000:]
  assert "removing 8.orbax-checkpoint-tmp in" in second and "resumed from step 4" in second
  workdir = tmp_path / "run"
  assert test_train.steps(workdir) == [8, 12, 16]
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  want, got = test_train.saved_state(tiny_reference, 16), test_train.saved_state(workdir, 16)
  different = [k for k in want if want[k].tobytes() != got[k].tobytes()]
  assert want.keys() == got.keys() and not different, different[:10]
