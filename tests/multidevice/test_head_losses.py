"""Every sample-to-class loss of the head, sharded over 8 devices, equals the single-device
loss functions; with PartialFC it equals the loss on the sampled classes; the
state of each stateful loss survives a checkpoint onto another device count.

Needs 8 simulated devices (``conftest.py`` here); ``tests/test_head.py`` runs this file in its
own process. The scenarios are those of ``head_scenarios`` (C = 13, so every device count
pads W; two steps, USS on, the second step reading the statistics the first one left).
"""

import functools

import jax
import numpy as np
import pytest

import head_scenarios as hs
from test_head_sharded import RTOL
from test_head_sharded import _scenario
from test_head_sharded import assert_close
from unitsface_jax import checkpoint
from unitsface_jax import head
from unitsface_jax import parallel

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run tests/multidevice in its own process (tests/test_head.py)")

C = hs.NUM_CLASSES

# The scenario's features have norms of about 3: MagFace's range and AdaFace's and
# CurricularFace's EMA weights are chosen so that the norms, margins and statistics move.
CONFIGS = {
    "combined": head.HeadConfig(C, hs.DIM, s2c_loss="combined", combined_m1=1.2),
    "combined_arcface_torch": head.HeadConfig(
        C, hs.DIM, s2c_loss="combined", combined_form="arcface_torch", combined_m1=1.0,
        combined_m2=0.5, combined_m3=0.0),
    "adaface": head.HeadConfig(C, hs.DIM, s2c_loss="adaface", adaface_t_alpha=0.3),
    "curricularface": head.HeadConfig(C, hs.DIM, s2c_loss="curricularface", s2c_margin=0.5,
                                      curricular_alpha=0.3),
    "magface": head.HeadConfig(C, hs.DIM, s2c_loss="magface", magface_l_a=1.0,
                               magface_u_a=5.0, magface_lambda_g=3.0),
    "normalized_bce": head.HeadConfig(C, hs.DIM, s2c_loss="normalized_bce"),
    "uce": head.HeadConfig(C, hs.DIM, s2c_loss="uce", s2s_loss="none"),
    "adaface_bf16_s2s_bce": head.HeadConfig(C, hs.DIM, s2c_loss="adaface", s2s_loss="s2s_bce",
                                            storage_dtype="bfloat16"),
}
STATEFUL = ("adaface", "curricularface", "normalized_bce")
DEVICE_COUNTS = (8,)

all_configs = pytest.mark.parametrize("name", list(CONFIGS))
device_counts = pytest.mark.parametrize("n", DEVICE_COUNTS, ids=lambda n: f"n={n}")


@functools.cache
def _reference(name):
  return hs.reference_run(CONFIGS[name], *_scenario())


@functools.cache
def _sharded(name, n):
  return hs.run_sharded(CONFIGS[name], parallel.make_mesh(n), *_scenario())


def _rows(tree):
  """Class-row arrays cut to the C real classes (scalars unchanged)."""
  return jax.tree.map(lambda x: x[:C] if np.ndim(x) else x, tree)


@device_counts
@all_configs
def test_sharded_losses_and_gradients_equal_single_device(name, n):
  rtol_w = RTOL if CONFIGS[name].storage_dtype == "float32" else 2.0**-8
  for t, (got, ref) in enumerate(zip(_sharded(name, n), _reference(name))):
    assert_close(got["s2c"], ref["s2c"], f"step {t} s2c")
    assert_close(got["s2s"], ref["s2s"], f"step {t} s2s")
    assert_close(got["value"], ref["value"], f"step {t} objective")
    assert_close(got["grad_emb"], ref["grad_emb"], f"step {t} d/d embeddings")
    assert_close(got["grad_w"][:C], ref["grad_w"], f"step {t} d/dW", rtol=rtol_w)
    assert not got["grad_w"][C:].any(), f"step {t}: padded rows of W got gradient"
    got_bias, ref_bias = _rows(got["grad_s2c_bias"]), ref["grad_s2c_bias"]
    assert got_bias.keys() == ref_bias.keys()
    for key in ref_bias:
      assert_close(got_bias[key], ref_bias[key], f"step {t} d/d s2c bias {key}")


def _bitwise_across_device_counts(name):
  """AdaFace's statistics are reduced from the replicated norms in one order on any mesh;
  CurricularFace's t is the mean of cosines, whose matmul rounding depends on the local
  [B, C/n] block, so it agrees across device counts to float32 rounding only."""
  return name.startswith("adaface")


@device_counts
@all_configs
def test_statistics_equal_single_device(name, n):
  """AdaFace's norm mean/std and CurricularFace's t after each step equal the single-device
  update (across device counts: ``test_stateful_loss_resumes_...``)."""
  for t, (got, ref) in enumerate(zip(_sharded(name, n), _reference(name))):
    assert got["s2c_stats"].keys() == ref["s2c_stats"].keys()
    for key in ref["s2c_stats"]:
      assert_close(got["s2c_stats"][key], ref["s2c_stats"][key], f"step {t} {key}", rtol=1e-6)
  if name.startswith(("adaface", "curricularface")):
    first, second = (step["s2c_stats"] for step in _sharded(name, n))
    assert all(first[k] != second[k] for k in first), "the statistics did not move"


# --------------------------------------------------------------------------------------------
# PartialFC: r = 0.1 of 64 classes on 4 devices (head_scenarios), every loss.
# --------------------------------------------------------------------------------------------


@functools.cache
def _partial_fc(name):
  config = CONFIGS[name]
  config = head.HeadConfig(**{**config.__dict__, "num_classes": hs.PFC_CLASSES,
                              "sample_rate": hs.PFC_CONFIG.sample_rate, "s2s_loss": "uss",
                              "storage_dtype": "float32"})
  got = hs.partial_fc_steps((0,), config)[0]
  return config, got


@all_configs
def test_partial_fc_equals_the_loss_restricted_to_sampled_classes(name):
  config, got = _partial_fc(name)
  kept = got["sampled"][got["sampled"] >= 0]
  assert len(kept) < hs.PFC_CLASSES
  ref = hs.partial_fc_restricted_reference(kept, config)
  for key in ("s2c", "s2s", "grad_emb", "grad_w"):
    assert_close(got[key], ref[key], key)
  for key in ref["grad_s2c_bias"]:
    grad = got["grad_s2c_bias"][key]
    assert_close(grad, ref["grad_s2c_bias"][key], f"d/d s2c bias {key}")
    if np.ndim(grad):
      unsampled = np.setdiff1d(np.arange(hs.PFC_CLASSES), kept)
      assert not grad[unsampled].any(), "an unsampled class bias got gradient"


# --------------------------------------------------------------------------------------------
# Checkpoints: one step on 4 devices, saved, restored onto 4 and 2, one more step.
# --------------------------------------------------------------------------------------------

SAVING, RESTORING = 4, (4, 2)  # 2: the class rows are cut from 16 to 14


def _step_from(state, config, mesh, t):
  w, memory, seen, emb, labels = _scenario()
  batch = parallel.batch_sharding(mesh)
  (_, (terms, new_state)), _ = hs.sharded_step_fn(config, mesh)(
      state.params, jax.device_put(emb[t], batch), state.buffers,
      jax.device_put(labels[t], batch), jax.random.key(t))
  return terms, new_state


@functools.cache
def _resumed(name, tmp_dir):
  config = CONFIGS[name]
  mesh = parallel.make_mesh(SAVING)
  w, memory, seen, _, _ = _scenario()
  _, state = _step_from(hs.place_state(mesh, config, w, memory, seen), config, mesh, 0)
  ckpt = checkpoint.Checkpoints(tmp_dir, every_steps=1, keep=1, with_data=False)
  ckpt.save(1, {"head": state})
  ckpt.wait()
  uninterrupted = _step_from(state, config, mesh, 1)
  out = {}
  for n in RESTORING:
    mesh_n = parallel.make_mesh(n)
    fresh = head.init_head_state(jax.random.key(9), config, mesh_n)
    restored = checkpoint.restore_state(ckpt, 1, {"head": fresh}, mesh_n)["head"]
    out[n] = (restored, _step_from(restored, config, mesh_n, 1))
  ckpt.close()
  return jax.device_get(state), jax.device_get(uninterrupted), jax.device_get(out)


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_loss_resumes_bitwise_on_another_device_count(name, tmp_path_factory):
  saved, (want_terms, want_state), resumed = _resumed(
      name, str(tmp_path_factory.mktemp(name)))
  assert saved.params.s2c_bias or saved.buffers.s2c_stats
  for n, (restored, (terms, state)) in resumed.items():
    for part in ("s2c_bias", "w"):
      for got, want in zip(jax.tree.leaves(_rows(getattr(restored.params, part))),
                           jax.tree.leaves(_rows(getattr(saved.params, part)))):
        np.testing.assert_array_equal(got, want, err_msg=f"n={n} restored {part}")
    assert restored.buffers.s2c_stats.keys() == saved.buffers.s2c_stats.keys()
    for key, value in saved.buffers.s2c_stats.items():
      assert restored.buffers.s2c_stats[key] == value, f"n={n} restored {key}"
      bitwise = n == SAVING or _bitwise_across_device_counts(name)
      assert_close(state.buffers.s2c_stats[key], want_state.buffers.s2c_stats[key],
                   f"n={n}: {key} after the resumed step", rtol=0.0 if bitwise else 1e-6)
    rtol = 0.0 if n == SAVING else RTOL
    assert_close(terms["s2c"], want_terms["s2c"], f"n={n} s2c after resuming", rtol=rtol)
