"""The grain input pipeline: shard, shuffle, decode, flip, normalise and batch face images.

One host's stream, element by element (all positions are deterministic functions of the
config, so an iterator restored from its state continues exactly where it stopped):

  position p -> epoch e, slot j = divmod(p, examples_per_epoch)
  -> source index = permutation_{seed, e}[j * process_count + process_index]
  -> read, decode to RGB uint8, random horizontal flip (a hash of seed and p),
     (x / 255 - 0.5) / 0.5
  -> batches of ``batch_size`` (per host), each built whole by one worker; multi-process
     prefetch (grain ``mp_prefetch``).

Every host uses the same ``examples_per_epoch = (n // process_count // batch_size) *
batch_size`` so all hosts yield the same number of batches per epoch (SPMD steps must match);
the few examples past that are the epoch's shuffled tail and differ each epoch. Each epoch's
shuffle is a NumPy permutation seeded with ``[seed, epoch]``: of the whole set, or with
``chunk_records`` of chunks of consecutive records shuffled a window at a time (``_SourceIndex``;
what an object store needs: a RecordIO source then reads a chunk in one request).

``PipelineIterator`` is the training loop's iterator: its state is the batch position (JSON),
saved as an orbax item with ``grain.checkpoint.CheckpointSave(iterator)`` and restored with
``CheckpointRestore(iterator)``, also under a different worker count.
NumPy only: this code imports no JAX or model code (grain itself imports jax, but its
workers are spawned processes, not forks of a process running JAX).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import numpy as np

from unitsface_jax.data.errors import DataError
from unitsface_jax.data import pixels, sources

# Bad records replaced in a row before the pipeline gives up: a file that is mostly broken
# should stop the run, not spin.
_MAX_CONSECUTIVE_BAD = 64


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How to turn a source into batches; field names match the training config's ``data``.

  Attributes:
    batch_size: examples per batch on this host (the global batch / process_count).
    seed: shuffle and flip seed.
    num_epochs: epochs to yield; None repeats forever.
    shuffle: shuffle each epoch (seeded with [seed, epoch]); False keeps source order.
    random_flip: random horizontal flip with probability 1/2.
    image_size: (height, width) every decoded image must have.
    worker_count: grain worker processes (``mp_prefetch``); 0 reads in the calling process.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads per process reading and decoding elements.
    skip_bad_records: on a ``DataError`` use the next good example instead of raising, log it
      and count it in the batch's ``"bad_records"`` field (so every host keeps the same number
      of batches).
    normalize: emit float32 ``(x / 255 - 0.5) / 0.5``; False emits the uint8 pixels for the
      training step to normalise on the accelerator. With workers, every batch crosses to
      the training process in a fresh shared-memory block whose pages the kernel must
      allocate and zero, which costs more CPU than decoding when the batch is float32;
      uint8 is 4x fewer bytes (see BENCHMARKS.md).
    defer_flip: with ``random_flip``, leave the pixels as decoded and emit the coin flips as
      a bool ``"flip"`` field [B] for the consumer to apply (the training step mirrors those
      images on the accelerator, where it is free; on the host, reversing 3-byte pixels costs
      about a third of a JPEG decode). The same images are mirrored either way.
    chunk_records: 0 shuffles the whole epoch (an exact global permutation); > 0 shuffles
      chunks of this many consecutive records, ``shuffle_window`` chunks at a time (see
      ``_SourceIndex``), so that an object store serves a chunk in one request.
    shuffle_window: chunks whose records are shuffled together, with ``chunk_records``.
  """

  batch_size: int
  seed: int = 0
  num_epochs: int | None = None
  shuffle: bool = True
  random_flip: bool = True
  image_size: tuple[int, int] = (112, 112)
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  skip_bad_records: bool = False
  normalize: bool = True
  defer_flip: bool = False
  chunk_records: int = 0
  shuffle_window: int = 32


def examples_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Examples each host reads per epoch: the same on every host, a multiple of the batch."""
  return (num_examples // process_count // batch_size) * batch_size


def steps_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches each host yields per epoch."""
  return examples_per_epoch(num_examples, batch_size, process_count) // batch_size


class _SourceIndex:
  """Maps host stream positions to source indices (epoch shuffle, then this host's share).

  Host h's batch b is the h-th contiguous block of the global batch b: its position i maps to
  the epoch's global slot ``b * batch_size * process_count + h * batch_size + i``. So the
  global batch assembled in process order (``make_array_from_process_local_data``) is the
  same examples, in the same order, with the same flips, whatever the number of hosts.

  The epoch's permutation is drawn once per process from ``default_rng([seed, epoch])`` and
  cached (4 bytes an example: 68 MB for Glint360K's 17M): a per-index bijection such as grain's
  ``index_shuffle`` costs as much as decoding the image.

  Chunk mode (``chunk_records`` > 0, MXNet ``ImageRecordIter``'s ``shuffle_chunk_size``, a
  WebDataset shard shuffle with a shuffle buffer): the epoch's order is a random order of
  chunks of ``chunk_records`` consecutive indices, grouped into windows of ``shuffle_window``
  chunks whose records are shuffled together (``_chunk_permutation``), so a batch mixes the
  records of W chunks rather than of the whole set, and a reader keeps the window's chunks
  (one object-store request each). Host h takes the h-th contiguous share of that order
  (``num_examples // process_count`` records, its first ``per_epoch``), so hosts read
  disjoint windows (only the P - 1 windows that straddle two shares are read by two hosts). A
  global batch is then the hosts' batches of different windows: unlike the exact shuffle, its
  composition depends on the number of hosts. Flips stay keyed by the global position.
  """

  def __init__(self, num_examples, per_epoch, seed, shuffle, process_index, process_count,
               batch_size, chunk_records=0, shuffle_window=1):
    self.num_examples = num_examples
    self.chunk_records = chunk_records
    self.shuffle_window = shuffle_window
    self.batch_size = batch_size
    self.per_epoch = per_epoch
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self._cache = (None, None)  # (epoch, permutation); replaced whole, so threads may share it

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = (None, None)
    return state

  def permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._cache
    if cached_epoch != epoch:
      dtype = np.int32 if self.num_examples < 2**31 else np.int64
      rng = np.random.default_rng([self.seed, epoch])
      if self.chunk_records:
        order = self._chunk_permutation(rng, dtype)
      else:
        order = rng.permutation(self.num_examples).astype(dtype)
      self._cache = (epoch, order)
    return order

  def _chunk_permutation(self, rng, dtype) -> np.ndarray:
    """The epoch's order in chunk mode: the chunks (``chunk_records`` consecutive indices, the
    last one shorter) in a random order, cut into windows of ``shuffle_window`` chunks, the
    records of each window shuffled together."""
    n, size = self.num_examples, self.chunk_records
    chunks = rng.permutation(-(-n // size)).astype(dtype)
    within = np.arange(size, dtype=dtype)
    order = np.empty((n,), dtype)
    start = 0
    for w in range(0, chunks.size, self.shuffle_window):
      records = (chunks[w:w + self.shuffle_window, None] * size + within).reshape(-1)
      records = records[records < n]
      rng.shuffle(records)
      order[start:start + records.size] = records
      start += records.size
    return order

  def global_positions(self, positions: np.ndarray) -> tuple[int, np.ndarray]:
    """(epoch, global slots in that epoch) of this host's stream ``positions`` (one epoch)."""
    epoch = int(positions[0]) // self.per_epoch
    slots = positions - epoch * self.per_epoch
    batch, offset = np.divmod(slots, self.batch_size)
    global_slots = ((batch * self.process_count + self.process_index) * self.batch_size
                    + offset)
    return epoch, global_slots

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    """Source indices of stream ``positions`` (all in one epoch, as a batch is)."""
    epoch, global_slots = self.global_positions(positions)
    if not self.shuffle:
      return global_slots
    if self.chunk_records:
      # Host h reads the h-th contiguous share of the epoch's order: its own windows.
      share = self.num_examples // self.process_count
      slots = positions - epoch * self.per_epoch
      return self.permutation(epoch)[self.process_index * share + slots]
    return self.permutation(epoch)[global_slots]


def _flips(seed: int, positions: np.ndarray) -> np.ndarray:
  """A fair coin per stream position, a pure function of (seed, position) (splitmix64)."""
  with np.errstate(over="ignore"):
    z = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
  return (z >> np.uint64(63)).astype(bool)


class _MakeBatch:
  """Builds batch ``b`` whole: read, decode into one uint8 array, flip, normalise.

  One transform per batch (not per image) keeps grain's per-element overhead and the stacking
  copy off the hot path; decoding writes straight into the batch array.
  """

  def __init__(self, source, config: PipelineConfig, index: _SourceIndex):
    self.source = source
    self.config = config
    self.index = index

  def _decode_into(self, out: np.ndarray, i: int) -> int:
    example = self.source[i]
    height, width = self.config.image_size
    # A JPEG of the configured size is decoded straight into ``out``: the common case.
    try:
      image = sources.decode_image(example["image"], out=out, exif=example.get("exif", False))
    except DataError as e:
      raise DataError(e.reason, **sources.locate_example(self.source, i)) from None
    if image is not out:
      if image.shape[:2] != (height, width):
        raise DataError(f"image is {image.shape[0]}x{image.shape[1]}, the pipeline expects "
                        f"{height}x{width}", **sources.locate_example(self.source, i))
      out[...] = image
    return int(example["label"])

  def __call__(self, batch_index: int, _) -> dict[str, np.ndarray]:
    size = self.config.batch_size
    height, width = self.config.image_size
    positions = np.arange(batch_index * size, (batch_index + 1) * size)
    images = np.empty((size, height, width, 3), np.uint8)
    labels = np.empty((size,), np.int32)
    bad = np.zeros((size,), np.int32)
    n = len(self.source)
    for j, i in enumerate(self.index(positions).tolist()):
      while True:
        try:
          labels[j] = self._decode_into(images[j], i)
          break
        except DataError as e:
          if not self.config.skip_bad_records:
            raise
          bad[j] += 1
          logging.warning("skipping bad record (%d in a row): %s", bad[j], e)
          if bad[j] >= _MAX_CONSECUTIVE_BAD:
            raise DataError(f"{bad[j]} bad records in a row; giving up (last: {e})") from e
          i = (i + 1) % n  # the next record takes its place: batch counts stay equal
    flips = None
    if self.config.random_flip:
      # Keyed by the global position, so every host count flips the same images.
      epoch, global_slots = self.index.global_positions(positions)
      global_positions = epoch * self.index.per_epoch * self.index.process_count + global_slots
      flips = _flips(self.config.seed, global_positions)
      if not self.config.defer_flip:
        images = pixels.mirror_where(images, flips, out=images)
    batch = {"image": pixels.normalize(images) if self.config.normalize else images,
             "label": labels}
    if self.config.defer_flip:
      batch["flip"] = flips if flips is not None else np.zeros((size,), bool)
    if self.config.skip_bad_records:
      batch["bad_records"] = bad
    return batch


def make_batches(source, config: PipelineConfig, *, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """This host's stream of batches as a random-access grain ``MapDataset`` (batch b at [b]).

  Args:
    source: any object with ``len``, ``__getitem__`` and ``num_classes`` (see ``sources``).
    config: the pipeline settings.
    process_index: this host's index (``jax.process_index()``).
    process_count: number of hosts (``jax.process_count()``).

  Returns:
    Batches ``{"image": float32 [B, H, W, 3], "label": int32 [B]}`` (``image`` uint8 when
    ``normalize`` is False; plus ``"flip"`` bool [B] with ``defer_flip``, and
    ``"bad_records"`` int32 [B] when skipping); infinitely many when ``num_epochs`` is None.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  n = len(source)
  per_epoch = examples_per_epoch(n, config.batch_size, process_count)
  if per_epoch == 0:
    raise ValueError(f"{n} examples cannot fill one batch of {config.batch_size} on each of "
                     f"{process_count} hosts")
  index = _SourceIndex(n, per_epoch, config.seed, config.shuffle, process_index,
                       process_count, config.batch_size, config.chunk_records,
                       config.shuffle_window)
  read_in_chunks = getattr(source, "read_in_chunks", None)
  if config.chunk_records and config.shuffle and read_in_chunks is not None:
    # The source reads a chunk's bytes at once and keeps a window of chunks (sources.py).
    read_in_chunks(config.chunk_records, config.shuffle_window)
  # A batch is one element that one worker builds whole, and mp_prefetch interleaves workers
  # in order, so batch b holds the same examples for any worker count.
  batches = grain.MapDataset.range(per_epoch // config.batch_size).repeat(config.num_epochs)
  return batches.map_with_index(_MakeBatch(source, config, index))


def make_pipeline(source, config: PipelineConfig, *, process_index: int = 0,
                  process_count: int = 1, start_batch: int = 0) -> grain.IterDataset:
  """This host's pipeline as a grain ``IterDataset`` starting at batch ``start_batch``.

  ``iter()`` of it is a grain ``DatasetIterator`` whose ``get_state``/``set_state`` restore it
  exactly, with the same ``worker_count``. ``PipelineIterator`` adds a state that does not
  depend on the worker count. Arguments as ``make_batches``.
  """
  ds = make_batches(source, config, process_index=process_index, process_count=process_count)
  if start_batch:
    ds = ds[start_batch:]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=2))
  if config.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  return it


class PipelineIterator:
  """This host's batches with a small checkpointable state: the number of batches yielded.

  The stream is a pure function of (source length, config, host), so the position is all a
  checkpoint needs; restoring rebuilds the grain pipeline from that batch, with whatever
  ``worker_count`` the new run has. Save it as an orbax item with
  ``grain.checkpoint.CheckpointSave(iterator)`` and restore with ``CheckpointRestore``
  (``get_state`` returns JSON bytes, as grain's handler expects of non-dataset iterators), or
  keep ``get_state()`` anywhere.

  Attributes:
    source: the data source (``num_classes``, ``len``).
    config: the ``PipelineConfig``.
  """

  def __init__(self, source, config: PipelineConfig, *, process_index: int = 0,
               process_count: int = 1):
    self.source = source
    self.config = config
    self._process_index = process_index
    self._process_count = process_count
    self._position = 0
    self._iterator = None

  @property
  def position(self) -> int:
    """Batches yielded so far (the next batch's index in this host's stream)."""
    return self._position

  def _identity(self) -> dict[str, Any]:
    # What must match for a saved position to mean the same batches.
    c = self.config
    chunks = c.shuffle and c.chunk_records > 0
    return {"num_examples": len(self.source), "batch_size": c.batch_size, "seed": c.seed,
            "shuffle": c.shuffle, "random_flip": c.random_flip,
            "process_index": self._process_index, "process_count": self._process_count,
            "chunk_records": c.chunk_records if chunks else 0,
            "shuffle_window": c.shuffle_window if chunks else 0}

  def start_prefetch(self) -> None:
    """Builds the grain pipeline at the current position and starts its workers."""
    if self._iterator is None:
      ds = make_pipeline(self.source, self.config, process_index=self._process_index,
                         process_count=self._process_count, start_batch=self._position)
      self._iterator = iter(ds)
      start = getattr(self._iterator, "start_prefetch", None)
      if start is not None:
        start()

  def __iter__(self) -> "PipelineIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self.start_prefetch()
    batch = next(self._iterator)
    self._position += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"position": self._position, **self._identity()}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    expected = self._identity()
    # States saved before chunk mode existed lack its keys: they were the exact shuffle (0).
    saved = {"chunk_records": 0, "shuffle_window": 0, **state}
    changed = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if changed:
      raise ValueError(f"the saved data state does not match this pipeline (saved, now): "
                       f"{changed}; resuming would change the data order")
    self.close()
    self._position = int(state["position"])

  def close(self) -> None:
    """Stops the current grain pipeline (its worker processes)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
    self._iterator = None
