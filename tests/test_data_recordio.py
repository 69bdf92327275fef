"""MXNet RecordIO without MXNet: framing, IRHeader, insightface layouts, real files, corruption."""

import csv
import hashlib
import json
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import simplejpeg
from hypothesis import given, settings, strategies as st
from PIL import Image

from unitsface_jax.data import DataError, recordio, sources


def _shared_formats():
  """The project's shared folder of real-format files, beside the checkout, if present."""
  if "UNITSFACE_SHARED_FORMATS" in os.environ:
    return pathlib.Path(os.environ["UNITSFACE_SHARED_FORMATS"])
  for parent in pathlib.Path(__file__).resolve().parents[1:4]:
    if (parent / "shared" / "data" / "formats").exists():
      return parent / "shared" / "data" / "formats"
  return pathlib.Path("/nonexistent")


SHARED_FORMATS = _shared_formats()
# The README of the real files: worst ORL image 1.25, worst LFW image 2.14-2.30 mean absolute
# grey-level difference after the JPEG round trip, "so allow ... about 3".
MEAN_ABS_TOLERANCE = 3.0


def _manifest(data_dir):
  return json.loads((data_dir / "MANIFEST.json").read_text())


def _sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _sources_tsv(directory):
  with open(directory / "sources.tsv") as f:
    return [(int(r["record"]), int(r["label"]), r["source"]) for r in csv.DictReader(
        f, delimiter="\t")]


def _decode(jpeg):
  return simplejpeg.decode_jpeg(jpeg, colorspace="RGB").astype(np.int16)


# -- framing and header --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8),
       st.lists(st.integers(0, 15), max_size=4))
def test_frame_round_trip_with_embedded_magic(tmp_path_factory, payloads, magic_slots):
  """Payloads containing the magic word (aligned or not) come back byte for byte."""
  magic = struct.pack("<I", recordio.MAGIC)
  payloads = list(payloads)
  for slot in magic_slots:  # plant the magic word at 4-aligned and unaligned positions
    p = payloads[slot % len(payloads)]
    cut = min(slot, len(p))
    payloads[slot % len(payloads)] = p[:cut] + magic + p[cut:]
  d = tmp_path_factory.mktemp("frame")
  with recordio.RecordIOWriter(d / "x.rec", d / "x.idx") as w:
    for key, p in enumerate(payloads):
      w.write(key, p)
  data = (d / "x.rec").read_bytes()
  assert len(data) % 4 == 0
  reader = recordio.RecordIOReader(d / "x.rec", d / "x.idx")
  assert [reader.read(k) for k in range(len(payloads))] == payloads
  scanned = recordio.RecordIOReader(d / "x.rec")  # no .idx: index rebuilt by scanning
  np.testing.assert_array_equal(scanned.offsets, reader.offsets)


def test_aligned_magic_splits_record_as_dmlc_does():
  magic = struct.pack("<I", recordio.MAGIC)
  framed = recordio.frame(b"abcd" + magic + b"xy")
  # part 1: cflag 1, 4 bytes; part 2: cflag 3, 2 bytes + 2 padding (dmlc-core recordio.cc)
  assert struct.unpack_from("<II", framed, 0) == (recordio.MAGIC, 1 << 29 | 4)
  assert struct.unpack_from("<II", framed, 12) == (recordio.MAGIC, 3 << 29 | 2)
  assert len(framed) == 24
  unaligned = recordio.frame(b"a" + magic)
  assert struct.unpack_from("<II", unaligned, 0) == (recordio.MAGIC, 5)


def test_bad_continuation_flags_are_data_errors(tmp_path):
  magic = struct.pack("<I", recordio.MAGIC)
  cases = {"continuation part": magic + struct.pack("<I", 2 << 29 | 4) + b"abcd",
           "invalid continuation flag 5": magic + struct.pack("<I", 5 << 29 | 4) + b"abcd",
           "interrupted": (magic + struct.pack("<I", 1 << 29 | 4) + b"abcd" + magic
                           + struct.pack("<I", 0 << 29 | 4) + b"efgh")}
  for reason, data in cases.items():
    (tmp_path / "x.rec").write_bytes(data)
    (tmp_path / "x.idx").write_text("0\t0\n")
    reader = recordio.RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")
    with pytest.raises(DataError, match=rf"x\.rec, record 0, byte offset \d+: .*{reason}"):
      reader.read(0)


def test_pack_unpack_scalar_and_vector_labels():
  h, img = recordio.unpack(recordio.pack(recordio.IRHeader(0, 7.0, 3, 0), b"JPEG"))
  assert (h.flag, h.label, h.id, img) == (0, 7.0, 3, b"JPEG")
  h, img = recordio.unpack(recordio.pack(recordio.IRHeader(0, [5, 1], 9, 0), b"img"))
  assert h.flag == 2 and recordio.class_label(h) == 5 and img == b"img"
  np.testing.assert_array_equal(h.label, [5.0, 1.0])


# -- real MXNet files ----------------------------------------------------------------------


def test_orl_112_header_first_real_mxnet(data_dir):
  """Header record first: 400 images, keys 1..400, labels per sources.tsv, pixels ~ PGM."""
  directory = data_dir / "orl_112"
  assert _sha256(directory / "train.rec") == _manifest(data_dir)["sha256"]["orl_112/train.rec"]
  src = sources.RecordIOSource(directory)
  assert (len(src), src.num_classes, src.header_first) == (400, 40, True)
  np.testing.assert_array_equal(src.image_keys, np.arange(1, 401))
  rows = _sources_tsv(directory)
  assert [src[k - 1]["label"] for k, _, _ in rows] == [label for _, label, _ in rows]
  checked = 0
  for key, _, path in rows:
    # The repo keeps the PGMs of s1, s3 and s25; the shared folder, when present, all 400.
    pgm = data_dir / path
    if not pgm.exists():
      pgm = SHARED_FORMATS.parent / path
    if not pgm.exists():
      continue
    image = _decode(src[key - 1]["image"])
    assert image.shape == (112, 112, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    expected = np.zeros((112, 112), np.int16)  # 92x112 PGM centred, 10 black columns a side
    expected[:, 10:102] = np.asarray(Image.open(pgm))
    assert np.abs(image[..., 0] - expected).mean() < MEAN_ABS_TOLERANCE, path
    checked += 1
  assert checked == (400 if (SHARED_FORMATS.parent / "orl_faces").exists() else 30)


def test_orl20_im2rec_without_header_real_mxnet(data_dir):
  directory = data_dir / "orl20_im2rec"
  src = sources.RecordIOSource(directory)  # no property: classes counted from the labels
  assert (len(src), src.num_classes, src.header_first) == (20, 10, None)
  np.testing.assert_array_equal(src.image_keys, np.arange(20))
  lst = [line.split("\t") for line in (directory / "train.lst").read_text().splitlines()]
  assert [src[int(i)]["label"] for i, _, _ in lst] == [int(float(lab)) for _, lab, _ in lst]
  checked = 0
  for index, _, path in lst:
    pgm = data_dir / "orl_faces" / path
    if not pgm.exists():
      pgm = SHARED_FORMATS.parent / "orl_faces" / path
    if pgm.exists():
      checked += 1
      expected = np.zeros((112, 112), np.int16)
      expected[:, 10:102] = np.asarray(Image.open(pgm))
      image = _decode(src[int(index)]["image"])
      assert np.abs(image[..., 1] - expected).mean() < MEAN_ABS_TOLERANCE
  assert checked == (20 if (SHARED_FORMATS.parent / "orl_faces").exists() else 4)


def _check_lfw_header_last(directory, data_root, n_images, n_classes):
  src = sources.RecordIOSource(directory)
  assert (len(src), src.num_classes, src.header_first) == (n_images, n_classes, False)
  reader = src.reader
  assert reader.offset(0) > reader.offset(n_images)  # key 0 sits after the images
  rows = _sources_tsv(directory)
  assert [src[k - 1]["label"] for k, _, _ in rows] == [label for _, label, _ in rows]
  s = 112 / 150  # the README's centre crop: x, y in [50, 200) onto 112x112
  crop = np.array([[s, 0, -50 * s], [0, s, -50 * s]])
  from unitsface_jax.data import align  # pylint: disable=g-import-not-at-top
  checked = 0
  for key, _, path in rows:
    if not (data_root / path).exists():
      continue
    original = simplejpeg.decode_jpeg((data_root / path).read_bytes(), colorspace="RGB")
    expected = align.warp_affine(original, crop, (112, 112)).astype(np.int16)
    assert np.abs(_decode(src[key - 1]["image"]) - expected).mean() < MEAN_ABS_TOLERANCE, path
    checked += 1
  return checked


def test_lfw_header_last_subset(data_dir):
  """Header record after the images (face2rec2/dir2rec order), real JPEG bytes."""
  assert _check_lfw_header_last(data_dir / "lfw62_112_head4", data_dir, 40, 4) == 4


@pytest.mark.skipif(not (SHARED_FORMATS / "lfw62_112").exists(),
                    reason="the shared folder with the full real-MXNet lfw62_112 is absent")
def test_lfw62_112_header_last_real_mxnet_full():
  shared = SHARED_FORMATS.parent
  assert _check_lfw_header_last(SHARED_FORMATS / "lfw62_112", shared, 620, 62) == 620


# -- corrupted copies ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupted(data_dir, tmp_path_factory):
  """Byte-identical rebuilds of the two real corrupted copies of orl_112."""
  manifest = _manifest(data_dir)
  original = (data_dir / "orl_112" / "train.rec").read_bytes()
  root = tmp_path_factory.mktemp("corrupt")
  made = {}
  trunc = manifest["orl_112_corrupt_truncated"]
  bad = manifest["orl_112_corrupt_badmagic"]
  patched = bytearray(original)
  at = bad["magic_offset"]
  assert patched[at:at + 4] == bytes.fromhex(bad["old_bytes"])
  patched[at:at + 4] = bytes.fromhex(bad["new_bytes"])
  for name, data in (("orl_112_corrupt_truncated", original[:trunc["truncated_size"]]),
                     ("orl_112_corrupt_badmagic", bytes(patched))):
    d = root / name
    d.mkdir()
    (d / "train.rec").write_bytes(data)
    for f in ("train.idx", "property"):
      (d / f).write_bytes((data_dir / "orl_112" / f).read_bytes())
    assert _sha256(d / "train.rec") == manifest["sha256"][f"{name}/train.rec"]
    made[name] = d
  return made


def test_truncated_copy_raises_data_error(corrupted):
  src = sources.RecordIOSource(corrupted["orl_112_corrupt_truncated"])
  assert src[19]["label"] == 1  # key 20, the last whole record
  with pytest.raises(DataError) as e:
    src[20]  # key 21, cut in the middle of its payload
  assert (pathlib.Path(e.value.path).name, e.value.record, e.value.offset) == (
      "train.rec", 21, 109308)
  assert "train.rec" in str(e.value) and "record 21" in str(e.value)
  with pytest.raises(DataError, match=r"train\.rec, record 22, byte offset 114540: .*past"):
    src[21]  # key 22: the index points past the end (mxnet returns None here)


def test_badmagic_copy_raises_data_error(corrupted):
  src = sources.RecordIOSource(corrupted["orl_112_corrupt_badmagic"])
  assert src[248]["label"] == 24 and src[250]["label"] == 25
  with pytest.raises(DataError, match=r"train\.rec, record 250, byte offset 1387108: bad magic"):
    src[249]


@pytest.mark.skipif(not (SHARED_FORMATS / "orl_112_corrupt_badmagic").exists(),
                    reason="the shared folder with the real corrupted files is absent")
@pytest.mark.parametrize("name,index,key", [("orl_112_corrupt_truncated", 20, 21),
                                            ("orl_112_corrupt_badmagic", 249, 250)])
def test_real_corrupted_files_from_shared_folder(name, index, key):
  src = sources.RecordIOSource(SHARED_FORMATS / name)
  with pytest.raises(DataError, match=rf"train\.rec, record {key},"):
    src[index]


def _write_set(directory, labels, images, num_classes):
  recordio.write_insightface(directory, list(zip(labels, images)), num_classes)
  return sources.RecordIOSource(directory)


def test_label_outside_classes_raises(tmp_path):
  jpeg = simplejpeg.encode_jpeg(np.zeros((112, 112, 3), np.uint8))
  recordio.write_insightface(tmp_path, [(0, jpeg), (5, jpeg)], num_classes=6)
  recordio.write_property(tmp_path, 3)  # property disagrees with the labels
  src = sources.RecordIOSource(tmp_path)
  assert src[0]["label"] == 0
  with pytest.raises(DataError, match=r"record 2, byte offset \d+: label 5 outside \[0, 3\)"):
    src[1]


def test_header_claims_missing_keys(tmp_path):
  with recordio.RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
    w.write(0, recordio.pack(recordio.IRHeader(2, [5, 6], 0, 0)))
    w.write(1, recordio.pack(recordio.IRHeader(0, 0.0, 1, 0), b"\xff\xd8\xff"))
  with pytest.raises(DataError, match="record 0.*lacks key 2"):
    sources.RecordIOSource(tmp_path)


def test_reader_pickles_and_reopens_in_a_new_process(data_dir):
  """Each process opens its own descriptor: a pickled reader, or one inherited by fork (seen
  as a changed process id), opens the file again instead of sharing the parent's."""
  reader = recordio.open_rec(data_dir / "orl20_im2rec")
  first = reader.read(3)
  clone = pickle.loads(pickle.dumps(reader))
  assert clone.read(3) == first
  parent_fd = reader._fd  # pylint: disable=protected-access
  reader._pid = -1  # as after a fork  # pylint: disable=protected-access
  assert reader.read(3) == first
  assert reader._pid == os.getpid() and reader._fd is not None  # pylint: disable=protected-access
  os.close(parent_fd)  # the "parent's" descriptor, abandoned by the reopen


def test_sparse_keys_are_found_by_search(tmp_path):
  """An index with gaps (not a range) is searched; a missing key is a DataError."""
  with recordio.RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
    for key in (7, 2, 30):
      w.write(key, recordio.pack(recordio.IRHeader(0, float(key), key, 0), b"img"))
  reader = recordio.RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")
  np.testing.assert_array_equal(reader.keys, [2, 7, 30])
  assert recordio.unpack(reader.read(30))[0].label == 30.0 and 7 in reader and 8 not in reader
  with pytest.raises(DataError, match="key 8 is not in the index"):
    reader.read(8)
  contiguous = recordio.open_rec(pathlib.Path(__file__).parent / "data" / "orl_112")
  assert contiguous.keys == range(0, 441)
