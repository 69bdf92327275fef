"""data.pixels: decoding against Pillow, normalisation values, mirroring, NumPy and JAX alike."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from unitsface_jax.data import DataError, pixels


def _face_like(height=112, width=96, seed=0):
  """Smooth colour blocks: JPEG keeps them close, so a channel swap or a flip shows."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  return np.ascontiguousarray(
      blocks.repeat(-(-height // 8), 0).repeat(-(-width // 8), 1)[:height, :width])


def _pillow(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize("subsampling", ["444", "420"])
def test_jpeg_decodes_like_pillow(subsampling):
  data = simplejpeg.encode_jpeg(_face_like(), quality=90, colorsubsampling=subsampling)
  image = pixels.decode_image(data)
  assert image.dtype == np.uint8 and image.shape == (112, 96, 3)
  # Both are libjpeg-turbo; allow one level for a different build's IDCT rounding.
  np.testing.assert_allclose(image, _pillow(data), atol=1)
  # RGB order, not BGR: close to the source, far from its channels reversed.
  error = np.abs(image.astype(int) - _face_like()).mean()
  swapped = np.abs(image.astype(int) - _face_like()[..., ::-1]).mean()
  assert error < 10 and 4 * error < swapped


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "L"), ("PPM", "L"),
                                       ("PPM", "RGB"), ("BMP", "RGB")])
def test_lossless_formats_decode_exactly(fmt, mode):
  rgb = _face_like(seed=1)
  source = rgb if mode == "RGB" else rgb[..., 0]
  data = _encode(source, fmt)  # "PPM" with mode L writes a PGM
  image = pixels.decode_image(data)
  assert image.dtype == np.uint8 and image.shape == (112, 96, 3)
  np.testing.assert_array_equal(image, _pillow(data))
  np.testing.assert_array_equal(image, rgb if mode == "RGB" else np.stack([source] * 3, -1))


def test_pgm_from_the_test_data(data_dir):
  data = (data_dir / "orl_faces" / "s1" / "1.pgm").read_bytes()
  image = pixels.decode_image(data)
  assert image.shape == (112, 92, 3)
  np.testing.assert_array_equal(image, np.stack([_pillow(data)[..., 0]] * 3, -1))


def test_jpeg_of_the_out_size_is_decoded_into_out():
  data = simplejpeg.encode_jpeg(_face_like(), quality=90)
  out = np.zeros((112, 96, 3), np.uint8)
  assert pixels.decode_image(data, out=out) is out
  np.testing.assert_array_equal(out, pixels.decode_image(data))
  # Another size, or not a JPEG: a new array, and ``out`` is left alone.
  other = np.zeros((112, 112, 3), np.uint8)
  image = pixels.decode_image(data, out=other)
  assert image is not other and image.shape == (112, 96, 3) and not other.any()
  png = _encode(_face_like(), "PNG")
  image = pixels.decode_image(png, out=out * 0)
  assert image.shape == (112, 96, 3)


@pytest.mark.parametrize("data", [
    b"\x00\x01garbage",                                   # Pillow: no known format
    b"\xff\xd8\xff" + b"\x00" * 40,                       # a JPEG header and nothing else
    simplejpeg.encode_jpeg(_face_like(), quality=90)[:300],  # a truncated JPEG
    _encode(_face_like(), "PNG")[:100],                    # a truncated PNG
], ids=["garbage", "jpeg_header_only", "truncated_jpeg", "truncated_png"])
@pytest.mark.parametrize("with_out", [False, True])
def test_undecodable_bytes_raise_a_data_error_naming_the_image(data, with_out):
  out = np.zeros((112, 96, 3), np.uint8) if with_out else None
  with pytest.raises(DataError, match=r"^file faces/7\.jpg: undecodable image \(\d+ bytes\)"):
    pixels.decode_image(data, name="faces/7.jpg", out=out)
  with pytest.raises(DataError, match=r"^undecodable image"):
    pixels.decode_image(data)


def test_normalize_values_and_dtype():
  x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, -1)
  y = pixels.normalize(x)
  assert y.dtype == np.float32 and y.shape == x.shape
  assert x[0, 0, 0, 0] == 0  # the input is not touched
  flat = y[..., 0].ravel()
  assert flat[0] == -1.0 and flat[255] == 1.0
  # 127 and 128 straddle 0: -1/255 and 1/255 within float32 rounding near 1 (6e-8).
  np.testing.assert_allclose(flat[127:129], [-1 / 255, 1 / 255], atol=6e-8, rtol=0)
  want = (np.arange(256) / 255 - 0.5) / 0.5
  np.testing.assert_allclose(flat, want, atol=2.4e-7, rtol=0)  # two float32 roundings
  # The exact arithmetic: product rounded to float32, then the subtraction.
  exact = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  np.testing.assert_array_equal(flat, exact)


def test_normalize_on_jax_arrays_and_under_jit():
  x = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  eager = pixels.normalize(jnp.asarray(x))
  assert isinstance(eager, jax.Array) and eager.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(eager), pixels.normalize(x))
  # Under jit: the very expression the training step uses, bit for bit (XLA may fuse it into
  # a multiply-add, one ulp from NumPy's two roundings).
  jitted = np.asarray(jax.jit(pixels.normalize)(x))
  train_form = np.asarray(jax.jit(lambda v: v.astype(jnp.float32) * (2.0 / 255.0) - 1.0)(x))
  np.testing.assert_array_equal(jitted, train_form)
  np.testing.assert_allclose(jitted, pixels.normalize(x), atol=1.2e-7, rtol=0)


def _reversed_width(x: np.ndarray) -> np.ndarray:
  return np.take(x, np.arange(x.shape[-2])[::-1], axis=-2)


def test_mirror_reverses_the_width_axis():
  batch = np.random.default_rng(3).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pixels.mirror(batch), _reversed_width(batch))
  np.testing.assert_array_equal(pixels.mirror(batch[1]), _reversed_width(batch[1]))  # HWC
  assert pixels.mirror(batch)[0, 2, 0, 1] == batch[0, 2, 6, 1]
  np.testing.assert_array_equal(np.asarray(pixels.mirror(jnp.asarray(batch))),
                                _reversed_width(batch))
  np.testing.assert_array_equal(np.asarray(jax.jit(pixels.mirror)(batch)),
                                _reversed_width(batch))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mirror_where_numpy(dtype):
  batch = np.random.default_rng(4).integers(0, 256, (6, 5, 7, 3)).astype(dtype)
  flips = np.array([True, False, False, True, True, False])
  want = np.stack([_reversed_width(b) if f else b for b, f in zip(batch, flips)])
  before = batch.copy()
  got = pixels.mirror_where(batch, flips)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(batch, before)  # a new array by default
  target = np.empty_like(batch)
  assert pixels.mirror_where(batch, flips, out=target) is target
  np.testing.assert_array_equal(target, want)
  assert pixels.mirror_where(batch, flips, out=batch) is batch  # in place, as the pipeline
  np.testing.assert_array_equal(batch, want)
  none = np.zeros(6, bool)
  np.testing.assert_array_equal(pixels.mirror_where(before, none), before)


def test_mirror_where_jax_and_under_jit():
  batch = np.random.default_rng(5).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
  flips = np.array([False, True, False, True, True, False])
  want = np.stack([_reversed_width(b) if f else b for b, f in zip(batch, flips)])
  got = pixels.mirror_where(jnp.asarray(batch), jnp.asarray(flips))
  assert isinstance(got, jax.Array)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(pixels.mirror_where)(batch, flips)), want)
  # As the training step will run it: mirror, then normalise, in one jitted function.
  step = jax.jit(lambda b, f: pixels.normalize(pixels.mirror_where(b, f)))
  np.testing.assert_allclose(np.asarray(step(batch, flips)), pixels.normalize(want),
                             atol=1.2e-7, rtol=0)
  with pytest.raises(TypeError, match="NumPy"):
    pixels.mirror_where(jnp.asarray(batch), flips, out=batch)
