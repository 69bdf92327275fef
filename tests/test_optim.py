"""The optimiser equals torch.optim.SGD with clip_grad_norm_; schedules; the PReLU clamp."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from unitsface_jax import optim


def test_sgd_matches_torch_sgd_with_coupled_decay_and_clipping():
  torch = pytest.importorskip("torch")
  config = default.get_config()
  config.optimizer.clip_norm = 1.0  # small, so the clip is active
  rng = np.random.RandomState(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  targets = [rng.normal(size=(4, 3)).astype(np.float32) * 3 for _ in range(5)]

  tx = optim.sgd(config, steps_per_epoch=100)
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=5e-4)
  for t in targets:
    grads = jax.grad(lambda p: jnp.sum((p["w"] - t) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    opt.zero_grad()
    torch.sum((tw - torch.from_numpy(t)) ** 2).backward()
    torch.nn.utils.clip_grad_norm_([tw], 1.0)
    opt.step()
  np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_multistep_schedule_decays_at_official_epochs():
  config = default.get_config()
  sched = optim.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(sched(159)) == pytest.approx(0.1)
  assert float(sched(160)) == pytest.approx(0.01)
  assert float(sched(240)) == pytest.approx(0.001)


def test_polynomial_schedule_warms_up_then_decays_to_zero():
  config = default.get_config()
  config.schedule.name = "polynomial"
  config.schedule.warmup_epochs = 1.0
  config.num_epochs = 5
  sched = optim.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.05)
  assert float(sched(10)) == pytest.approx(0.1)
  # insightface PolynomialLRWarmup: lr * (1 - (t - warmup) / (total - warmup)) ** 2
  assert float(sched(30)) == pytest.approx(0.1 * (1 - 20 / 40) ** 2)
  assert float(sched(50)) == pytest.approx(0.0)


def test_clamp_prelu_touches_only_slopes():
  params = {"prelu": {"slope": jnp.array([-1.0, 0.005, 0.3])},
            "bn": {"scale": jnp.array([-1.0, 0.0])}}
  out = optim.clamp_prelu(params)
  np.testing.assert_array_equal(out["prelu"]["slope"], np.float32([0.01, 0.01, 0.3]))
  np.testing.assert_array_equal(out["bn"]["scale"], [-1.0, 0.0])
