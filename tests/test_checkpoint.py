"""Checkpoints: state with shardings, the data iterator and the config survive a restart."""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from unitsface_jax import checkpoint


def make_iterator():
  return iter(grain.MapDataset.range(50).shuffle(seed=3).batch(4).to_iter_dataset())


def test_save_restore_state_data_and_config(tmp_path):
  config = demo.get_config()
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7),
           "nested": {"seen": jnp.array([True, False])}}
  it = make_iterator()
  for _ in range(3):
    next(it)
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=5, keep=2)
  assert not ckpt.save(3, state, data_iterator=it, config=config)  # not a multiple of 5
  assert ckpt.save(3, state, data_iterator=it, config=config, force=True)
  ckpt.wait()
  expected_next = [next(it) for _ in range(2)]

  fresh = checkpoint.Checkpoints(tmp_path, every_steps=5, keep=2)
  assert fresh.latest_step() == 3
  it2 = make_iterator()
  target = checkpoint.abstract_like(jax.tree.map(jnp.zeros_like, state))
  restored = fresh.restore(3, target, data_iterator=it2)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["w"].sharding == state["w"].sharding
  for want in expected_next:
    np.testing.assert_array_equal(next(it2), want)
  assert fresh.restore_config()["model"]["name"] == "iresnet18"


def test_keeps_only_the_latest_k(tmp_path):
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=2, with_data=False)
  for step in (1, 2, 3):
    ckpt.save(step, {"x": jnp.float32(step)})
  ckpt.wait()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3]
