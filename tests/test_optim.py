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


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_polynomial_schedule_warms_up_then_decays_to_zero(power):
  config = default.get_config()
  config.schedule.name = "polynomial"
  config.schedule.power = power
  config.schedule.warmup_epochs = 1.0
  config.num_epochs = 5
  sched = optim.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.05)
  assert float(sched(10)) == pytest.approx(0.1)
  # insightface PolynomialLRWarmup: lr * (1 - (t - warmup) / (total - warmup)) ** power
  assert float(sched(30)) == pytest.approx(0.1 * (1 - 20 / 40) ** power)
  assert float(sched(50)) == pytest.approx(0.0)


def test_clamp_prelu_touches_only_slopes():
  params = {"prelu": {"slope": jnp.array([-1.0, 0.005, 0.3])},
            "bn": {"scale": jnp.array([-1.0, 0.0])}}
  out = optim.clamp_prelu(params)
  np.testing.assert_array_equal(out["prelu"]["slope"], np.float32([0.01, 0.01, 0.3]))
  np.testing.assert_array_equal(out["bn"]["scale"], [-1.0, 0.0])


def _adamw_config(clip_norm):
  config = default.get_config()
  config.optimizer.name = "adamw"
  config.optimizer.lr = 0.01
  config.optimizer.weight_decay = 0.1
  config.optimizer.clip_norm = clip_norm
  return config


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_adamw_matches_torch_adamw_with_decoupled_decay_and_clipping(clip_norm):
  """optim.make with name adamw against torch.optim.AdamW(lr, weight_decay) after
  clip_grad_norm_ over all parameters, as arcface_torch's train_v2.py steps it."""
  torch = pytest.importorskip("torch")
  config = _adamw_config(clip_norm)
  rng = np.random.RandomState(0)
  w0 = {"backbone": rng.normal(size=(4, 3)).astype(np.float32),
        "head": rng.normal(size=(5, 2)).astype(np.float32)}
  targets = [{k: rng.normal(size=v.shape).astype(np.float32) * 3 for k, v in w0.items()}
             for _ in range(6)]

  tx = optim.make(config, steps_per_epoch=100)
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  tw = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in w0.items()}
  opt = torch.optim.AdamW([{"params": [tw["backbone"]]}, {"params": [tw["head"]]}], lr=0.01,
                          weight_decay=0.1)
  for t in targets:
    loss = lambda p, t=t: sum(jnp.sum((p[k] - t[k]) ** 2) for k in p)  # noqa: E731
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    opt.zero_grad()
    sum(torch.sum((tw[k] - torch.from_numpy(t[k])) ** 2) for k in tw).backward()
    if clip_norm:
      norm = torch.nn.utils.clip_grad_norm_(list(tw.values()), clip_norm)
      assert norm > 2 * clip_norm  # the clip is active
    opt.step()
  for k in w0:
    np.testing.assert_allclose(params[k], tw[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_keeps_a_step_count_per_part():
  """A part frozen for the first updates (optim.keep_frozen) starts its bias correction when
  it starts training, as PyTorch's per-parameter step does: its first update is the first
  update of a fresh Adam (lr x sign of the gradient, decay aside)."""
  config = _adamw_config(0.0)
  config.optimizer.weight_decay = 0.0
  tx = optim.make(config, steps_per_epoch=100)
  params = {"backbone": jnp.zeros(3), "head": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"backbone": jnp.array([1e-3, -2.0, 5.0]), "head": jnp.ones(2)}
  for _ in range(50):  # head-only updates
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    params = optim.keep_frozen(new_params, params)
    state = optim.keep_frozen(new_state, state)
  np.testing.assert_array_equal(params["backbone"], 0.0)
  counts = {jax.tree_util.keystr(p): int(x) for p, x in
            jax.tree_util.tree_flatten_with_path(state)[0] if x.ndim == 0}
  # Adam's count per part; the schedule's count is shared and advances.
  assert {k.split("'")[1] if "inner_states" in k else "schedule": v
          for k, v in counts.items()} == {"backbone": 0, "head": 50, "schedule": 50}, counts
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["backbone"], -0.01 * np.sign(grads["backbone"]),
                             rtol=1e-4)


def test_sgd_is_the_default_optimizer_unchanged():
  config = default.get_config()
  assert config.optimizer.name == "sgd"
  params = {"backbone": jnp.arange(3.0), "head": jnp.ones(2)}
  grads = {"backbone": jnp.array([0.5, -1.0, 2.0]), "head": jnp.array([3.0, -4.0])}
  made, direct = optim.make(config, 10), optim.sgd(config, 10)
  a, _ = made.update(grads, made.init(params), params)
  b, _ = direct.update(grads, direct.init(params), params)
  for k in params:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes()
  config.optimizer.name = "lamb"
  with pytest.raises(ValueError, match="config.optimizer.name = 'lamb'"):
    optim.make(config, 10)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_takes_the_shardings_of_the_parameters_it_mirrors(name):
  """train.init_state: SGD's momentum, Adam's mu and nu and the accumulated gradients of W
  are class-sharded like W (rows over "devices"); the counters are replicated."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from unitsface_jax import parallel, train  # pylint: disable=g-import-not-at-top
  config = demo.get_config("smoke")
  config.model.width, config.model.num_features = 4, 32
  config.optimizer.name = name
  config.optimizer.grad_accum_steps = 2
  tx = optim.make(config, 8)
  _, _, state = train.init_state(config, parallel.make_mesh(1), tx, jax.random.key(0))
  specs = {jax.tree_util.keystr(p): x.sharding.spec
           for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  w_specs = {k: v for k, v in specs.items() if k.endswith(".w")}
  # momentum (sgd) or mu and nu (adamw), and MultiSteps' accumulated gradient
  assert len(w_specs) == (2 if name == "sgd" else 3), specs
  assert all(v == state.params["head"].w.sharding.spec and v[0] == "devices"
             for v in w_specs.values()), w_specs
  counters = [v for k, v in specs.items() if k.endswith(("count", "mini_step", "gradient_step"))]
  assert counters and all(v == jax.sharding.PartitionSpec() for v in counters), specs
