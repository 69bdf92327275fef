"""A train state saved on 4 devices restores onto 3, 2 and 8 and trains on as if never stopped.

Needs 8 simulated devices (``conftest.py`` here); ``tests/test_checkpoint.py`` runs this file
in its own process.

Scenario: the smoke recipe on the tests' own backbone (tests/tiny_backbone.py) and C = 10 of the demo's identities, so the class-sharded
arrays (W, M, seen, the class biases and their momentum) have 12 rows on 4 and 3 devices, 10
on 2 and 16 on 8: the restores keep, cut and pad them. Three steps of batch 24 on 4 devices
(two epochs of two steps: CosFace, then CosFace + USS, which initialises b), with classes 8
and 9 left out so that their memory rows are unseen; a checkpoint; three more steps on 4
devices (the uninterrupted run). Each restoring count restores the checkpoint onto its own
freshly built state and runs the same three steps.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_backbone
from configs import demo
from unitsface_jax import checkpoint
from unitsface_jax import optim
from unitsface_jax import parallel
from unitsface_jax import train
from unitsface_jax.data import demo as demo_data
from unitsface_jax.data import pixels
from unitsface_jax.data import sources

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run tests/multidevice in its own process (tests/test_checkpoint.py)")

C = 10
SAVING = 4
RESTORING = (3, 2, 8)
BATCH = 24  # divides over 2, 3, 4 and 8 devices
STEPS_PER_EPOCH = 2  # USS from the third step on
SAVED_AT = 3
NEXT = 3
UNSEEN = (8, 9)  # no example of these classes before the checkpoint

# The arrays split over the devices by class rows, padded to a multiple of the device count.
CLASS_ROWS = (".params['head'].w", ".params['head'].class_bias",
              ".head_buffers.memory", ".head_buffers.seen",
              ".opt_state[2][0].trace['head'].w",
              ".opt_state[2][0].trace['head'].class_bias")

on_each_restoring_count = pytest.mark.parametrize("n", RESTORING, ids=lambda n: f"n={n}")


def _config():
  config = demo.get_config("smoke")
  config.update_from_flattened_dict(tiny_backbone.CONFIG)
  config.data.num_classes = C
  config.batch_size = BATCH
  return config


def _batches():
  """Six fixed batches of the first C demo identities: (uint8 images, labels, flips)."""
  source = sources.RecordIOSource(demo_data.demo_path())
  examples = [source[i] for i in range(len(source))]
  images = np.stack([pixels.decode_image(e["image"]) for e in examples if e["label"] < C])
  labels = np.array([e["label"] for e in examples if e["label"] < C], np.int32)
  rng = np.random.default_rng(0)
  before = np.flatnonzero(~np.isin(labels, UNSEEN))
  batches = []
  for t in range(SAVED_AT + NEXT):
    pick = rng.choice(before if t < SAVED_AT else len(labels), BATCH, replace=False)
    batches.append((images[pick], labels[pick], rng.random(BATCH) < 0.5))
  return batches


def _flat(state):
  """Every array of a state as NumPy, keyed by its path."""
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}


def _train(step, state, batches, mesh):
  metrics = []
  for batch in batches:
    state, m = step(state, train.Batch(*parallel.global_batch(batch, mesh)))
    metrics.append(jax.device_get(m))
  return state, metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The saved state, the uninterrupted run and, per restoring count, the restored state
  (with the fresh state's shardings) and its next steps."""
  config = _config()
  batches = _batches()
  tx = optim.sgd(config, STEPS_PER_EPOCH)
  mesh = parallel.make_mesh(SAVING)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  # USS leaves the class biases (an s2s BCE parameter) at zero; distinct values make a row
  # of a 1-D class-sharded array that moves or goes missing show.
  head = state.params["head"]
  values = jnp.where(jnp.arange(head.class_bias.shape[0]) < C,
                     jnp.arange(1.0, head.class_bias.shape[0] + 1.0), 0.0)
  state = state._replace(params={**state.params, "head": head._replace(
      class_bias=jax.device_put(values, head.class_bias.sharding))})
  step = train.make_train_step(config, mesh, graphdef, rng_state, tx, STEPS_PER_EPOCH)
  state, _ = _train(step, state, batches[:SAVED_AT], mesh)
  ckpt = checkpoint.Checkpoints(tmp_path_factory.mktemp("saved_on_4"), every_steps=1, keep=1,
                                with_data=False)
  ckpt.save(SAVED_AT, state, config=config)
  ckpt.wait()
  saved = _flat(state)
  state, metrics = _train(step, state, batches[SAVED_AT:], mesh)
  result = {"saved": saved, "uninterrupted": (_flat(state), metrics)}
  for n in RESTORING:
    mesh = parallel.make_mesh(devices=jax.devices()[:n])
    # Another key: nothing restored can come from the fresh state's own initialisation.
    graphdef, rng_state, fresh = train.init_state(config, mesh, tx, jax.random.key(1))
    shardings = _shardings(fresh)
    state = checkpoint.restore_state(ckpt, SAVED_AT, fresh, mesh)
    restored = _flat(state)
    restored_shardings = _shardings(state)
    step = train.make_train_step(config, mesh, graphdef, rng_state, tx, STEPS_PER_EPOCH)
    state, metrics = _train(step, state, batches[SAVED_AT:], mesh)
    result[n] = {"restored": restored, "shardings": (shardings, restored_shardings),
                 "next": (_flat(state), metrics)}
  ckpt.close()
  return result


def _shardings(state):
  return {jax.tree_util.keystr(p): (x.sharding, x.ndim)
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_saved_state_is_the_scenario(runs):
  """b initialised, classes 8 and 9 unseen, every class row in use: the restores below
  compare rows that hold something."""
  saved = runs["saved"]
  assert int(saved[".step"]) == SAVED_AT
  assert bool(saved[".head_buffers.initialized"]) and saved[".params['head'].bias"] != 0
  seen = saved[".head_buffers.seen"]
  assert seen.shape == (parallel.padded_classes(C, SAVING),) == (12,)
  np.testing.assert_array_equal(seen[:C], ~np.isin(np.arange(C), UNSEEN))
  memory = saved[".head_buffers.memory"]
  assert np.all(np.abs(memory[:C]).sum(1)[seen[:C]] > 0)
  for name in CLASS_ROWS:
    if name.endswith((".w", ".class_bias")):
      assert np.all(np.abs(saved[name][:C]).reshape(C, -1).sum(1) > 0), name
      assert not saved[name][C:].any(), name


@on_each_restoring_count
def test_restore_carries_every_row_of_every_class_sharded_array(runs, n):
  """Rows of real classes equal the saved ones; the rows padding C to n·⌈C/n⌉ are zero."""
  restored, saved = runs[n]["restored"], runs["saved"]
  rows = parallel.padded_classes(C, n)
  for name in CLASS_ROWS:
    got = restored[name]
    assert got.shape[0] == rows and got.shape[1:] == saved[name].shape[1:], name
    np.testing.assert_array_equal(got[:C], saved[name][:C], err_msg=name)
    assert not got[C:].any(), f"{name}: padding rows {got[C:]}"


@on_each_restoring_count
def test_restore_carries_every_other_array_unchanged(runs, n):
  """Backbone parameters and momentum, BN statistics, b, initialized, step, schedule count."""
  restored, saved = runs[n]["restored"], runs["saved"]
  assert restored.keys() == saved.keys()
  others = [name for name in saved if name not in CLASS_ROWS]
  assert len(others) == len(saved) - len(CLASS_ROWS)
  for name in others:
    assert restored[name].dtype == saved[name].dtype, name
    np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)


@on_each_restoring_count
def test_restored_arrays_have_the_fresh_states_shardings(runs, n):
  fresh, restored = runs[n]["shardings"]
  assert fresh.keys() == restored.keys()
  for name, (sharding, ndim) in fresh.items():
    assert restored[name][0].is_equivalent_to(sharding, ndim), name
    assert len(restored[name][0].device_set) == n, name


@on_each_restoring_count
def test_next_steps_equal_the_uninterrupted_run(runs, n):
  """Losses, data fingerprints, weights, BN statistics and memory bank over three more steps.

  Global BatchNorm statistics and the all-class head make every quantity independent of
  the device count up to the order of float reductions (batch sums of the BN statistics and
  gradients, the head's psums). Three steps of SGD at a gradient norm of hundreds (clipped
  to 10) amplify that rounding to at most ~4e-5 relative in the logged values and ~2e-4 of
  a weight array's largest entry (on 3 devices; ~2e-5 on 2 and 8, on an AMD EPYC), hence
  1e-3 for the weights. On an Intel Xeon (AVX-512) with XLA at -O0 (as test_checkpoint.py
  runs this file) the same code (before and after the train step's rewrite) differed more on
  8 devices: 3.4e-4 in the third step's gradient norm, and up to 1.7e-2 of a BatchNorm
  bias's own largest entry (8.6e-5, small beside the backbone's largest weight), hence 5e-4
  for the logged values and, for the backbone's parameters, the floor taken from the largest
  weight of the backbone (a row restored to the wrong place differs by the array's scale).
  Arrays that are zero in exact arithmetic (the running mean of a normalised activation)
  hold rounding noise of ~2e-7, hence an absolute floor of 1e-6. The momentum is left out:
  it is mostly the last step's gradient, whose elements differ by up to ~3e-3 of the
  array's largest on 3 devices.
  """
  want_state, want = runs["uninterrupted"]
  got_state, got = runs[n]["next"]
  assert len(got) == len(want) == NEXT
  for t, (a, b) in enumerate(zip(got, want)):
    assert int(a["data_fingerprint"]) == int(b["data_fingerprint"]), t
    for key in ("loss", "s2c", "s2s", "threshold_t", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=5e-4, err_msg=f"next step {t} {key}")
  compared = [name for name in want_state
              if name.startswith((".params", ".model_state", ".head_buffers.memory"))]
  assert {".params['head'].w", ".head_buffers.memory",
          ".params['backbone']['conv1']['kernel'].value"} <= set(compared), compared
  # The backbone's parameters share one scale (its largest weight): a BatchNorm bias is a
  # sum of many gradient terms of both signs, and its small entries carry the whole net's
  # rounding (as test_step_reference.py scales all backbone tensors together).
  backbone_scale = max(float(np.max(np.abs(want_state[name]))) for name in compared
                       if name.startswith(".params['backbone']"))
  for name in compared:
    got_value, want_value = got_state[name], want_state[name]
    if name in CLASS_ROWS:
      got_value, want_value = got_value[:C], want_value[:C]
    scale = (backbone_scale if name.startswith(".params['backbone']")
             else float(np.max(np.abs(want_value))))
    floor = max(1e-3 * scale, 1e-6)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-3, atol=floor, err_msg=name)
  for name in (".step", ".head_buffers.initialized"):
    np.testing.assert_array_equal(got_state[name], want_state[name], err_msg=name)
  np.testing.assert_array_equal(got_state[".head_buffers.seen"][:C],
                                want_state[".head_buffers.seen"][:C])


def test_restore_refuses_a_replicated_array_whose_shape_changed(tmp_path):
  """Only class-sharded arrays are re-padded: a replicated array (or a class-sharded one
  whose row length differs) of another shape belongs to another model or config."""
  def place(tree, mesh):
    rows, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return {"rows": jax.device_put(tree["rows"], rows),
            "vector": jax.device_put(tree["vector"], whole)}

  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=1, with_data=False)
  ckpt.save(1, place({"rows": jnp.ones((12, 3)), "vector": jnp.arange(4.0)},
                     parallel.make_mesh(SAVING)))
  ckpt.wait()
  mesh = parallel.make_mesh(devices=jax.devices()[:8])
  ok = checkpoint.restore_state(
      ckpt, 1, place({"rows": jnp.zeros((16, 3)), "vector": jnp.zeros(4)}, mesh), mesh)
  np.testing.assert_array_equal(ok["rows"], np.ones((16, 3)) * (np.arange(16) < 12)[:, None])
  with pytest.raises(ValueError, match=r"\['vector'\] has shape \(4,\), this run expects \(8,\)"):
    checkpoint.restore_state(
        ckpt, 1, place({"rows": jnp.zeros((16, 3)), "vector": jnp.zeros(8)}, mesh), mesh)
  with pytest.raises(ValueError, match=r"\['rows'\] has shape \(12, 3\), this run expects"):
    checkpoint.restore_state(
        ckpt, 1, place({"rows": jnp.zeros((16, 2)), "vector": jnp.zeros(4)}, mesh), mesh)
  ckpt.close()

