"""Aligned face crops from loose image files (IJB ``loose_crop/``), in parallel, with a cache.

Each image is decoded (EXIF orientation applied, as ``cv2.imread`` does for insightface
``eval_ijbc.py``) and warped by its five landmarks to the ArcFace template (``align``). A
batch of crops is one grain element built whole by one worker process, so batches come in
file order for any worker count, and the next batches are prepared while the caller embeds
the current one.

The aligned uint8 crops can be kept in a cache file, a plain ``.npy`` [N, S, S, 3] on local
disk (read memory-mapped) or on gs:// (read in order), named by a fingerprint of the image
names, the landmarks and the crop size, so evaluating a second model skips decode and align.
The images' bytes are not part of the fingerprint (reading them all would cost what the cache
saves): images replaced under the same names need another cache folder. IJB-C's 469,375
crops at 112x112 take 17.7 GB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging
from etils import epath

from unitsface_jax import storage
from unitsface_jax.data import align, pixels

# Part of the cache fingerprint: bump when decoding or alignment changes what a crop holds.
CROP_FORMAT = "exif-orientation,umeyama-bilinear-v1"


@dataclasses.dataclass(frozen=True)
class AlignBatch:
  """Batch ``b`` of aligned uint8 crops [<=batch_size, S, S, 3]: a grain map callable.

  It is pickled to the worker processes, so it holds only paths and NumPy arrays.
  """
  folder: str
  names: np.ndarray  # [N] file names under ``folder``
  landmarks: np.ndarray  # [N, 5, 2] (x, y) in image pixels
  batch_size: int
  image_size: int = 112

  def __len__(self) -> int:
    return -(-len(self.names) // self.batch_size)

  def __call__(self, b: int) -> np.ndarray:
    lo = b * self.batch_size
    hi = min(lo + self.batch_size, len(self.names))
    size = self.image_size
    out = np.empty((hi - lo, size, size, 3), np.uint8)
    folder = epath.Path(self.folder)
    for j, i in enumerate(range(lo, hi)):
      path = folder / str(self.names[i])
      image = pixels.decode_image(path.read_bytes(), name=os.fspath(path), exif=True)
      out[j] = align.align_face(image, self.landmarks[i], size)
    return out


def aligned_batches(folder: str | os.PathLike, names: Sequence[str] | np.ndarray,
                    landmarks: np.ndarray, *, batch_size: int = 64, image_size: int = 112,
                    workers: int = 0, threads: int = 4) -> Iterator[np.ndarray]:
  """Yields the aligned crops of ``folder/names[i]`` in order, ``batch_size`` at a time.

  Args:
    folder: the image folder (local or gs://).
    names: [N] file names.
    landmarks: [N, 5, 2] five points per image.
    batch_size: crops per yielded array (the last may be shorter).
    image_size: crop side (a multiple of 112 or 128).
    workers: grain worker processes decoding and aligning; 0 decodes in this process with
      ``threads`` threads (libjpeg-turbo and most of the warp release the GIL).
    threads: threads when ``workers`` is 0.

  Raises:
    DataError: an image is undecodable; names the file.
    OSError: an image is missing or unreadable (FileNotFoundError names the file).
  """
  make = AlignBatch(os.fspath(folder), np.asarray(names), np.asarray(landmarks, np.float64),
                    batch_size, image_size)
  if len(make) == 0:
    return
  ds = grain.MapDataset.range(len(make)).map(make)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers > 0 else max(1, threads),
                                            prefetch_buffer_size=2 if workers > 0 else
                                            2 * max(1, threads)))
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read its absl flags; a library caller outside absl.app gets their
      # defaults (a later app.run parses the command line as usual).
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2))
  iterator = iter(it)
  try:
    yield from iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def cache_path(cache_dir: str | os.PathLike, names: np.ndarray, landmarks: np.ndarray, *,
               image_size: int = 112, prefix: str = "crops") -> epath.Path:
  """The cache file for these images: ``<cache_dir>/<prefix>_<N>_<S>_<fingerprint>.npy``."""
  digest = hashlib.sha256()
  digest.update(CROP_FORMAT.encode())
  digest.update(f"{image_size}\n".encode())
  digest.update("\n".join(str(n) for n in np.asarray(names)).encode())
  digest.update(np.ascontiguousarray(landmarks, np.float32).tobytes())
  n = len(names)
  return epath.Path(cache_dir) / f"{prefix}_{n}_{image_size}_{digest.hexdigest()[:16]}.npy"


def _read_cache(path: epath.Path, n: int, image_size: int, batch_size: int
                ) -> Iterator[np.ndarray] | None:
  """The cached crops in batches, or None (with a warning) when the file cannot serve."""
  shape = (n, image_size, image_size, 3)
  try:
    with path.open("rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      got_shape, fortran, dtype = read_header(f)
      offset = f.tell()
    size = path.stat().length
  except (OSError, ValueError) as e:
    logging.warning("crop cache %s is unreadable (%s); decoding the images again", path, e)
    return None
  want = offset + int(np.prod(shape))
  if tuple(got_shape) != shape or dtype != np.uint8 or fortran or size != want:
    logging.warning("crop cache %s holds %s %s in %d bytes, not uint8 %s in %d; decoding "
                    "the images again", path, dtype, tuple(got_shape), size, shape, want)
    return None

  def batches() -> Iterator[np.ndarray]:
    if not storage.is_remote(path):  # local: memory-mapped, no copy of the whole set
      crops = np.load(os.fspath(path), mmap_mode="r")
      for a in range(0, n, batch_size):
        yield np.array(crops[a:a + batch_size])
      return
    per_crop = image_size * image_size * 3
    with path.open("rb") as f:
      f.seek(offset)
      for a in range(0, n, batch_size):
        count = min(batch_size, n - a)
        data = f.read(count * per_crop)
        if len(data) != count * per_crop:
          raise OSError(f"{path}: the crop cache ended early at crop {a}")
        yield np.frombuffer(data, np.uint8).reshape(count, image_size, image_size, 3)
  return batches()


def cached_aligned_batches(folder: str | os.PathLike, names: np.ndarray, landmarks: np.ndarray,
                           *, cache_dir: str | os.PathLike | None = None,
                           cache_prefix: str = "crops", batch_size: int = 64,
                           image_size: int = 112, workers: int = 0,
                           threads: int = 4) -> Iterator[np.ndarray]:
  """``aligned_batches``, read from or written to a crop cache in ``cache_dir``.

  A complete cache file for the same names, landmarks and size is read instead of the
  images. Otherwise the crops are written as they are made, to a temporary name renamed
  when the last crop is in, so an interrupted run leaves no partial cache.
  """
  names = np.asarray(names)
  n = len(names)
  if cache_dir is None:
    yield from aligned_batches(folder, names, landmarks, batch_size=batch_size,
                               image_size=image_size, workers=workers, threads=threads)
    return
  path = cache_path(cache_dir, names, landmarks, image_size=image_size, prefix=cache_prefix)
  if path.exists():
    cached = _read_cache(path, n, image_size, batch_size)
    if cached is not None:
      logging.info("reading aligned crops from the cache %s", path)
      yield from cached
      return
  path.parent.mkdir(parents=True, exist_ok=True)
  # Host and pid: two hosts writing one gs:// cache never share a temporary name.
  tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
  logging.info("writing aligned crops to the cache %s (%.1f GB)", path,
               n * image_size * image_size * 3 / 1e9)
  done = False
  try:
    with tmp.open("wb") as f:
      np.lib.format.write_array_header_1_0(
          f, {"descr": "|u1", "fortran_order": False,
              "shape": (n, image_size, image_size, 3)})
      for batch in aligned_batches(folder, names, landmarks, batch_size=batch_size,
                                   image_size=image_size, workers=workers, threads=threads):
        f.write(np.ascontiguousarray(batch).tobytes())
        yield batch
    tmp.replace(path)  # over a damaged cache file
    done = True
  finally:
    if not done:
      try:
        tmp.unlink()
      except OSError:
        pass
