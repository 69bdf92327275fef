"""The grain input pipeline: shard, shuffle, decode, flip, normalise and batch face images.

One host's stream, element by element (all positions are deterministic functions of the
config, so an iterator restored from its state continues exactly where it stopped):

  position p -> epoch e, slot j = divmod(p, examples_per_epoch)
  -> source index = shuffle_{seed + e}(j * process_count + process_index)
  -> read, decode to RGB uint8, random horizontal flip, (x / 255 - 0.5) / 0.5
  -> batches of ``batch_size`` (per host), built whole by one worker; multi-process prefetch.

Every host uses the same ``examples_per_epoch = (n // process_count // batch_size) *
batch_size`` so all hosts yield the same number of batches per epoch (SPMD steps must match);
the few examples past that are the epoch's shuffled tail and differ each epoch. The shuffle is
grain's ``MapDataset.shuffle`` (seeded per epoch with ``seed + epoch``).

``PipelineIterator`` is the training loop's iterator: its state is the batch position (JSON),
saved as an orbax item with ``grain.checkpoint.CheckpointSave(iterator)`` and restored with
``CheckpointRestore(iterator)``, also under a different worker count.
NumPy only (workers are separate processes; JAX is not fork-safe).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import numpy as np

from unitsface_jax.data.errors import DataError
from unitsface_jax.data.sources import decode_image

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
    shuffle: shuffle each epoch (seed + epoch); False keeps source order (evaluation).
    random_flip: random horizontal flip with probability 1/2.
    image_size: (height, width) every decoded image must have.
    worker_count: grain worker processes (``mp_prefetch``); 0 reads in the calling process.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads per process reading and decoding elements.
    skip_bad_records: on a ``DataError`` use the next good example instead of raising, log it
      and count it in the batch's ``"bad_records"`` field (so every host keeps the same number
      of batches).
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


def examples_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Examples each host reads per epoch: the same on every host, a multiple of the batch."""
  return (num_examples // process_count // batch_size) * batch_size


def steps_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches each host yields per epoch."""
  return examples_per_epoch(num_examples, batch_size, process_count) // batch_size


class _SourceIndex:
  """Maps a host stream position to a source index (epoch shuffle, then host stride)."""

  def __init__(self, num_examples, per_epoch, seed, shuffle, process_index, process_count):
    self.num_examples = num_examples
    self.per_epoch = per_epoch
    self.process_index = process_index
    self.process_count = process_count
    self.order = (grain.MapDataset.range(num_examples).shuffle(seed) if shuffle else None)

  def __call__(self, position: int, _) -> int:
    epoch, slot = divmod(position, self.per_epoch)
    global_slot = slot * self.process_count + self.process_index
    if self.order is None:
      return global_slot
    # ShuffleMapDataset reshuffles with seed + epoch for indices in later epochs.
    return int(self.order[epoch * self.num_examples + global_slot]) % self.num_examples


class _ReadDecode:
  """Reads one example, decodes it to HWC uint8 RGB, checks size; optionally skips bad ones."""

  def __init__(self, source, image_size, skip_bad_records):
    self.source = source
    self.image_size = tuple(image_size)
    self.skip_bad_records = skip_bad_records

  def _load(self, index: int) -> dict[str, Any]:
    example = self.source[index]
    where = self._where(index)
    image = decode_image(example["image"], where)
    if image.shape[:2] != self.image_size:
      raise DataError(f"image is {image.shape[0]}x{image.shape[1]}, the pipeline expects "
                      f"{self.image_size[0]}x{self.image_size[1]}", **where)
    return {"image": image, "label": np.int32(example["label"])}

  def _where(self, index: int) -> dict[str, Any]:
    locate = getattr(self.source, "locate", None)
    return locate(index) if locate else {"record": index}

  def __call__(self, index: int) -> dict[str, Any]:
    if not self.skip_bad_records:
      return self._load(index)
    bad = 0
    while True:
      try:
        example = self._load(index)
        example["bad_records"] = np.int32(bad)
        return example
      except DataError as e:
        bad += 1
        logging.warning("skipping bad record (%d in a row): %s", bad, e)
        if bad >= _MAX_CONSECUTIVE_BAD:
          raise DataError(f"{bad} bad records in a row; giving up (last: {e})") from e
        index = (index + 1) % len(self.source)


def _flip(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  if rng.random() < 0.5:
    example["image"] = example["image"][:, ::-1]
  return example


def _normalize(example: dict[str, Any]) -> dict[str, Any]:
  # (x / 255 - 0.5) / 0.5, the official UniTSFace and arcface_torch input transform.
  image = example["image"].astype(np.float32)
  image *= np.float32(2.0 / 255.0)
  image -= np.float32(1.0)
  example["image"] = image
  return example


def make_batches(source, config: PipelineConfig, *, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """This host's stream of batches as a random-access grain ``MapDataset`` (batch b at [b]).

  Args:
    source: any object with ``len``, ``__getitem__`` and ``num_classes`` (see ``sources``).
    config: the pipeline settings.
    process_index: this host's index (``jax.process_index()``).
    process_count: number of hosts (``jax.process_count()``).

  Returns:
    Batches ``{"image": float32 [B, H, W, 3], "label": int32 [B]}`` (plus ``"bad_records"``
    int32 [B] when skipping); infinitely many when ``num_epochs`` is None.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  n = len(source)
  per_epoch = examples_per_epoch(n, config.batch_size, process_count)
  if per_epoch == 0:
    raise ValueError(f"{n} examples cannot fill one batch of {config.batch_size} on each of "
                     f"{process_count} hosts")
  positions = grain.MapDataset.range(per_epoch).repeat(config.num_epochs)
  ds = positions.map_with_index(_SourceIndex(n, per_epoch, config.seed, config.shuffle,
                                             process_index, process_count))
  ds = ds.map(_ReadDecode(source, config.image_size, config.skip_bad_records))
  if config.random_flip:
    # Seeded per position (grain's random_map), so the flips repeat after a restore.
    ds = ds.random_map(_flip, seed=config.seed)
  ds = ds.map(_normalize)
  # Batch before the workers: a batch is then one element that one worker builds whole, and
  # mp_prefetch interleaves workers in order, so batch b holds the same examples for any
  # worker count.
  return ds.batch(config.batch_size, drop_remainder=True)


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
  """

  def __init__(self, source, config: PipelineConfig, *, process_index: int = 0,
               process_count: int = 1):
    self._source = source
    self._config = config
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
    c = self._config
    return {"num_examples": len(self._source), "batch_size": c.batch_size, "seed": c.seed,
            "shuffle": c.shuffle, "random_flip": c.random_flip,
            "process_index": self._process_index, "process_count": self._process_count}

  def start_prefetch(self) -> None:
    """Builds the grain pipeline at the current position and starts its workers."""
    if self._iterator is None:
      ds = make_pipeline(self._source, self._config, process_index=self._process_index,
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
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
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
