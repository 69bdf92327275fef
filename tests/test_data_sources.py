"""Sources share one interface; prepare converts RecordIO/folders to TFDS ArrayRecord."""

import subprocess
import sys

import numpy as np
import pytest
import simplejpeg

from unitsface_jax.data import DataError, sources, tfds_builder


def test_image_folder_classes_sorted_and_pgm_decodes(data_dir):
  src = sources.ImageFolderSource(data_dir / "orl_faces")
  assert src.class_names == ["s1", "s25", "s3"] and src.num_classes == 3  # sorted by name
  assert len(src) == 30
  assert src.files[10].startswith("s25/") and src[10]["label"] == 1
  image = sources.decode_image(src[0]["image"], src.locate(0))  # PGM: Pillow path
  assert image.shape == (112, 92, 3) and image.dtype == np.uint8


def test_decode_image_rejects_garbage_with_location():
  with pytest.raises(DataError, match=r"file x\.rec, record 4, byte offset 40: undecodable"):
    sources.decode_image(b"\x00\x01garbage", {"path": "x.rec", "record": 4, "offset": 40})


def test_synthetic_source_is_deterministic_jpeg():
  a = sources.SyntheticSource(100, 7, pool_size=4, seed=1)
  b = sources.SyntheticSource(100, 7, pool_size=4, seed=1)
  assert len(a) == 100 and a.num_classes == 7 and a[9]["label"] == 2
  assert a[5]["image"] == b[5]["image"] and a[5]["image"] != a[6]["image"]
  assert simplejpeg.decode_jpeg(a[5]["image"]).shape == (112, 112, 3)
  with pytest.raises(IndexError):
    a[100]


def test_make_source_auto_detects(data_dir):
  assert isinstance(sources.make_source("auto", data_dir / "orl_112"), sources.RecordIOSource)
  assert isinstance(sources.make_source("auto", data_dir / "orl_faces"),
                    sources.ImageFolderSource)
  with pytest.raises(ValueError, match="unknown source kind"):
    sources.make_source("lmdb", data_dir)


@pytest.mark.slow
def test_prepare_cli_recordio_to_array_record_round_trip(data_dir, tmp_path):
  """python -m unitsface_jax.data.prepare: same JPEG bytes and labels, in source order."""
  out = tmp_path / "tfds"
  run = subprocess.run(
      [sys.executable, "-m", "unitsface_jax.data.prepare",
       f"--source={data_dir / 'lfw62_112_head4'}", f"--out={out}", "--name=casia_webface"],
      capture_output=True, text=True, check=True, timeout=120)
  assert "wrote 40 images of 4 classes" in run.stdout
  converted = sources.TFDSSource(tfds_builder.builder_dir(out, "casia_webface"))
  original = sources.RecordIOSource(data_dir / "lfw62_112_head4")
  assert len(converted) == 40 and converted.num_classes == 4
  for i in range(40):
    assert bytes(converted[i]["image"]) == original[i]["image"]
    assert converted[i]["label"] == original[i]["label"]


def test_prepare_image_folder_reencodes_pgm(data_dir, tmp_path):
  from unitsface_jax.data import prepare  # pylint: disable=g-import-not-at-top
  result = prepare.prepare(data_dir / "orl_faces", tmp_path, "custom")
  assert (result["images"], result["classes"], result["skipped"]) == (30, 3, 0)
  converted = sources.TFDSSource(result["dir"])
  image = simplejpeg.decode_jpeg(bytes(converted[0]["image"]))
  assert image.shape == (112, 92, 3)


@pytest.mark.slow
def test_prepare_skips_bad_records_and_pipeline_reads_the_result(tmp_path):
  from unitsface_jax.data import pipeline, prepare, recordio  # pylint: disable=g-import-not-at-top
  good = simplejpeg.encode_jpeg(np.full((112, 112, 3), 50, np.uint8))
  images = [good] * 6
  images[4] = b"\xff\xd8\xff" + b"broken" * 5
  recordio.write_insightface(tmp_path / "rec", [(i // 3, im) for i, im in enumerate(images)], 2)
  with pytest.raises(DataError, match=r"record 5, .*undecodable JPEG"):
    prepare.prepare(tmp_path / "rec", tmp_path / "strict", "custom")
  result = prepare.prepare(tmp_path / "rec", tmp_path / "tfds", "custom", skip_bad_records=True)
  assert (result["images"], result["classes"], result["skipped"]) == (5, 2, 1)
  converted = sources.TFDSSource(result["dir"])
  config = pipeline.PipelineConfig(batch_size=5, shuffle=False, random_flip=False)
  batch = next(iter(pipeline.make_pipeline(converted, config)))
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1])
  np.testing.assert_allclose(batch["image"], 50 / 127.5 - 1, atol=2 / 127.5)


def test_data_layer_imports_no_jax_and_no_model_code():
  """docs/design.md layering: the reading and decoding code runs in worker processes; it must not
  pull in JAX or any higher layer; ``storage`` (paths) and ``errors`` (the exception base
  classes, which import nothing) are the modules outside it. (grain, used by pipeline.py,
  imports jax by itself.)"""
  code = ("import sys; import unitsface_jax.data.recordio, unitsface_jax.data.sources, "
          "unitsface_jax.data.align, unitsface_jax.data.demo, unitsface_jax.data.pixels; "
          "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax')) or "
          "(m.startswith('unitsface_jax.') and not m.startswith('unitsface_jax.data') and "
          "m not in ('unitsface_jax.storage', 'unitsface_jax.errors'))]; "
          "print(bad); sys.exit(1 if bad else 0)")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stdout + run.stderr


def test_tfds_builder_from_a_manual_directory(data_dir, tmp_path):
  builder = tfds_builder.FaceDataset(source_dir=data_dir / "orl20_im2rec", config="ms1mv3",
                                     data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  converted = sources.TFDSSource(tfds_builder.builder_dir(tmp_path, "ms1mv3"))
  assert (len(converted), converted.num_classes) == (20, 10)
  assert [converted[i]["label"] for i in range(0, 20, 2)] == list(range(10))
  with pytest.raises(ValueError, match="needs source= or source_dir="):
    tfds_builder.FaceDataset(config="custom", data_dir=str(tmp_path / "x"),
                             file_format="array_record").download_and_prepare()
