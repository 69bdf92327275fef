"""A TFDS builder that converts insightface RecordIO sets and image folders to ArrayRecord.

The source is a manual directory (TFDS's term for data the user already has): an insightface
``faces_*`` folder (``train.rec``/``train.idx``/``property``: CASIA-WebFace, MS1MV2, MS1MV3,
Glint360K, WebFace) or an image folder ``root/<identity>/<image>``. Images are stored as the
JPEG bytes they came in (non-JPEG inputs are re-encoded once, quality 95), so building needs no
TensorFlow and reading back (``sources.TFDSSource``) decodes with the pipeline's fast decoder.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from unitsface_jax.data import pixels
from unitsface_jax.data import sources
from unitsface_jax.data.errors import DataError

_MANUAL = """\
Pass the folder of the source dataset with --source (prepare.py) or source_dir=: an
insightface RecordIO folder (train.rec, train.idx, property) or an image folder
root/<identity>/<image>."""

# Published sizes, for the descriptions only (insightface recognition/arcface_torch/README.md
# and its configs: num_classes, num_image).
_CONFIGS = {
    "casia_webface": "CASIA-WebFace (10,572 identities, 0.5M images), faces_webface_112x112",
    "ms1mv2": "MS1MV2 / MS1M-ArcFace (85,742 identities, 5,822,653 images), faces_emore",
    "ms1mv3": "MS1MV3 / MS1M-RetinaFace (93,431 identities, 5,179,510 images)",
    "glint360k": "Glint360K (360K identities, 17.1M images)",
    "webface": "WebFace42M and its subsets, as insightface RecordIO",
    "custom": "any insightface RecordIO folder or image folder",
}


class FaceDatasetConfig(tfds.core.BuilderConfig):
  """One named face dataset; all share the same features and conversion."""


class FaceDataset(tfds.core.GeneratorBasedBuilder):
  """Face recognition training images with integer identity labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded images and labels, converted without TensorFlow."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
  BUILDER_CONFIGS = [FaceDatasetConfig(name=n, description=d) for n, d in _CONFIGS.items()]

  # TFDS finds a builder's code folder through importlib_resources, which etils[epath] pulls in
  # but a bare TFDS install lacks; this module's own path is the answer and needs neither.
  @py_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, source=None, source_dir=None, skip_bad_records: bool = False,
               **kwargs):
    """Args: source: a data source (``sources``) to convert, or source_dir: the manual
    directory to read it from (RecordIO or image folder, local or gs://); skip_bad_records:
    log and leave out records that raise ``DataError`` instead of stopping; kwargs: for TFDS
    (``config``, ``data_dir``, ``file_format``)."""
    if source is None and source_dir is not None:
      source = sources.make_source("auto", source_dir)
    self._face_source = source
    self._skip_bad_records = skip_bad_records
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    num_classes = None if self._face_source is None else self._face_source.num_classes
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
        }),
        supervised_keys=("image", "label"),
        # Keep the source order (identities stay contiguous, example i is source example i);
        # the training pipeline shuffles per epoch anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is local or gs:// already; nothing to download
    if self._face_source is None:
      raise ValueError(f"FaceDataset needs source= or source_dir= to build.\n{_MANUAL}")
    return {"train": self._generate_examples(self._face_source)}

  def _generate_examples(self, source):
    for index in range(len(source)):
      try:
        example = source[index]
        image = _as_jpeg(example["image"], sources.locate_example(source, index),
                         exif=example.get("exif", False))
      except DataError as e:
        if not self._skip_bad_records:
          raise
        logging.warning("skipping bad record: %s", e)
        self.skipped.append(str(e))
        continue
      yield index, {"image": image, "label": example["label"]}


def _as_jpeg(image, where, *, exif: bool = False) -> bytes:
  """JPEG bytes stay as they are (checked by decoding the header); others are re-encoded, and
  so is a loose file's JPEG (``exif``) whose EXIF Orientation turns it (the data set's
  readers use stored images as they are)."""
  import simplejpeg  # pylint: disable=g-import-not-at-top
  if (isinstance(image, (bytes, bytearray)) and bytes(image[:3]) == b"\xff\xd8\xff"
      and not (exif and pixels.exif_orientation(bytes(image)) != 1)):
    try:
      simplejpeg.decode_jpeg_header(bytes(image))
    except ValueError as e:
      raise DataError(f"undecodable JPEG: {e}", **where) from None
    return bytes(image)
  decoded = sources.decode_image(image, where, exif=exif)
  return simplejpeg.encode_jpeg(np.ascontiguousarray(decoded), quality=95, colorspace="RGB")


def builder_dir(out, config: str) -> str:
  """Where ``FaceDataset`` puts a config's files under ``out`` (for ``TFDSSource``)."""
  return os.path.join(os.fspath(out), "face_dataset", config, str(FaceDataset.VERSION))
