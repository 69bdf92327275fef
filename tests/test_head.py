"""The class-sharded head equals the single-device loss functions, on 1-8 devices and 2 hosts.

The multi-device tests need the simulated device count
(``XLA_FLAGS=--xla_force_host_platform_device_count``) set before JAX starts, and this
pytest session has already started JAX with one device: they live in ``tests/multidevice/``
(left out of the top-level collection) and the tests here run them in other processes.
"""

import json
import os
import pathlib
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitsface_jax import head
from unitsface_jax import losses
from unitsface_jax import parallel

TESTS_DIR = pathlib.Path(__file__).resolve().parent
MULTIDEVICE = TESTS_DIR / "multidevice"
SCENARIOS = MULTIDEVICE / "head_scenarios.py"

# tests/multidevice/test_head_sharded.py: 5 head configurations x 3 device counts x (loss
# terms, gradients, memory write, padding), 3 USS configurations x 3 (threshold b), s2s BCE
# x 3 (class biases), the compiled-program check, PartialFC (scenario, 3 keys x 3 checks,
# different keys).
SHARDED_TESTS = 5 * 3 * 4 + 3 * 3 + 3 + 1 + 1 + 3 * 3 + 1
# tests/multidevice/test_head_losses.py: 8 loss configurations x (losses and gradients,
# statistics) on 8 devices, PartialFC per configuration, 3 stateful losses resumed.
LOSS_TESTS = 8 * 2 + 8 + 3


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = conftest.xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  env.pop("PYTEST_ADDOPTS", None)  # options meant for this session (-k, -x) would cut the run
  return env


@pytest.mark.slow
def test_sharded_head_and_every_s2c_loss_pass_on_8_devices(multidevice_pytest):
  """tests/multidevice/test_head_sharded.py and test_head_losses.py (combined margin,
  AdaFace, CurricularFace, MagFace, normalized BCE and UCE, sharded, with PartialFC, resumed)
  on 8 simulated devices, in one process (one start-up; the single-device references they
  share compile once): every test runs and passes, none skipped."""
  multidevice_pytest(("test_head_sharded.py", "test_head_losses.py"),
                     SHARDED_TESTS + LOSS_TESTS, timeout=900)


def _topology(results):
  return json.loads(results.with_suffix(".json").read_text())


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, free_port):
  """jax.distributed on 127.0.0.1: same losses, gradients and new state as 1 × 4 devices."""
  port = free_port()
  dist_out = tmp_path / "two_processes.npz"
  procs = [subprocess.Popen([sys.executable, str(SCENARIOS), "distributed", str(port), str(i),
                             "2", str(dist_out)], env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for proc in procs:
      # A process that dies leaves the other waiting in a collective: the timeout turns that
      # hang into a failure, and ``finally`` kills whatever is left.
      logs.append(proc.communicate(timeout=150)[0])
  except subprocess.TimeoutExpired:
    pytest.fail("a distributed process did not finish in 150 s")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i} failed:\n{logs[i] if i < len(logs) else ''}"
  single_out = tmp_path / "one_process.npz"
  proc = subprocess.run([sys.executable, str(SCENARIOS), "single", str(single_out)],
                        env=_env(4), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
  assert _topology(dist_out) == dict(process_count=2, local_device_count=2, mesh_devices=4)
  assert _topology(single_out) == dict(process_count=1, local_device_count=4, mesh_devices=4)
  two, one = np.load(dist_out), np.load(single_out)
  assert sorted(two) == sorted(one) and len(one) == 18
  for key in one:
    a, b = two[key].astype(np.float64), one[key].astype(np.float64)
    floor = 1e-5 * max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=floor, err_msg=key)


# --------------------------------------------------------------------------------------------
# In-process checks of the sizing and mesh helpers (one device).
# --------------------------------------------------------------------------------------------


def test_padding_and_fixed_sample_count():
  assert parallel.padded_classes(13, 4) == 16
  assert parallel.padded_classes(360_232, 8) == 360_232
  config = head.HeadConfig(num_classes=360_232, sample_rate=0.1)
  assert head.num_local_classes(config, 8) == 45_029
  assert head.num_sampled(config, 8, 1024) == 4503  # ⌈0.1·45,029⌉ > 1024
  assert head.num_sampled(config, 8, 8192) == 8192  # never fewer than the global batch
  assert head.num_sampled(head.HeadConfig(num_classes=20, sample_rate=0.1), 4, 64) == 5
  assert head.num_sampled(head.HeadConfig(num_classes=20), 4, 64) == 5


def test_mesh_uses_auto_axes_and_state_is_sharded():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DEVICE_AXIS,)
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  config = head.HeadConfig(num_classes=5, embedding_dim=4, storage_dtype="bfloat16")
  state = head.init_head_state(jax.random.key(0), config, mesh)
  assert state.params.w.dtype == jnp.bfloat16 and state.buffers.memory.dtype == jnp.bfloat16
  assert state.params.w.sharding.spec == jax.sharding.PartitionSpec(parallel.DEVICE_AXIS)
  assert state.params.bias.sharding.spec == jax.sharding.PartitionSpec()
  assert not bool(state.buffers.initialized) and not np.any(state.buffers.seen)


def test_head_requires_key_when_sampling():
  mesh = parallel.make_mesh()
  config = head.HeadConfig(num_classes=50, embedding_dim=4, sample_rate=0.1)
  state = head.init_head_state(jax.random.key(0), config, mesh)
  with pytest.raises(ValueError, match="PRNG key"):
    head.head_loss(state, jnp.ones((2, 4)), jnp.array([0, 1]), config=config, mesh=mesh)


def test_mesh_from_config_takes_the_device_count():
  class Config:
    num_devices = 1

  assert parallel.mesh_from_config(Config()).devices.size == 1
  assert parallel.mesh_from_config(object()).devices.size == jax.device_count()
  with pytest.raises(ValueError, match="available"):
    parallel.make_mesh(jax.device_count() + 1)


def test_global_batch_from_process_local_data():
  mesh = parallel.make_mesh()
  x, y = parallel.global_batch((np.ones((4, 3), np.float32), np.arange(4)), mesh)
  assert x.shape == (4, 3) and x.sharding == parallel.batch_sharding(mesh)
  np.testing.assert_array_equal(y, np.arange(4))


def test_s2s_schedule_initialises_b_on_first_active_step_only():
  """Epoch 0 (inactive): memory fills, b untouched; first active step: b = init value."""
  mesh = parallel.make_mesh(1)
  config = head.HeadConfig(num_classes=6, embedding_dim=4)
  state = head.init_head_state(jax.random.key(0), config, mesh)
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  labels = jnp.arange(6)
  step = jax.jit(lambda st, active: head.head_loss(st, emb, labels, config=config, mesh=mesh,
                                                   s2s_active=active))
  _, state = step(state, False)
  assert not bool(state.buffers.initialized) and float(state.params.bias) == 0.0
  assert np.all(state.buffers.seen[:6])
  cos_m = losses.cosine_similarity(emb, state.buffers.memory[:6])
  expected = losses.init_threshold_bias(cos_m, labels, valid=state.buffers.seen[:6])
  terms, state = step(state, True)
  assert bool(state.buffers.initialized)
  np.testing.assert_allclose(state.params.bias, expected, rtol=1e-6)
  np.testing.assert_allclose(terms["s2s"], losses.uss(cos_m, labels, expected), rtol=1e-5)
  state = state._replace(params=state.params._replace(bias=jnp.float32(3.0)))
  _, state = step(state, True)
  assert float(state.params.bias) == 3.0  # never re-initialised


@pytest.mark.parametrize("name", [n for n in head.S2C_LOSSES if n != "cosface"])
def test_every_margin_loss_holds_what_cosface_holds(name):
  """The head's step (loss, gradients of the embeddings and W, memory write) compiled for a
  [512, 20,000] block of logits: every sample-to-class loss needs at most 1.05x CosFace's
  memory (a margin computed on every entry cost ArcFace 1.28x, the combined margin 1.44x,
  MagFace 1.40x at Glint360K scale; BENCHMARKS.md, "Every sample-to-class loss")."""
  mesh = parallel.make_mesh(1)

  def step_bytes(config):
    def step(state, embeddings, labels):
      def objective(params, embeddings):
        terms, new_state = head.head_loss(head.HeadState(params, state.buffers), embeddings,
                                          labels, config=config, mesh=mesh)
        return jnp.mean(terms["s2c"]) + jnp.mean(terms["s2s"]), new_state
      return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(state.params,
                                                                         embeddings)
    state = jax.eval_shape(lambda: head.init_head_state(jax.random.key(0), config, mesh))
    args = (state, jax.ShapeDtypeStruct((512, 128), jnp.float32),
            jax.ShapeDtypeStruct((512,), jnp.int32))
    m = jax.jit(step, donate_argnums=(0,)).lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)

  cosface = step_bytes(head.HeadConfig(20_000, 128))
  other = step_bytes(head.HeadConfig(20_000, 128, s2c_loss=name))
  assert other <= 1.05 * cosface, (other / cosface)
