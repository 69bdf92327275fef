"""The demo's smoke run with MobileFaceNet and a ViT: trains and reports held-out accuracy;
the ViT's noise in the train step; rematerialisation.

Each smoke run is a child process (``tests/train_run.py``, one device) of the first epoch of
``configs/demo.py:smoke`` (8 steps of CosFace alone) with ``--config.model.name`` switched,
width 4 and 32-d embeddings (the tests' tiny models) and an evaluation of the held-out demo
pairs after the last step.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_train
import tiny_backbone
from configs import demo
from unitsface_jax import optim, parallel, train

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


# The package's MobileFaceNet with one block a stage and its ViT with 2 blocks
# (tests/tiny_backbone.py): mbf's 13 blocks and vit_t's 12 take several times as long to
# compile, and the blocks of a stage are one module repeated.
@pytest.mark.parametrize("name", [tiny_backbone.MBF_NAME, tiny_backbone.VIT_NAME])
def test_demo_smoke_trains_and_reports_held_out_accuracy(name, tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "train_run.py"), "1", "--config=configs/demo.py:smoke",
       f"--workdir={tmp_path}", f"--config.model.name={name}", "--config.num_epochs=1",
       "--config.eval.every_steps=8",
       "--config.model.width=4", "--config.model.num_features=32",
       "--config.compilation_cache=False"],
      cwd=ROOT, env=test_train._env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if l]
  losses = {m["step"]: m["s2c"] for m in lines if "loss" in m}
  assert sorted(losses) == list(range(1, 9)) and np.isfinite(list(losses.values())).all()
  # Epoch 0 (CosFace alone) lowers the loss on the real faces.
  assert np.mean([losses[s] for s in (6, 7, 8)]) < np.mean([losses[s] for s in (1, 2, 3)])
  accuracy = [m["eval/orl_val/accuracy"] for m in lines if "eval/orl_val/accuracy" in m]
  assert accuracy and 0.5 <= accuracy[-1] <= 1.0, lines


def _losses_at(name: str, steps) -> list[float]:
  """The loss a train step computes at each of ``steps`` from the same weights and the same
  batch (one compiled step: the step number is an argument of it, not a constant)."""
  config = demo.get_config("smoke")
  config.model.name = name
  config.model.width = 4
  config.model.num_features = 32
  config.loss.uss_start_epoch = 100  # the loss is CosFace's alone at every step
  mesh = parallel.make_mesh(1)
  tx = optim.make(config, 100)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (config.batch_size, 112, 112, 3), dtype=np.uint8)
  labels = rng.integers(0, config.data.num_classes, (config.batch_size,), dtype=np.int32)
  batch = train.Batch(jnp.asarray(images), jnp.asarray(labels))
  step_fn = train.make_train_step(config, mesh, graphdef, rng_state, tx, 100)
  result = []
  for step in steps:
    # The step donates its state: each call gets a fresh copy of the same weights.
    at_step = jax.tree.map(jnp.copy, state)._replace(
        step=jax.device_put(jnp.int32(step), parallel.replicated(mesh)))
    _, metrics = step_fn(at_step, batch)
    result.append(float(metrics["loss"]))
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access
  return result


def test_vit_draws_new_token_masks_and_drop_paths_every_step():
  """vit_t's layers (2 blocks: tests/tiny_backbone.py) mask 10 % of the tokens and drop paths
  while training (its dropout is 0): each step reseeds that stream from (seed, step), so the
  same weights and batch give another loss at the next step, and the same loss at the same
  step."""
  at_0, at_1, again_0 = _losses_at(tiny_backbone.VIT_NAME, (0, 1, 0))
  assert at_0 == again_0
  assert at_0 != at_1


def test_remat_gives_the_same_step():
  """``model.remat`` recomputes each IR block's activations in the backward pass: the same
  loss, gradient norm, weights and BatchNorm statistics after a step, and about one more
  forward pass of FLOPs in the compiled program (the recomputation is there)."""
  results = {}
  for remat in (False, True):
    config = demo.get_config("smoke")
    config.model.name = tiny_backbone.IRESNET_NAME  # one IR block a stage
    config.model.width = 4
    config.model.num_features = 32
    config.model.remat = remat
    mesh = parallel.make_mesh(1)
    tx = optim.make(config, 8)
    graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = train.Batch(
        jnp.asarray(rng.integers(0, 256, (config.batch_size, 112, 112, 3), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, 40, (config.batch_size,), dtype=np.int32)))
    step = train.make_train_step(config, mesh, graphdef, rng_state, tx, 8)
    compiled = step.lower(state, batch).compile()  # run the program it measures
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    state, metrics = compiled(state, batch)
    results[remat] = (jax.device_get((state.params["backbone"], state.model_state)),
                      jax.device_get(metrics), flops)
  (want, want_metrics, plain_flops), (got, got_metrics, remat_flops) = results[False], results[True]
  assert 1.15 * plain_flops < remat_flops < 1.6 * plain_flops, (remat_flops, plain_flops)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
