"""Embedding extraction: NNX apply_fn, flip fusion, padded last batch, sharding over devices."""

import os
import subprocess
import sys
import textwrap

import conftest
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitsface_jax.evaluation import extract


class TinyNet(nnx.Module):
  """Conv + BatchNorm + Dropout + Linear: has inference switches and running statistics."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), strides=(4, 4), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(4 * 28 * 28, 8, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.fc(x.reshape(x.shape[0], -1))


def _model():
  model = TinyNet(nnx.Rngs(0))
  # Non-trivial running statistics, so that train-mode BN would give different outputs.
  model.bn.mean[...] = jnp.linspace(-0.5, 0.5, 4)
  model.bn.var[...] = jnp.linspace(0.5, 2.0, 4)
  model.eval()
  return model


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _direct(model, images):
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  return np.asarray(model(jnp.asarray(x)))


def test_nnx_apply_fn_matches_module_and_fuses_flip():
  model = _model()
  images = _images(11)
  emb, emb_flip = extract.extract_raw(extract.nnx_apply_fn(model), images, batch_size=4,
                                      progress=False)
  np.testing.assert_allclose(emb, _direct(model, images), atol=1e-5)
  np.testing.assert_allclose(emb_flip, _direct(model, images[:, :, ::-1]), atol=1e-5)
  fused = extract.embed(extract.nnx_apply_fn(model), images, batch_size=4, progress=False)
  want = emb + emb_flip
  np.testing.assert_allclose(fused, want / np.linalg.norm(want, axis=1, keepdims=True),
                             atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-6)


def test_same_structure_reuses_the_compiled_step():
  model = _model()
  images = _images(8)
  extract.extract_raw(extract.nnx_apply_fn(model), images, batch_size=8, progress=False)
  before = extract._forward._cache_size()
  model.fc.bias[...] = model.fc.bias[...] + 1.0  # new weights, same graph
  emb, _ = extract.extract_raw(extract.nnx_apply_fn(model), images, batch_size=8,
                               progress=False)
  assert extract._forward._cache_size() == before
  np.testing.assert_allclose(emb, _direct(model, images), atol=1e-5)


def test_plain_function_iterable_input_and_noflip():
  w = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)

  def apply_fn(x):
    return x.mean(axis=(1, 2)) @ w

  images = _images(10)
  chunks = [images[:3], images[3:4], images[4:10]]
  emb, flip = extract.extract_raw(apply_fn, iter(chunks), num_images=10, batch_size=4,
                                  flip=False, progress=False)
  assert flip is None
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(emb, x.mean(axis=(1, 2)) @ w, atol=1e-5)
  with pytest.raises(ValueError, match="expected 12 images"):
    extract.extract_raw(apply_fn, iter(chunks), num_images=12, batch_size=4, progress=False)


@pytest.mark.slow
def test_batches_are_sharded_over_four_devices(tmp_path):
  """In a fresh process with 4 host devices: same embeddings, batch laid over all devices."""
  script = textwrap.dedent("""
      import numpy as np, jax
      from flax import nnx
      import sys; sys.path.insert(0, %r)
      from test_eval_extract import _model, _images, _direct
      from unitsface_jax.evaluation import extract
      assert jax.device_count() == 4
      model = _model()
      images = _images(10)
      emb, _ = extract.extract_raw(extract.nnx_apply_fn(model), images, batch_size=6,
                                   progress=False)
      np.testing.assert_allclose(emb, _direct(model, images), atol=1e-5)
      mesh = extract.batch_mesh()
      from jax.sharding import NamedSharding, PartitionSpec as P
      x = jax.device_put(images[:8], NamedSharding(mesh, P(mesh.axis_names[0])))
      out = extract._forward(jax.tree_util.Partial(lambda v: v.sum(axis=(1, 2))), x)[0]
      assert len(out.sharding.device_set) == 4, out.sharding
      print("OK")
  """) % os.path.dirname(__file__)
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(4),
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
