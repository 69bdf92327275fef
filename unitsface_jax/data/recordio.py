"""MXNet RecordIO (``.rec`` + ``.idx`` + insightface ``property``), read and written without MXNet.

Every public face training set (CASIA-WebFace, MS1MV2/3, Glint360K, WebFace) ships in this
format, and MXNet no longer imports beside NumPy 2, so this module reimplements it:

- record framing, as dmlc-core ``src/recordio.cc`` (``RecordIOWriter::WriteRecord`` and
  ``RecordIOReader::NextRecord``) defines it: ``u32 magic 0xced7230a``, ``u32 lrec`` holding a
  continuation flag in its top 3 bits and the length in the low 29, the payload, zero padding to
  a multiple of 4. A payload that contains the magic word at a 4-aligned position is split
  there into parts (cflag 1 = first, 2 = middle, 3 = last) and the magic word is dropped; the
  reader puts it back between parts.
- the ``.idx`` text index, ``key<TAB>offset`` per line (apache/mxnet ``python/mxnet/recordio.py``,
  ``MXIndexedRecordIO``);
- the image-record header ``IRHeader`` packed as ``<IfQQ`` (flag, label, id, id2), followed by
  ``flag`` float32 labels when flag > 0 (``recordio.pack``/``unpack`` in the same file);
- insightface's dataset layout (``recognition/arcface_torch/dataset.py``, ``MXFaceDataset``):
  record 0 with flag > 0 is a header whose label ``[N + 1, N + 1 + C]`` says the images are keys
  ``1 .. N``, wherever record 0 sits in the file; without such a header (plain im2rec) every key
  is an image. ``property`` holds ``num_classes,h,w``.

Reads are positioned (``os.pread`` on a per-process file descriptor), so one reader can be
pickled into grain's worker processes and used from several threads without sharing a file
position. A file in an object store (``gs://``) is read in HTTP range requests, each of which
costs tens of milliseconds on GCS whatever its size: a file of up to ``cache_bytes`` (256 MiB)
is fetched in 8 MiB blocks that each process keeps once read (memory: the file, per reading
process), so a random order over it costs one request per block, not one per record; a larger
file costs one request per record (its bytes only, not a readahead buffer), unless the caller
reads it in spans: with ``cache_spans(n)`` a ``read(key, span=(start, end))`` fetches the whole
byte range ``span`` (a chunk of consecutive records, ``span_of``) in one request and keeps the
``n`` most recently used spans, which the pipeline's chunk shuffle reads a window at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import struct
import threading
from typing import Iterable, NamedTuple

import numpy as np
from etils import epath

from unitsface_jax import storage
from unitsface_jax.data.errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IRHEADER = struct.Struct("<IfQQ")
# Object-store reads (see the module docstring).
REMOTE_BLOCK_BYTES = 8 << 20
REMOTE_CACHE_BYTES = 256 << 20
# Bytes asked for at a record's offset when reading it with one request: a face JPEG with its
# headers fits (the rest of a longer record is a second request).
_REMOTE_FIRST_READ = 64 << 10


class IRHeader(NamedTuple):
  """MXNet's image-record header. ``label`` is a float, or a float32 array when flag > 0."""

  flag: int
  label: float | np.ndarray
  id: int
  id2: int


def _aligned(n: int) -> int:
  return (n + 3) & ~3


# ----------------------------------------------------------------------------------------------
# Payload: IRHeader + image bytes.
# ----------------------------------------------------------------------------------------------


def pack(header: IRHeader, image: bytes = b"") -> bytes:
  """Packs an IRHeader and encoded image bytes into one record payload.

  A label given as a sequence is stored as ``flag = len(label)`` float32 values after the
  header (the ``label`` field then holds 0), as ``mxnet.recordio.pack`` does.
  """
  label = header.label
  if isinstance(label, (int, float, np.integer, np.floating)):
    head = _IRHEADER.pack(0, float(label), header.id, header.id2)
    return head + bytes(image)
  labels = np.asarray(label, dtype="<f4").reshape(-1)
  head = _IRHEADER.pack(labels.size, 0.0, header.id, header.id2)
  return head + labels.tobytes() + bytes(image)


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
  """Splits a record payload into its IRHeader and image bytes.

  Raises:
    ValueError: the payload is shorter than its header says. Callers that know the file and
      record turn this into a ``DataError``.
  """
  if len(payload) < _IRHEADER.size:
    raise ValueError(f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
  flag, label, rid, rid2 = _IRHEADER.unpack_from(payload, 0)
  start = _IRHEADER.size
  if flag > 0:
    end = start + 4 * flag
    if len(payload) < end:
      raise ValueError(
          f"IRHeader announces {flag} float labels but the payload has {len(payload)} bytes")
    label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).copy()
    start = end
  return IRHeader(flag, label, rid, rid2), payload[start:]


def class_label(header: IRHeader) -> int:
  """The class of an image record: the scalar label, or label[0] (insightface's rule)."""
  label = header.label
  value = float(label) if np.ndim(label) == 0 else float(np.asarray(label).reshape(-1)[0])
  return int(value)


# ----------------------------------------------------------------------------------------------
# Framing.
# ----------------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
  """Frames one payload as dmlc-core writes it, splitting at 4-aligned magic words."""
  if len(payload) >= 1 << 29:
    raise ValueError(f"RecordIO records must be < 2**29 bytes, got {len(payload)}")
  out = []
  start = 0
  # Only 4-aligned occurrences split the record (the writer scans in steps of 4).
  search = payload.find(_MAGIC_BYTES)
  while search != -1:
    if search % 4 == 0:
      cflag = 1 if start == 0 else 2
      out += [_MAGIC_BYTES, struct.pack("<I", cflag << 29 | (search - start)),
              payload[start:search]]
      start = search + 4
      search = payload.find(_MAGIC_BYTES, start)
    else:
      search = payload.find(_MAGIC_BYTES, search + 1)
  cflag = 0 if start == 0 else 3
  tail = payload[start:]
  out += [_MAGIC_BYTES, struct.pack("<I", cflag << 29 | len(tail)), tail,
          b"\0" * (_aligned(len(tail)) - len(tail))]
  return b"".join(out)


class RecordIOWriter:
  """Writes a ``.rec`` file and its ``.idx`` (for tests and conversions).

  Records go to the file in the order ``write`` is called, whatever their keys, so a test can
  put insightface's header record first or last as real files have it.
  """

  def __init__(self, rec_path, idx_path=None):
    self.rec_path = epath.Path(rec_path)
    self.idx_path = None if idx_path is None else epath.Path(idx_path)
    self._rec = self.rec_path.open("wb")
    self._idx_lines: list[str] = []
    self._offset = 0

  def write(self, key: int, payload: bytes) -> int:
    """Appends one record; returns its byte offset."""
    data = frame(payload)
    offset = self._offset
    self._rec.write(data)
    self._offset += len(data)
    self._idx_lines.append(f"{int(key)}\t{offset}\n")
    return offset

  def close(self) -> None:
    if self._rec is None:
      return
    self._rec.close()
    self._rec = None
    if self.idx_path is not None:
      self.idx_path.write_text("".join(self._idx_lines))

  def __enter__(self) -> "RecordIOWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


class RecordIOReader:
  """Positioned reads of records from a ``.rec`` file, by key through its ``.idx``.

  Without an ``.idx`` the file is scanned once to build the index. Safe to pickle into
  worker processes (each process opens its own descriptor, or its own block cache for a
  remote file) and to share between threads.

  Args:
    rec_path, idx_path: the files (local or ``gs://``).
    cache_bytes: a remote file of at most this size is read in blocks and kept (module
      docstring); a larger one with one request per record. Local files ignore it.
    block_bytes: the block size of that cache.

  Attributes:
    rec_path: the ``.rec`` file.
    keys: the keys in ascending order: a ``range`` when they are contiguous (every insightface
      and im2rec file), else an int64 array. Memory stays at 8 bytes a record (the offsets)
      for the 17M records of Glint360K, in every worker process.
    offsets: int64 byte offsets, aligned with ``keys``.
    file_size: size of the ``.rec`` file in bytes.
  """

  def __init__(self, rec_path, idx_path=None, *, cache_bytes: int = REMOTE_CACHE_BYTES,
               block_bytes: int = REMOTE_BLOCK_BYTES):
    self.rec_path = epath.Path(rec_path)
    self.file_size = self.rec_path.stat().length
    self._local = not storage.is_remote(self.rec_path)
    self._block_bytes = block_bytes
    self._cached = self.file_size <= cache_bytes
    self._span_capacity = 0
    self._open_state()
    if idx_path is not None and epath.Path(idx_path).exists():
      keys, offsets = _read_idx(epath.Path(idx_path))
    else:
      keys, offsets = self._scan()
    order = np.argsort(keys, kind="stable")
    keys, self.offsets = keys[order], offsets[order]
    duplicate = np.flatnonzero(keys[1:] == keys[:-1])
    if duplicate.size:
      raise DataError(f"key {int(keys[duplicate[0]])} appears twice in the index",
                      path=self.rec_path, record=int(keys[duplicate[0]]))
    if keys.size and int(keys[-1]) - int(keys[0]) + 1 == keys.size:
      self.keys = range(int(keys[0]), int(keys[-1]) + 1)
    else:
      self.keys = keys

  # -- per-process file handles ------------------------------------------------------------

  def _open_state(self):
    self._pid = os.getpid()
    self._fd = None
    self._remote = None  # (fsspec filesystem, path in it), opened on first use
    self._blocks = {}  # block index -> bytes, for a file of at most cache_bytes
    self._spans = collections.OrderedDict()  # start -> (end, bytes), least recently used first
    self._sorted_offsets = None
    self._lock = threading.Lock()
    self._fetch_lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ("_pid", "_fd", "_remote", "_blocks", "_spans", "_sorted_offsets", "_lock",
                 "_fetch_lock"):
      state.pop(name)
    return state

  def cache_spans(self, count: int) -> None:
    """Keeps the ``count`` most recently read spans of a remote file larger than the block
    cache (0: none); local and block-cached files ignore spans."""
    self._span_capacity = count

  @property
  def reads_spans(self) -> bool:
    """Whether ``read(key, span)`` fetches and keeps spans (a remote file beyond the block
    cache, with ``cache_spans`` > 0)."""
    return bool(self._span_capacity) and not self._local and not self._cached

  def span_of(self, keys) -> tuple[int, int] | None:
    """The byte range [first record's offset, end of the last record) holding records
    ``keys``, or None when they are scattered in the file (the range would be more than twice
    their share of it) and are better read one by one."""
    positions = np.asarray([self._locate(k) for k in keys], dtype=np.int64)
    offsets = self.offsets[positions]
    start, last = int(offsets.min()), int(offsets.max())
    if self._sorted_offsets is None:
      ascending = bool(np.all(self.offsets[1:] > self.offsets[:-1]))
      self._sorted_offsets = self.offsets if ascending else np.sort(self.offsets)
    after = int(np.searchsorted(self._sorted_offsets, last, side="right"))
    ends = self._sorted_offsets
    end = int(ends[after]) if after < ends.size else self.file_size
    if end - start > 2 * len(keys) * self.file_size / max(len(self), 1):
      return None
    return start, end

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open_state()

  def close(self) -> None:
    if self._fd is not None and self._pid == os.getpid():
      os.close(self._fd)
    self._fd = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass

  def _pread(self, offset: int, size: int) -> bytes:
    if self._pid != os.getpid():  # forked: never share the parent's descriptor
      self._open_state()
    if self._local:
      if self._fd is None:
        self._fd = os.open(os.fspath(self.rec_path), os.O_RDONLY)
      return os.pread(self._fd, size, offset)
    size = max(0, min(size, self.file_size - offset))
    if not self._cached:
      with self._lock:
        for start, (end, data) in self._spans.items():
          if start <= offset < end:  # what the span holds; a record past its end reads on
            return data[offset - start:min(offset + size, end) - start]
      return self._fetch(offset, offset + size)
    first, last = offset // self._block_bytes, (offset + size - 1) // self._block_bytes
    parts = [self._block(i) for i in range(first, last + 1)] if size else []
    start = offset - first * self._block_bytes
    return b"".join(parts)[start:start + size]

  def _fetch(self, start: int, end: int) -> bytes:
    """Bytes [start, end) of the remote file: one range request."""
    if self._remote is None:
      import fsspec  # pylint: disable=g-import-not-at-top  # epath's own backend for gs://
      self._remote = fsspec.core.url_to_fs(os.fspath(self.rec_path))
    fs, path = self._remote
    return fs.cat_file(path, start=start, end=end)

  def _block(self, index: int) -> bytes:
    with self._lock:  # one fetch per block, also when several threads want it at once
      block = self._blocks.get(index)
      if block is None:
        start = index * self._block_bytes
        block = self._fetch(start, min(start + self._block_bytes, self.file_size))
        self._blocks[index] = block
      return block

  # -- records -------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.keys)

  def __contains__(self, key: int) -> bool:
    return self._find(int(key)) is not None

  def _find(self, key: int) -> int | None:
    if isinstance(self.keys, range):
      return key - self.keys.start if key in self.keys else None
    pos = int(np.searchsorted(self.keys, key))
    return pos if pos < self.keys.size and int(self.keys[pos]) == key else None

  def _locate(self, key: int) -> int:
    pos = self._find(int(key))
    if pos is None:
      raise DataError(f"key {key} is not in the index", path=self.rec_path, record=key)
    return pos

  def offset(self, key: int) -> int:
    """The byte offset of record ``key``."""
    return int(self.offsets[self._locate(key)])

  def read(self, key: int, span: tuple[int, int] | None = None) -> bytes:
    """Returns the payload of record ``key`` (its parts joined, magic words restored).

    ``span``: a byte range holding the record (``span_of``) to fetch whole and keep, with
    ``cache_spans``, for the records read next.
    """
    if span is not None and self.reads_spans:
      self._load_span(*span)
    return self._read_at(self.offset(key), key)

  def _load_span(self, start: int, end: int) -> None:
    if self._pid != os.getpid():
      self._open_state()
    # One fetch per span, also when several threads want it at once; reads of the spans
    # already held go on meanwhile (they take only ``_lock``).
    with self._fetch_lock:
      with self._lock:
        if start in self._spans:
          self._spans.move_to_end(start)
          return
      data = self._fetch(start, end)
      with self._lock:
        self._spans[start] = (end, data)
        while len(self._spans) > self._span_capacity:
          self._spans.popitem(last=False)

  def _read_at(self, offset: int, key) -> bytes:
    def fail(reason, at=offset):
      return DataError(reason, path=self.rec_path, record=key, offset=at)

    if offset < 0 or offset >= self.file_size:
      raise fail(f"the index points past the end of the file ({self.file_size} bytes)")
    # Locally the header first, then the payload (two preads); remotely one request that most
    # records fit in (a block of the cache holds it whole anyway).
    buf = b"" if self._local else self._pread(offset, _REMOTE_FIRST_READ)
    parts = []
    pos = 0  # position of the current part in buf
    while True:
      part_offset = offset + pos
      if len(buf) < pos + 8:
        buf += self._pread(offset + len(buf), pos + 8 - len(buf))
      if len(buf) < pos + 8:
        raise fail(f"truncated file: record header cut at byte {self.file_size}")
      magic, lrec = struct.unpack_from("<II", buf, pos)
      if magic != MAGIC:
        raise fail(f"bad magic number 0x{magic:08x} (expected 0x{MAGIC:08x})", part_offset)
      cflag, length = lrec >> 29, lrec & _LENGTH_MASK
      if cflag > 3:
        raise fail(f"invalid continuation flag {cflag} (0..3)", part_offset)
      end = pos + 8 + length
      if len(buf) < end:
        buf += self._pread(offset + len(buf), end - len(buf))
      if len(buf) < end:
        raise fail(f"truncated file: the {length}-byte payload starting at byte "
                   f"{part_offset + 8} is cut at byte {self.file_size}")
      if not parts and cflag in (2, 3):
        raise fail(f"record starts with a continuation part (cflag {cflag})", part_offset)
      if parts and cflag in (0, 1):
        raise fail(f"split record interrupted by a new record (cflag {cflag})", part_offset)
      parts.append(buf[pos + 8:end])
      if cflag in (0, 3):
        return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
      pos = pos + 8 + _aligned(length)

  def _scan(self) -> tuple[np.ndarray, np.ndarray]:
    """Builds the index of a ``.rec`` without ``.idx``: record i gets key i (im2rec order)."""
    offsets = []
    offset = 0
    while offset < self.file_size:
      offsets.append(offset)
      # Walk the parts of this record to find where the next one begins.
      while True:
        head = self._pread(offset, 8)
        if len(head) < 8:
          raise DataError("truncated file while scanning", path=self.rec_path,
                          record=len(offsets) - 1, offset=offset)
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
          raise DataError(f"bad magic number 0x{magic:08x} while scanning",
                          path=self.rec_path, record=len(offsets) - 1, offset=offset)
        offset += 8 + _aligned(lrec & _LENGTH_MASK)
        if (lrec >> 29) in (0, 3):
          break
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.arange(offsets.size, dtype=np.int64), offsets

  def read_header(self, key: int, span: tuple[int, int] | None = None
                  ) -> tuple[IRHeader, bytes]:
    """Reads record ``key`` (``span`` as in ``read``) and unpacks it; a short payload is a
    ``DataError``."""
    payload = self.read(key, span)
    try:
      return unpack(payload)
    except ValueError as e:
      raise DataError(str(e), path=self.rec_path, record=key, offset=self.offset(key)) from None


def _read_idx(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  fields = path.read_bytes().split()
  if len(fields) % 2:
    raise DataError("the index has a line without an offset", path=path)
  try:
    table = np.asarray(fields, dtype=np.int64).reshape(-1, 2)
  except ValueError as e:
    raise DataError(f"the index is not 'key<TAB>offset' lines: {e}", path=path) from None
  return table[:, 0].copy(), table[:, 1].copy()


# ----------------------------------------------------------------------------------------------
# insightface layout.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which keys of a RecordIO file are images, and what the file says about its classes.

  Attributes:
    image_keys: the image record keys in reading order: a ``range`` (1..N after a header; all
      keys of a headerless file, ascending) or an int64 array.
    header_first: True if the header record is physically first, False if it sits elsewhere,
      None when the file has no header (plain im2rec).
    num_classes: from ``property``, else from the header's identity range, else None.
    image_size: (height, width) from ``property``, else None.
  """

  image_keys: np.ndarray
  header_first: bool | None
  num_classes: int | None
  image_size: tuple[int, int] | None


def read_property(directory) -> tuple[int, int, int] | None:
  """Reads insightface's ``property`` file (``num_classes,h,w``); None if absent."""
  path = epath.Path(directory) / "property"
  if not path.exists():
    return None
  text = path.read_text().strip()
  try:
    num_classes, height, width = (int(v) for v in text.split(","))
  except ValueError:
    raise DataError(f"expected 'num_classes,h,w', found {text!r}", path=path) from None
  return num_classes, height, width


def write_property(directory, num_classes: int, height: int = 112, width: int = 112) -> None:
  """Writes ``property`` as insightface's ``dir2rec.py`` does (no trailing newline)."""
  (epath.Path(directory) / "property").write_text(f"{num_classes},{height},{width}")


def read_layout(reader: RecordIOReader, directory=None) -> Layout:
  """Finds the image keys as insightface's ``MXFaceDataset`` does, header anywhere.

  Args:
    reader: the opened ``.rec``.
    directory: where to look for ``property``; defaults to the ``.rec``'s folder.
  """
  directory = reader.rec_path.parent if directory is None else directory
  prop = read_property(directory)
  num_classes = None if prop is None else prop[0]
  image_size = None if prop is None else (prop[1], prop[2])
  if 0 in reader:
    header, _ = reader.read_header(0)
    if header.flag > 0:
      labels = np.asarray(header.label).reshape(-1)
      first, stop = int(labels[0]), (int(labels[1]) if labels.size > 1 else None)
      keys = range(1, first)
      if isinstance(reader.keys, range):
        # A contiguous index holds every key between its ends: the first key it lacks is 1
        # (if it starts later) or the one after its end.
        lacking = 1 if reader.keys.start > 1 else reader.keys.stop
        missing = [lacking] if lacking < first else []
      else:
        present = np.isin(np.arange(1, first), reader.keys)
        missing = [int(k) + 1 for k in np.flatnonzero(~present)[:1]]
      if missing:
        raise DataError(f"the header says images are keys 1..{first - 1} but the index lacks "
                        f"key {missing[0]}",
                        path=reader.rec_path, record=0, offset=reader.offset(0))
      if num_classes is None and stop is not None:
        num_classes = stop - first
      header_first = int(reader.offsets.min()) == reader.offset(0)
      return Layout(keys, header_first, num_classes, image_size)
  return Layout(reader.keys, None, num_classes, image_size)


def write_insightface(directory, examples: Iterable[tuple[int, bytes]], num_classes: int,
                      *, header_first: bool = True, image_size=(112, 112),
                      with_property: bool = True) -> int:
  """Writes an insightface ``train.rec``/``train.idx``/``property`` set.

  Images get keys 1..N with scalar labels; then identity records N+1..N+C with the key range
  of each class, and the header record 0 ``[N+1, N+1+C]`` first or after the images (the
  order of insightface's ``dir2rec.py``). Images of one class must be contiguous for the
  identity ranges to be right, as in every insightface set.

  Args:
    directory: output folder (created).
    examples: (label, encoded image bytes) pairs, grouped by label.
    num_classes: C.
    header_first: put record 0 first (MXNet's ``face2rec``) or after the images.
    image_size: (h, w) for ``property``.
    with_property: write ``property``.

  Returns:
    The number of image records written.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  starts: dict[int, int] = {}
  ends: dict[int, int] = {}
  images: list[tuple[int, bytes]] = list(examples)
  n = len(images)
  for key, (label, _) in enumerate(images, start=1):
    if label in ends and ends[label] != key:
      raise ValueError(f"images of class {label} are not contiguous")
    starts.setdefault(label, key)
    ends[label] = key + 1
  header = pack(IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0))
  with RecordIOWriter(directory / "train.rec", directory / "train.idx") as writer:
    if header_first:
      writer.write(0, header)
    for key, (label, image) in enumerate(images, start=1):
      writer.write(key, pack(IRHeader(0, float(label), key, 0), image))
    if not header_first:
      writer.write(0, header)
    for c in range(num_classes):
      key = n + 1 + c
      span = [starts.get(c, 0), ends.get(c, 0)]
      writer.write(key, pack(IRHeader(2, span, key, 0)))
  if with_property:
    write_property(directory, num_classes, *image_size)
  return n


def open_rec(directory, prefix: str = "train") -> RecordIOReader:
  """Opens ``<directory>/<prefix>.rec`` with its ``.idx`` when present."""
  directory = epath.Path(directory)
  rec = directory / f"{prefix}.rec"
  if not rec.exists():
    raise DataError("no such RecordIO file", path=rec)
  idx = directory / f"{prefix}.idx"
  if not idx.exists():
    logging.warning("%s has no index; scanning the file to build one", rec)
  return RecordIOReader(rec, idx if idx.exists() else None)

