"""The class-sharded head equals the single-device loss functions on 1, 2 and 8 devices.

Needs 8 simulated devices (``conftest.py`` here sets them when this folder is collected
first); ``tests/test_head.py`` runs this file in its own process.

Scenario (``head_scenarios.scenario``): C = 13 classes (no device count divides it, so W and
M are padded), repeated labels across device boundaries, two steps: the first initialises
the threshold b and writes the memory bank, the second reads what the first wrote. Each
head configuration runs once per device count (``_sharded``) and every test compares a part
of that run with the single-device reference (``_reference``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import head_scenarios as hs
from unitsface_jax import head
from unitsface_jax import parallel

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run tests/multidevice in its own process (tests/test_head.py)")

# One device (the shard_map on a single block), and 2 and 8 (13 classes padded to 14 and to
# 16 rows, one and several padding rows on the last device); 4 pads to 16 as 8 does.
DEVICE_COUNTS = (1, 2, 8)
RTOL = 1e-5
C = hs.NUM_CLASSES
USS_CONFIGS = [name for name, config in hs.CONFIGS.items() if config.s2s_loss == "uss"]

all_configs = pytest.mark.parametrize("name", list(hs.CONFIGS))
uss_configs = pytest.mark.parametrize("name", USS_CONFIGS)
all_device_counts = pytest.mark.parametrize("n", DEVICE_COUNTS, ids=lambda n: f"n={n}")


def assert_close(actual, desired, err_msg, rtol=RTOL):
  """Relative error ≤ rtol with an absolute floor of rtol·max|desired| (sums of terms)."""
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  floor = rtol * max(float(np.max(np.abs(desired))), 1e-30) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=floor, err_msg=err_msg)


@functools.cache
def _scenario():
  return hs.scenario()


@functools.cache
def _reference(name):
  return hs.reference_run(hs.CONFIGS[name], *_scenario())


@functools.cache
def _sharded(name, n):
  return hs.run_sharded(hs.CONFIGS[name], parallel.make_mesh(n), *_scenario())


def _steps(name, n):
  """(step, sharded result, reference result) for each of the two steps."""
  return zip(range(hs.STEPS), _sharded(name, n), _reference(name))


@all_device_counts
@all_configs
def test_sharded_loss_terms_equal_single_device_losses(name, n):
  for t, got, ref in _steps(name, n):
    assert_close(got["value"], ref["value"], f"step {t} objective")
    assert_close(got["s2c"], ref["s2c"], f"step {t} s2c")
    assert_close(got["s2s"], ref["s2s"], f"step {t} s2s")


@all_device_counts
@all_configs
def test_sharded_gradients_equal_single_device_gradients(name, n):
  # The gradient of a bf16 W is rounded to bf16 once: half an ulp, 2^-8 relative.
  rtol_w = RTOL if jnp.dtype(hs.CONFIGS[name].storage_dtype) == jnp.float32 else 2.0**-8
  for t, got, ref in _steps(name, n):
    assert_close(got["grad_emb"], ref["grad_emb"], f"step {t} d/d embeddings")
    assert_close(got["grad_w"][:C], ref["grad_w"], f"step {t} d/dW", rtol=rtol_w)


@all_device_counts
@uss_configs
def test_sharded_uss_threshold_b_equals_single_device(name, n):
  """Step 0 initialises b from the batch; step 1 keeps it; d/db as on one device."""
  for t, got, ref in _steps(name, n):
    assert_close(got["bias"], ref["bias"], f"step {t} new b")
    assert_close(got["grad_bias"], ref["grad_bias"], f"step {t} d/db")


@all_device_counts
def test_sharded_s2s_bce_class_biases_equal_single_device(n):
  for t, got, ref in _steps("cosface_s2s_bce", n):
    assert_close(got["class_bias"][:C], ref["bias"], f"step {t} new class biases")
    assert_close(got["grad_class_bias"][:C], ref["grad_bias"], f"step {t} d/d class biases")


@all_device_counts
@all_configs
def test_sharded_memory_write_equals_single_device(name, n):
  """M and seen after each step, bitwise in the storage dtype; and the b-initialised flag."""
  for t, got, ref in _steps(name, n):
    np.testing.assert_array_equal(got["memory"][:C].astype(np.float32), ref["memory"],
                                  err_msg=f"step {t} memory")
    np.testing.assert_array_equal(got["seen"][:C], ref["seen"], err_msg=f"step {t} seen")
    assert bool(got["initialized"]) == bool(ref["initialized"]), f"step {t} initialized"


@all_device_counts
@all_configs
def test_padding_classes_get_no_gradient_and_no_memory_write(name, n):
  for t, got, _ in _steps(name, n):
    assert np.all(got["grad_w"][C:] == 0), f"step {t}: padded rows of W got gradient"
    assert not got["seen"][C:].any(), f"step {t}: padded rows of M written"


def test_compiled_step_holds_no_array_spanning_all_classes():
  """The per-device program has [B, C/n] logits and no matrix with a dimension of C."""
  num_classes, batch, n = 40, 16, 4
  shapes = hs.compiled_array_shapes(num_classes, batch, n)
  assert (batch, num_classes // n) in shapes, sorted(shapes)
  # A [C] vector may appear (the zero gradient of the unused s2s BCE class bias comes out
  # replicated), so only shapes of rank ≥ 2 are searched.
  assert not [shape for shape in shapes if num_classes in shape], sorted(shapes)


# --------------------------------------------------------------------------------------------
# PartialFC (sample_rate 0.1 of 64 classes on 4 devices, all 8 positives on device 0).
# --------------------------------------------------------------------------------------------

PFC_SEEDS = (0, 1, 2)
all_keys = pytest.mark.parametrize("seed", PFC_SEEDS, ids=lambda s: f"key={s}")


@functools.cache
def _partial_fc():
  return hs.partial_fc_steps(PFC_SEEDS)


def _kept(sampled):
  return sampled[sampled >= 0]


def test_partial_fc_scenario_has_more_positives_on_a_device_than_it_samples():
  local = head.num_local_classes(hs.PFC_CONFIG, hs.PFC_DEVICES)
  k = head.num_sampled(hs.PFC_CONFIG, hs.PFC_DEVICES, hs.PFC_BATCH)
  assert (local, k) == (16, 8)
  assert np.all(hs.PFC_LABELS < local)  # 8 positives: more than ⌈0.1·16⌉ = 2 random picks


@all_keys
def test_partial_fc_samples_every_positive_and_k_own_classes_per_device(seed):
  local = head.num_local_classes(hs.PFC_CONFIG, hs.PFC_DEVICES)
  k = head.num_sampled(hs.PFC_CONFIG, hs.PFC_DEVICES, hs.PFC_BATCH)
  sampled = _partial_fc()[seed]["sampled"]
  assert sampled.shape == (hs.PFC_DEVICES * k,)
  kept = _kept(sampled)
  assert set(hs.PFC_LABELS) <= set(kept.tolist()), kept
  assert len(set(kept.tolist())) == len(kept), kept
  for d in range(1, hs.PFC_DEVICES):  # the other devices sample k of their own 16 rows
    block = sampled[d * k:(d + 1) * k]
    assert np.all((block >= d * local) & (block < (d + 1) * local)), block


@all_keys
def test_partial_fc_loss_equals_full_loss_restricted_to_sampled_classes(seed):
  got = _partial_fc()[seed]
  ref = hs.partial_fc_restricted_reference(_kept(got["sampled"]))
  assert_close(got["s2c"], ref["s2c"], "s2c")
  assert_close(got["s2s"], ref["s2s"], "s2s")
  assert_close(got["grad_emb"], ref["grad_emb"], "d/d embeddings")
  assert_close(got["grad_w"], ref["grad_w"], "d/dW")


@all_keys
def test_partial_fc_unsampled_classes_get_no_gradient(seed):
  got = _partial_fc()[seed]
  unsampled = np.setdiff1d(np.arange(hs.PFC_CLASSES), _kept(got["sampled"]))
  assert np.all(got["grad_w"][unsampled] == 0), "an unsampled row got gradient"
  has_gradient = np.abs(got["grad_w"]).sum(1) > 0
  assert has_gradient[hs.PFC_LABELS].all(), "a positive row got no gradient"


def test_partial_fc_different_keys_sample_different_negatives():
  k = head.num_sampled(hs.PFC_CONFIG, hs.PFC_DEVICES, hs.PFC_BATCH)
  negatives = {tuple(step["sampled"][k:]) for step in _partial_fc().values()}
  assert len(negatives) > 1, negatives
