"""EXIF orientation: loose JPEGs (image folders, IJB crops, LFW-style pairs) are read as
cv2.imread reads them, the tag applied; images stored in a RecordIO or .bin set as stored.

The reference is Pillow's ``ImageOps.exif_transpose``, an independent implementation of the
EXIF rule that cv2.imread also follows."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from unitsface_jax.data import pipeline, pixels, recordio, sources
from unitsface_jax.evaluation import verification


def _upright(height=112, width=112):
  """An image whose every orientation differs: a gradient plus a block in one corner."""
  y, x = np.mgrid[:height, :width]
  image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
  image[:24, :40] = (250, 10, 10)
  return np.ascontiguousarray(image)


def _tagged(image: np.ndarray, orientation: int) -> bytes:
  """JPEG bytes of ``image`` with EXIF Orientation = ``orientation``."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
  return buf.getvalue()


def _as_a_viewer_shows_it(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _as_stored(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_decodes_as_exif_transpose_does(orientation):
  data = _tagged(_upright(40, 64), orientation)
  assert pixels.exif_orientation(data) == orientation
  got = pixels.decode_image(data, exif=True)
  want = _as_a_viewer_shows_it(data)
  assert got.shape == want.shape and got.flags.c_contiguous
  assert np.abs(got.astype(int) - want).max() <= 1
  stored = pixels.decode_image(data)  # without exif: as stored, whatever the tag
  assert np.abs(stored.astype(int) - _as_stored(data)).max() <= 1


def test_bytes_without_a_readable_tag_read_as_stored():
  image = _upright()
  plain = io.BytesIO()
  Image.fromarray(image).save(plain, format="JPEG")
  assert pixels.exif_orientation(plain.getvalue()) == 1
  broken = bytearray(_tagged(image, 6))
  start = broken.index(b"Exif\x00\x00")
  broken[start + 6:start + 8] = b"XX"  # neither II nor MM
  assert pixels.exif_orientation(bytes(broken)) == 1
  assert pixels.exif_orientation(b"\xff\xd8\xff") == 1


def test_an_image_folder_applies_the_tag_and_a_recordio_of_the_same_bytes_does_not(tmp_path):
  upright = _upright()
  turned = np.ascontiguousarray(np.rot90(upright, 1))  # stored turned; tag 6 turns it back
  data = _tagged(turned, 6)
  (tmp_path / "folder" / "a").mkdir(parents=True)
  (tmp_path / "folder" / "a" / "0.jpg").write_bytes(data)
  recordio.write_insightface(tmp_path / "rec", [(0, data)], 1)
  config = pipeline.PipelineConfig(batch_size=1, shuffle=False, random_flip=False,
                                   normalize=False)
  folder = next(iter(pipeline.make_pipeline(sources.ImageFolderSource(tmp_path / "folder"),
                                            config)))["image"][0]
  rec = next(iter(pipeline.make_pipeline(sources.RecordIOSource(tmp_path / "rec"),
                                         config)))["image"][0]
  assert np.abs(folder.astype(int) - upright).mean() < 3  # JPEG noise only
  assert np.abs(rec.astype(int) - turned).mean() < 3
  assert np.abs(folder.astype(int) - rec).mean() > 30


def test_lfw_style_pairs_apply_the_tag(tmp_path):
  upright = _upright()
  for person, image in (("A", np.rot90(upright, 1)), ("B", upright)):
    (tmp_path / person).mkdir()
    tag = 6 if person == "A" else 1
    (tmp_path / person / f"{person}_0001.jpg").write_bytes(
        _tagged(np.ascontiguousarray(image), tag))
  (tmp_path / "pairs.txt").write_text("1\nA 1 1\nA 1 B 1\n")  # one same, one different
  pairs = verification.load_pairs(tmp_path, tmp_path / "pairs.txt", crop="aligned")
  a, b = pairs.images[2:].astype(int)
  assert np.abs(a - upright).mean() < 3 and np.abs(b - upright).mean() < 3  # both upright


def test_an_ijb_crop_saved_turned_aligns_as_the_upright_one(tmp_path):
  """A loose crop stored turned with Orientation = 6 (as cameras write them) gives the same
  aligned face as the upright file: the landmarks are in the displayed frame."""
  from unitsface_jax.evaluation import ijb  # pylint: disable=g-import-not-at-top
  upright = _upright(150, 130)
  (tmp_path / "loose_crop").mkdir()
  (tmp_path / "loose_crop" / "1.jpg").write_bytes(_tagged(upright, 1))
  (tmp_path / "loose_crop" / "2.jpg").write_bytes(
      _tagged(np.ascontiguousarray(np.rot90(upright, 1)), 6))
  landmarks = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]],
                       np.float32) + 8
  two = np.zeros(2, np.int64)
  meta = ijb.IJBMeta("IJBC", np.array(["1.jpg", "2.jpg"]), two, two,
                     np.stack([landmarks, landmarks]), np.ones(2, np.float32), two[:0],
                     two[:0], np.zeros(0, np.int8))
  (crops,) = list(ijb.aligned_crops(tmp_path, meta))
  assert np.abs(crops[0].astype(int) - crops[1]).mean() < 3


def test_a_tfds_set_made_from_a_folder_stores_the_turned_jpeg_upright():
  from unitsface_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  upright = _upright()
  data = _tagged(np.ascontiguousarray(np.rot90(upright, 1)), 6)
  stored = tfds_builder._as_jpeg(data, {}, exif=True)  # pylint: disable=protected-access
  assert np.abs(pixels.decode_image(stored).astype(int) - upright).mean() < 3
  assert tfds_builder._as_jpeg(data, {}) == data  # pylint: disable=protected-access
