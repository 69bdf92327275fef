"""``train.abstract_state`` (what ``unitsface_jax.plan`` compiles from) against what
``train.init_state`` creates on a CPU mesh of the same size: the same shapes, dtypes and
shardings, leaf for leaf. Run by tests/test_plan.py on 8 simulated devices."""

import jax
import pytest

import tiny_backbone
from configs import demo
from unitsface_jax import optim, parallel, train


def _variants():
  """The smoke recipe with SGD on an IR trunk of one block a stage; the optimiser and head
  variants on the tests' own backbone (tests/tiny_backbone.py: one initialiser to compile
  instead of a trunk's)."""
  sgd = demo.get_config("smoke")
  sgd.model.name = tiny_backbone.IRESNET_NAME
  adamw = demo.get_config("smoke")
  adamw.optimizer.name = "adamw"
  adamw.optimizer.grad_accum_steps = 2
  adamw.loss.head_dtype = "bfloat16"
  bce = demo.get_config("smoke,normbce")
  bce.loss.sample_rate = 0.5
  for config in (adamw, bce):
    config.update_from_flattened_dict(tiny_backbone.CONFIG)
  return {"sgd": sgd, "adamw_accumulated_bf16_head": adamw, "normalized_bce_partial_fc": bce}


@pytest.mark.parametrize("name", sorted(_variants()))
@pytest.mark.parametrize("devices", [3, 8])
def test_abstract_state_is_the_state_init_state_creates(name, devices):
  config = _variants()[name]
  mesh = parallel.make_mesh(devices)
  tx = optim.make(config, 8)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  abstract_graphdef, rng_shapes, abstract = train.abstract_state(config, mesh, tx)
  assert abstract_graphdef == graphdef
  real = jax.tree_util.tree_flatten_with_path(state)
  planned = jax.tree_util.tree_flatten_with_path(abstract)
  assert real[1] == planned[1]
  for (path, x), (_, a) in zip(real[0], planned[0]):
    where = jax.tree_util.keystr(path)
    assert (a.shape, a.dtype) == (x.shape, x.dtype), where
    assert a.sharding.is_equivalent_to(x.sharding, x.ndim), where
    assert a.sharding.spec == x.sharding.spec, where
  assert jax.tree.map(lambda x: (x.shape, x.dtype), rng_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), rng_shapes)
  # The head's rows are split over the devices, as the plan counts them.
  assert state.params["head"].w.sharding.spec[0] == parallel.DEVICE_AXIS
