"""Backbones of the tests' own, registered with ``models.register``.

``tiny_test``: one strided 3x3 convolution, BatchNorm, PReLU, a 4x4 average pool, dropout, a
linear layer and the frozen-scale BatchNorm of the embedding, on 112x112 faces. For the tests
whose subject is not the backbone (a loss, the head's settings, the loop's bookkeeping): it
has the parts a trunk gives the train step (convolution, batch statistics, dropout, float32
embeddings from ``dtype`` activations) and compiles fast: a cold one-device smoke run took
2.5 s longer than a warm one (7.8 against 5.3 s), the narrow IResNet-18's 8.7 s (16.7 against
8.0 s).

``vit_test``, ``mbf_test`` and ``iresnet_test``: the package's ViT with 2 blocks,
MobileFaceNet with one block a stage and IResNet with one block a stage (below).

``tests/conftest.py`` registers them for the test session (after collection),
``tests/train_run.py`` in its child processes.
"""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from unitsface_jax import models
from unitsface_jax.models.iresnet import IResNet
from unitsface_jax.models.layers import BatchNorm, PReLU, conv
from unitsface_jax.models.mobilefacenet import MobileFaceNet
from unitsface_jax.models.vit import VisionTransformer

NAME = "tiny_test"
# vit_t (embedding 256 x width / 64, 8 heads, drop path 0.1, 10 % of the tokens masked) with 2
# blocks instead of 12: the package's ViT, its noise streams and its layers, in a sixth of
# vit_t's compile time.
VIT_NAME = "vit_test"
# mbf (channel scale 2) with one block a stage instead of (1, 4, 6, 2): the package's
# MobileFaceNet and its layers in a fraction of mbf's compile time.
MBF_NAME = "mbf_test"
# IResNet with one block a stage instead of iresnet18's two: every layer of the IR trunk (the
# stem, a strided block with its downsample in each stage, remat's unit) in less compile time
# (the plan's XLA:TPU command line: 58 s of CPU time against 87 s); where the trunk is the
# subject but not its depth (remat, the initialiser at -O1, the head-only step, the XLA:TPU
# compile of the plan, the strided-gradients benchmark).
IRESNET_NAME = "iresnet_test"
# PYTHONPATH for a child process started as a user starts it (``python -m unitsface_jax.main``,
# a benchmark script, launch/local_multiprocess.sh) that knows these backbones from its start:
# tests/launch_site/sitecustomize.py registers them; this checkout's package after it.
_TESTS = pathlib.Path(__file__).resolve().parent
CHILD_PYTHONPATH = os.pathsep.join((str(_TESTS / "launch_site"), str(_TESTS.parent)))
# Overrides of configs/demo.py:smoke that train it (a flag per entry for a child process).
CONFIG = {"model.name": NAME, "model.width": 4, "model.num_features": 32}
FLAGS = tuple(f"--config.{key}={value}" for key, value in CONFIG.items())


class TinyBackbone(nnx.Module):
  """[N, 112, 112, 3] -> conv 3x3 stride 4 (``width`` channels) -> BN -> PReLU -> [N, 28, 28, w]
  -> 4x4 average pool -> [N, 7 * 7 * w] -> dropout -> linear -> BN (scale frozen at 1)."""

  def __init__(self, *, num_features=512, dropout=0.0, width=64, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv1 = conv(3, width, 3, 4, 1, kernel_init=nnx.initializers.normal(0.1), dtype=dtype,
                      rngs=rngs)
    self.bn1 = BatchNorm(width)
    self.prelu = PReLU(width)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.fc = nnx.Linear(width * 7 * 7, num_features, rngs=rngs)
    self.features = BatchNorm(num_features, frozen_scale=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.prelu(self.bn1(self.conv1(x)))
    n, _, _, c = x.shape
    x = x.reshape(n, 7, 4, 7, 4, c).mean((2, 4)).astype(jnp.float32).reshape(n, -1)
    return self.features(self.fc(self.dropout(x)))


_FACTORIES = {
    NAME: TinyBackbone,
    VIT_NAME: functools.partial(VisionTransformer, 256, 2, 8, drop_path=0.1, mask_ratio=0.1),
    MBF_NAME: functools.partial(MobileFaceNet, (1, 1, 1, 1), 2),
    IRESNET_NAME: functools.partial(IResNet, (1, 1, 1, 1)),
}


def register() -> None:
  """Registers the backbones under their names (once a process)."""
  for name, factory in _FACTORIES.items():
    if name not in models.list_models():
      models.register(name, factory)


def unregister() -> None:
  for name in _FACTORIES:
    models.unregister(name)
