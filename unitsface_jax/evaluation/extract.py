"""Embedding extraction: uint8 face crops in, flip-fused L2-normalised embeddings out.

Every protocol (verification, IJB, MegaFace) calls the backbone through one pure function
``apply_fn(images) -> embeddings`` on NHWC float images in [-1, 1]. This module batches the
crops, pads the last batch, shards each batch over all local devices along the batch axis,
runs the jitted function on the crops and on their mirror images, and returns the raw
outputs so that each protocol can fuse and normalise them as its reference does
(insightface ``eval/verification.py`` and ``eval_ijbc.py``: f(x) + f(flip x), then L2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from unitsface_jax import parallel
from unitsface_jax.data import pixels

ApplyFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class _MergedCall:
  """Rebuilds an NNX module from its graph definition and calls it.

  Equality is the graph definition's, so that two ``apply_fn`` built from models with the
  same structure share one compiled executable (the weights are traced arguments).
  """
  graphdef: Any

  def __call__(self, state, images):
    return nnx.merge(self.graphdef, state)(images)


def nnx_apply_fn(model: nnx.Module) -> ApplyFn:
  """Turns an NNX module into a pure ``apply_fn(images) -> embeddings``.

  The module is split into its static graph and its state; the returned function is a
  ``jax.tree_util.Partial`` whose leaves are the state arrays, so passing it to a jitted
  function traces the weights as arguments instead of baking them in as constants. Call
  ``model.eval()`` first: the inference switches live in the graph definition.

  Args:
    model: any ``nnx.Module`` mapping [N, H, W, 3] images in [-1, 1] to [N, D].

  Returns:
    A pytree-callable ``apply_fn``.
  """
  graphdef, state = nnx.split(model)
  return jax.tree_util.Partial(_MergedCall(graphdef), state)


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The project's 1-D mesh (``parallel.make_mesh``) over this process's devices.

  Local devices only: each process embeds its own images. The axis is Auto, as for training
  (see ``parallel.make_mesh``).
  """
  return parallel.make_mesh(devices=jax.local_devices() if devices is None else devices)


@jax.jit
def _forward(apply_fn, images):
  """f(x) and f(flip x) for one uint8 NHWC batch, as float32."""
  x = pixels.normalize(images)
  both = jnp.concatenate([x, pixels.mirror(x)], axis=0)
  out = apply_fn(both).astype(jnp.float32)
  n = images.shape[0]
  return out[:n], out[n:]


@jax.jit
def _forward_noflip(apply_fn, images):
  return apply_fn(pixels.normalize(images)).astype(jnp.float32)


def extract_raw(apply_fn: ApplyFn, images: np.ndarray | Iterable[np.ndarray], *,
                num_images: int | None = None, batch_size: int = 128, flip: bool = True,
                mesh: jax.sharding.Mesh | None = None, desc: str = "embedding",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
  """Runs ``apply_fn`` over uint8 crops; returns the unnormalised outputs.

  Args:
    apply_fn: pure function of [B, H, W, 3] float images in [-1, 1]; a plain function or
      the output of :func:`nnx_apply_fn`.
    images: uint8 array [N, H, W, 3], or an iterable of such arrays (any sizes) when the
      set does not fit in memory; then ``num_images`` sizes the output and progress bar.
    num_images: number of images an iterable yields (ignored for an array).
    batch_size: global batch; rounded up to a multiple of the device count.
    flip: also run the horizontally mirrored crops.
    mesh: a 1-D mesh from ``parallel.make_mesh`` (default :func:`batch_mesh`).
    desc: progress bar label.
    progress: show a tqdm bar.

  Returns:
    ``(emb, emb_flip)``, float32 [N, D] each; ``emb_flip`` is None when ``flip`` is False.
  """
  mesh = batch_mesh() if mesh is None else mesh
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  data_sharding = parallel.batch_sharding(mesh)
  if not isinstance(apply_fn, jax.tree_util.Partial):
    # A bare function becomes a leafless pytree whose identity keys the jit cache.
    apply_fn = jax.tree_util.Partial(apply_fn)
  apply_fn = jax.device_put(apply_fn, parallel.replicated(mesh))
  if isinstance(images, np.ndarray):
    num_images = images.shape[0]
    chunks: Iterable[np.ndarray] = (images[i:i + batch_size]
                                    for i in range(0, num_images, batch_size))
  else:
    if num_images is None:
      raise ValueError("num_images is required when images is an iterable")
    chunks = _rebatch(images, batch_size)
  outs, outs_flip = [], []
  bar = tqdm.tqdm(total=num_images, desc=desc, unit="img", disable=not progress)
  seen = 0
  pending = None  # the previous batch's device outputs, fetched once the next is dispatched

  def fetch(done):
    out, count = done
    if flip:
      outs.append(np.asarray(out[0])[:count])
      outs_flip.append(np.asarray(out[1])[:count])
    else:
      outs.append(np.asarray(out)[:count])
    bar.update(count)

  for chunk in chunks:
    count = chunk.shape[0]
    if count < batch_size:
      # Padding keeps one compiled shape; the padded rows are dropped below.
      pad = np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    batch = jax.device_put(np.ascontiguousarray(chunk, np.uint8), data_sharding)
    # Dispatch is asynchronous: the device runs this batch while the host fetches the
    # previous one's embeddings and reads the next crops.
    out = _forward(apply_fn, batch) if flip else _forward_noflip(apply_fn, batch)
    if pending is not None:
      fetch(pending)
    pending = (out, count)
    seen += count
  if pending is not None:
    fetch(pending)
  bar.close()
  if seen != num_images:
    raise ValueError(f"expected {num_images} images, got {seen}")
  emb = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
  emb_flip = (np.concatenate(outs_flip) if outs_flip else np.zeros((0, 0), np.float32)) \
      if flip else None
  return emb, emb_flip


def _rebatch(arrays: Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
  """Regroups arrays of any first-axis sizes into batches of ``batch_size`` (last short)."""
  buf, size = [], 0
  for a in arrays:
    buf.append(a)
    size += a.shape[0]
    while size >= batch_size:
      cat = np.concatenate(buf)
      yield cat[:batch_size]
      rest = cat[batch_size:]
      buf, size = ([rest] if rest.shape[0] else []), rest.shape[0]
  if size:
    yield np.concatenate(buf)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Row-wise L2 normalisation (sklearn.preprocessing.normalize semantics: zero rows stay 0)."""
  x = np.asarray(x)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norm, eps)


def embed(apply_fn: ApplyFn, images: np.ndarray, *, batch_size: int = 128, flip: bool = True,
          mesh: jax.sharding.Mesh | None = None, desc: str = "embedding",
          progress: bool = True) -> np.ndarray:
  """The test embedding of the field: L2(f(x) + f(flip x)) (or L2(f(x)) without flip)."""
  emb, emb_flip = extract_raw(apply_fn, images, batch_size=batch_size, flip=flip, mesh=mesh,
                              desc=desc, progress=progress)
  return l2_normalize(emb + emb_flip if flip else emb)
