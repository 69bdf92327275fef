"""Random-access face datasets behind one interface, for the grain pipeline.

Every source has ``len(src)``, ``src[i] -> {"image": ..., "label": int}`` and
``src.num_classes``; ``image`` is encoded bytes (JPEG, PNG, PGM, ...) or an HWC uint8 array.
``src.locate(i)`` says where example ``i`` lives (file, record, byte offset) so that a decoding
error downstream can name it. All sources pickle into grain's worker processes (a RecordIO
source carries its index: 8 bytes a record) and open their files again there. A source with
``read_in_chunks(chunk_records, window)`` is told so by the pipeline's chunk shuffle: a
RecordIO source in an object store then reads each chunk of consecutive examples in one
request and keeps the ``2 * window`` most recently used chunks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from etils import epath

from unitsface_jax.data import pixels, recordio
from unitsface_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")


class RecordIOSource:
  """An insightface RecordIO set: ``<directory>/train.rec``, ``train.idx``, ``property``.

  Example ``i`` is the i-th image key (``1..N`` after insightface's header record, or every
  key of a plain im2rec file). Labels are checked against ``num_classes`` on every read.

  Attributes:
    directory: the dataset folder.
    reader: the ``RecordIOReader``.
    image_keys: the record key of each example.
    num_classes: from ``property``, else the header, else one pass over the labels.
    header_first: see ``recordio.Layout``.
    image_size: (h, w) from ``property``, or None.
  """

  def __init__(self, directory, prefix: str = "train"):
    self.directory = epath.Path(directory)
    self.reader = recordio.open_rec(self.directory, prefix)
    layout = recordio.read_layout(self.reader, self.directory)
    self.image_keys = layout.image_keys
    self.header_first = layout.header_first
    self.image_size = layout.image_size
    num_classes = layout.num_classes
    if num_classes is None:
      logging.warning("%s has neither 'property' nor a header record; reading every label "
                      "to count the classes", self.reader.rec_path)
      labels = [self._label(i) for i in range(len(self))]
      num_classes = max(labels) + 1 if labels else 0
    self.num_classes = int(num_classes)
    self._chunk_records = 0
    self._spans = {}  # chunk -> byte range or None, filled as chunks are first read

  def read_in_chunks(self, chunk_records: int, window: int) -> None:
    """Reads examples ``[k * chunk_records, (k + 1) * chunk_records)`` as one byte range
    and keeps ``2 * window`` such chunks (``RecordIOReader.cache_spans``; only a remote file
    larger than the block cache uses them): the current window's and the next one's, which
    the threads reading ahead reach while others still finish the current window."""
    self._chunk_records = chunk_records
    self._spans = {}
    self.reader.cache_spans(2 * window)

  def _span(self, index: int):
    if not self._chunk_records or not self.reader.reads_spans:
      return None
    chunk = index // self._chunk_records
    if chunk not in self._spans:
      first = chunk * self._chunk_records
      keys = self.image_keys[first:min(first + self._chunk_records, len(self))]
      self._spans[chunk] = self.reader.span_of(keys)
    return self._spans[chunk]

  def __len__(self) -> int:
    return len(self.image_keys)

  def __repr__(self) -> str:
    return (f"RecordIOSource({os.fspath(self.directory)!r}, n={len(self)}, "
            f"classes={self.num_classes})")

  def _key(self, index: int) -> int:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return int(self.image_keys[index])

  def _label(self, index: int) -> int:
    header, _ = self.reader.read_header(self._key(index))
    return recordio.class_label(header)

  def locate(self, index: int) -> dict[str, Any]:
    key = self._key(index)
    return {"path": os.fspath(self.reader.rec_path), "record": key,
            "offset": self.reader.offset(key)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = self._key(index)
    header, image = self.reader.read_header(key, self._span(index))
    label = recordio.class_label(header)
    if not 0 <= label < self.num_classes:
      raise DataError(f"label {label} outside [0, {self.num_classes})",
                      path=self.reader.rec_path, record=key, offset=self.reader.offset(key))
    if not image:
      raise DataError("image record has no image bytes", path=self.reader.rec_path,
                      record=key, offset=self.reader.offset(key))
    return {"image": image, "label": label}


class ImageFolderSource:
  """Images in ``root/<identity>/<image>``; classes are the sorted folder names.

  Attributes:
    root: the folder.
    class_names: identity folder names; label ``c`` is ``class_names[c]``.
    files: relative paths of the images, sorted by class then name.
    num_classes: number of identity folders.
  """

  def __init__(self, root, extensions=IMAGE_EXTENSIONS):
    self.root = epath.Path(root)
    if not self.root.is_dir():
      raise DataError("image folder does not exist", path=self.root)
    self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(self.class_names):
      for p in sorted((self.root / name).iterdir(), key=lambda p: p.name):
        if p.suffix.lower() in extensions:
          files.append(f"{name}/{p.name}")
          labels.append(label)
    self.files = files
    self.labels = np.asarray(labels, dtype=np.int64)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def locate(self, index: int) -> dict[str, Any]:
    return {"path": os.fspath(self.root / self.files[index]), "record": index, "offset": 0}

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.root / self.files[index]
    try:
      data = path.read_bytes()
    except OSError as e:
      raise DataError(f"cannot read: {e}", path=path, record=index, offset=0) from None
    # Loose files: a JPEG's EXIF Orientation is applied when it is decoded (as cv2.imread).
    return {"image": data, "label": int(self.labels[index]), "exif": True}


class TFDSSource:
  """A TFDS dataset in ArrayRecord format (as ``prepare`` writes), read with ``tfds.data_source``.

  Images stay encoded (``SkipDecoding``) so the pipeline decodes them with the fast decoder;
  no TensorFlow is needed.

  Args:
    path: the builder folder holding ``dataset_info.json`` (``<out>/<name>/<version>``), or a
      dataset name when ``data_dir`` is given.
    split: the split to read.
    data_dir: TFDS data dir, when ``path`` is a name.
  """

  def __init__(self, path, split: str = "train", data_dir=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy import
    decoders = {"image": tfds.decode.SkipDecoding()}
    if data_dir is None:
      builder = tfds.builder_from_directory(os.fspath(path))
    else:
      builder = tfds.builder(os.fspath(path), data_dir=os.fspath(data_dir))
    self.name = builder.name
    self.split = split
    self._source = builder.as_data_source(split=split, decoders=decoders)
    self.num_classes = int(builder.info.features["label"].num_classes)
    self._dir = os.fspath(builder.data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def locate(self, index: int) -> dict[str, Any]:
    return {"path": f"{self._dir} ({self.split})", "record": index, "offset": None}

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    label = int(example["label"])
    if not 0 <= label < self.num_classes:
      raise DataError(f"label {label} outside [0, {self.num_classes})",
                      path=self._dir, record=index)
    return {"image": example["image"], "label": label}


class SyntheticSource:
  """Deterministic fake faces for benchmarks and tests: a pool of distinct JPEGs, reused.

  Example ``i`` is pool image ``i % pool_size`` with label ``i % num_classes``. The pool holds
  smooth random images (not noise) so that JPEG sizes and decode times resemble real faces.

  Args:
    num_examples: dataset length.
    num_classes: number of classes.
    image_size: square image side.
    pool_size: distinct images.
    encoded: JPEG bytes (True) or HWC uint8 arrays (False).
    seed: pool seed.
  """

  def __init__(self, num_examples: int, num_classes: int, image_size: int = 112,
               pool_size: int = 64, encoded: bool = True, seed: int = 0):
    import simplejpeg  # pylint: disable=g-import-not-at-top
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(pool_size):
      coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
      image = np.kron(coarse, np.ones((image_size // 8 + 1, image_size // 8 + 1, 1),
                                      dtype=np.uint8))[:image_size, :image_size]
      image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255)
      image = np.ascontiguousarray(image.astype(np.uint8))
      pool.append(simplejpeg.encode_jpeg(image, quality=95) if encoded else image)
    self._pool = pool

  def __len__(self) -> int:
    return self.num_examples

  def locate(self, index: int) -> dict[str, Any]:
    return {"path": "<synthetic>", "record": index, "offset": None}

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return {"image": self._pool[index % len(self._pool)], "label": index % self.num_classes}


class Subset:
  """The first ``size`` examples of another source (smoke runs, quick experiments)."""

  def __init__(self, source, size: int):
    if not 0 < size <= len(source):
      raise ValueError(f"subset size {size} not in (0, {len(source)}]")
    self.source = source
    self.size = size
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return self.size

  def read_in_chunks(self, chunk_records: int, window: int) -> None:
    """As the wrapped source's (a prefix keeps its chunk boundaries)."""
    read_in_chunks = getattr(self.source, "read_in_chunks", None)
    if read_in_chunks is not None:
      read_in_chunks(chunk_records, window)

  def locate(self, index: int) -> dict[str, Any]:
    return locate_example(self.source, index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for a subset of {self.size} examples")
    return self.source[index]


# The kinds ``make_source`` builds (``config.data.source``).
SOURCES = ("recordio", "tfds", "folder", "synthetic", "auto")


def make_source(kind: str, path=None, **kwargs):
  """Builds a source by name, for configs: ``recordio``, ``tfds``, ``folder``, ``synthetic``.

  ``kind="auto"`` picks by content: ``train.rec`` means RecordIO, ``dataset_info.json`` means a
  TFDS builder folder, anything else an image folder.
  """
  if kind == "auto":
    p = epath.Path(path)
    if (p / "train.rec").exists():
      kind = "recordio"
    elif (p / "dataset_info.json").exists():
      kind = "tfds"
    else:
      kind = "folder"
  if kind == "recordio":
    return RecordIOSource(path, **kwargs)
  if kind == "tfds":
    return TFDSSource(path, **kwargs)
  if kind == "folder":
    return ImageFolderSource(path, **kwargs)
  if kind == "synthetic":
    return SyntheticSource(**kwargs)
  raise ValueError(f"unknown source kind {kind!r}")


def locate_example(source, index: int) -> dict[str, Any]:
  """``DataError`` keyword arguments locating example ``index`` of any source."""
  locate = getattr(source, "locate", None)
  return locate(index) if locate else {"record": index}


def decode_image(data, where: dict[str, Any] | None = None, *,
                 out: np.ndarray | None = None, exif: bool = False) -> np.ndarray:
  """Decodes encoded image bytes (or checks an array) to HWC uint8 RGB.

  Bytes go through ``pixels.decode_image`` (JPEG by libjpeg-turbo, anything else by Pillow),
  ``out`` included: a JPEG of ``out``'s size is decoded into it; ``exif``: its EXIF Orientation
  applied (an example with ``"exif": True``, from a loose file). Grey arrays are replicated
  to 3 channels.

  Raises:
    DataError: the bytes are not a decodable image; names ``where`` (from ``locate``).
  """
  if not isinstance(data, np.ndarray):
    try:
      return pixels.decode_image(data, out=out, exif=exif)
    except DataError as e:
      raise DataError(e.reason, **(where or {})) from None
  image = data
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  elif image.ndim == 3 and image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    where = where or {}
    raise DataError(f"expected an HWC uint8 RGB image, got {image.dtype} {image.shape}",
                    **where)
  return image
