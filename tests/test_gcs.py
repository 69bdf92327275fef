"""gs:// paths against a real GCS server on 127.0.0.1 (fake-gcs-server, ``tests/gcs_server.py``):
the extra's one-line check, the data sources and the request count of a RecordIO epoch, and
training, export and evaluation with data and workdir in the bucket."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

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


@pytest.fixture(scope="module")
def demo_on_gcs(gcs):
  """The bundled demo RecordIO set, uploaded to gs://test/demo."""
  url = "gs://test/demo"
  for name in ("train.rec", "train.idx", "property"):
    (epath.Path(url) / name).write_bytes((demo.demo_path() / name).read_bytes())
  return url


def _epoch(source):
  """One shuffled epoch of the demo set in batches of 32, read in this process."""
  config = pipeline.PipelineConfig(batch_size=32, seed=3, num_epochs=1, normalize=False)
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
