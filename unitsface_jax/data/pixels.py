"""Face-image pixels in one place: decode bytes to uint8 RGB, mirror, normalise to [-1, 1]."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from unitsface_jax.data.errors import DataError

# NumPy only at import: the data layer's worker processes must not load JAX. ``normalize``,
# ``mirror`` and ``mirror_where`` reach ``jax.numpy`` through a JAX array's
# ``__array_namespace__``, so they work on JAX arrays and inside ``jax.jit`` all the same.

# Every JPEG starts with the SOI marker followed by another marker.
_JPEG_MAGIC = b"\xff\xd8\xff"


def exif_orientation(data: bytes) -> int:
  """The EXIF Orientation tag (1-8) of JPEG bytes; 1 (as stored) when there is none.

  Walks the JPEG's segments up to the first scan and reads tag 0x0112 of IFD0 in the APP1
  "Exif" segment (TIFF, either byte order): no pixels are decoded, and bytes without EXIF
  (most face crops) cost a few segment headers. Anything malformed reads as 1.
  """
  try:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
      marker = data[pos + 1]
      if marker in (0xD9, 0xDA):  # end of image, start of scan: no EXIF before it
        return 1
      length = int.from_bytes(data[pos + 2:pos + 4], "big")
      segment = data[pos + 4:pos + 2 + length]
      if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
        tiff = segment[6:]
        order = {b"II": "little", b"MM": "big"}[tiff[:2]]
        ifd = int.from_bytes(tiff[4:8], order)
        for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
          entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
          if int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
        return 1
      pos += 2 + length
  except (KeyError, IndexError, ValueError):
    pass
  return 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
  """``image`` [H, W, C] as a viewer shows it under EXIF ``orientation`` (what cv2.imread and
  Pillow's ``ImageOps.exif_transpose`` do): 2 mirror, 3 rotate 180°, 4 flip, 5 transpose,
  6 rotate 90° clockwise, 7 transverse, 8 rotate 90° counter-clockwise."""
  if orientation == 2:
    return image[:, ::-1]
  if orientation == 3:
    return image[::-1, ::-1]
  if orientation == 4:
    return image[::-1]
  if orientation == 5:
    return image.transpose(1, 0, 2)
  if orientation == 6:
    return np.rot90(image, -1)
  if orientation == 7:
    return image[::-1, ::-1].transpose(1, 0, 2)
  if orientation == 8:
    return np.rot90(image, 1)
  return image


def decode_image(data: bytes, *, name: str = "", out: np.ndarray | None = None,
                 exif: bool = False) -> np.ndarray:
  """Decodes encoded image bytes to uint8 RGB [H, W, 3].

  JPEG goes through libjpeg-turbo (simplejpeg); anything else (PNG, PGM, BMP, ...) through
  Pillow. Grey images come back with three equal channels.

  Args:
    data: the encoded image (bytes, bytearray, memoryview, ``np.bytes_``).
    name: what to call the image in an error: a file name, ``file.bin[7]``.
    out: a C-contiguous uint8 [H, W, 3] array. A JPEG of exactly that height and width is
      decoded straight into it (no allocation, no copy) and ``out`` is returned; any other
      image comes back in a new array, whatever its size, for the caller to check.
    exif: apply the JPEG's EXIF Orientation tag (``orient``), as cv2.imread does: for image
      files read loose (image folders, IJB crops, LFW-style pairs). Images stored in a
      RecordIO or .bin set are used as stored (insightface's readers ignore the tag there).

  Raises:
    DataError: the bytes are not a decodable image; names ``name`` as its ``path``.
  """
  data = bytes(data)
  try:
    if data[:3] == _JPEG_MAGIC:
      orientation = exif_orientation(data) if exif else 1
      if orientation != 1:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
        return np.ascontiguousarray(orient(image, orientation))
      if out is not None:
        # Reading the header costs little next to a decode and spares a copy.
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width) == out.shape[:2]:
          # simplejpeg returns a new array object on the buffer; give back ``out`` itself, so
          # that callers can tell by identity that it holds the image.
          simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
          return out
      return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  # the decoders raise many types
    raise DataError(f"undecodable image ({len(data)} bytes): {type(e).__name__}: {e}",
                    path=name or None) from None


def normalize(pixels: Any) -> Any:
  """uint8 pixels -> float32 ``(x / 255 - 0.5) / 0.5``, computed as ``x * (2 / 255) - 1``.

  The official UniTSFace and arcface_torch input transform. A NumPy array gives a new NumPy
  array; a JAX array (or tracer) gives ``x.astype(float32) * (2.0 / 255.0) - 1.0`` in
  ``jax.numpy``. Both round the product to float32 before subtracting, so they agree bit for
  bit outside ``jax.jit``; under jit XLA may fuse the two into one multiply-add (a difference
  of at most one float32 ulp).
  """
  if isinstance(pixels, np.ndarray):
    # Convert once, then scale and shift in place: a mixed uint8 * float32 multiply is ten
    # times slower, and each temporary costs a pass over the batch.
    images = pixels.astype(np.float32)
    np.multiply(images, np.float32(2.0 / 255.0), out=images)
    np.subtract(images, np.float32(1.0), out=images)
    return images
  xp = pixels.__array_namespace__()
  return pixels.astype(xp.float32) * (2.0 / 255.0) - 1.0


def mirror(images: Any) -> Any:
  """Horizontal flip of HWC or NHWC images: the width axis (second from last) reversed. A
  NumPy array gives a view, a JAX array a new array."""
  return images[..., ::-1, :]


def mirror_where(images: Any, flips: Any, *, out: np.ndarray | None = None) -> Any:
  """Mirrors ``images[i]`` (NHWC) where ``flips[i]`` (bool [N]); the others pass unchanged.

  JAX arrays (and tracers) give a new array from ``where``. NumPy arrays give ``out`` (a new
  array when it is None): pass ``out=images`` to mirror a batch in place, as the input
  pipeline does; only the flipped images are touched.
  """
  if not isinstance(images, np.ndarray):
    if out is not None:
      raise TypeError("out= is for NumPy arrays; JAX arrays are immutable")
    xp = images.__array_namespace__()
    return xp.where(flips[:, None, None, None], mirror(images), images)
  if out is None:
    out = images.copy()
  elif out is not images:
    out[...] = images
  rows = np.flatnonzero(flips)
  if out.dtype == np.uint8 and out.shape[-1] == 3 and out.flags.c_contiguous:
    # Reverse whole 3-byte pixels (a 'V3' view, [N, H, W]): twice as fast as a strided uint8
    # copy. The right-hand side is a copy (fancy indexing), so writing back is safe.
    as_pixels = out.view("V3")[..., 0]
    as_pixels[rows] = as_pixels[rows, :, ::-1]
  else:
    out[rows] = mirror(out[rows])
  return out
