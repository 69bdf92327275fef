"""CPU tuning: nothing on import, everything after ``cpu_tuning.enable()``, never over the user.

XLA_FLAGS only matters before JAX starts its backends, so the cases that start JAX run in a
fresh interpreter; what is checked is the environment JAX then sees, that JAX starts with it
(XLA aborts on a flag it does not know) and what the strided convolutions of a model trace to.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from unitsface_jax import cpu_tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
ENTRY_POINTS = ("unitsface_jax.main", "unitsface_jax.evaluate", "unitsface_jax.export.__main__")

# Imports the modules named in argv ("ALL": every module of the package but the command
# lines, whose flags clash), optionally calls enable(), then starts JAX and reports what it
# sees.
_PROBE = """
import dataclasses, importlib, json, os, pkgutil, sys
import unitsface_jax
names = []
for arg in sys.argv[2:]:
  if arg == "ALL":
    names += sorted(m.name for m in pkgutil.walk_packages(unitsface_jax.__path__,
                                                          "unitsface_jax.")
                    if m.name not in %r)
  else:
    names.append(arg)
for name in names:
  importlib.import_module(name)
after_import = os.environ.get("XLA_FLAGS")
from unitsface_jax import cpu_tuning
applied = None
if sys.argv[1] != "-":
  cpu_tuning.XLA_CPU_FLAGS += tuple(f for f in sys.argv[1].split(",") if f)
  applied = dataclasses.asdict(cpu_tuning.enable())
import jax, jax.numpy as jnp
from flax import nnx
from unitsface_jax.models import layers
conv = layers.conv(4, 4, 1, 2, 0, kernel_init=nnx.initializers.lecun_normal(),
                   dtype=jnp.float32, rngs=nnx.Rngs(0))
jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: conv(x).sum()))(jnp.ones((1, 8, 8, 4))))
print(json.dumps({"after_import": after_import, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "applied": applied, "modules": len(names),
                  "devices": jax.device_count(), "backend": jax.default_backend(),
                  "custom_vjp": "custom_vjp_call" in jaxpr}))
""" % (ENTRY_POINTS,)


def _probe(*entry_points, enable=None, **env_changes):
  """Runs _PROBE; ``enable``: None (no enable() call) or extra flags for enable() to add."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_tuning.OFF_ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.update(env_changes)
  arg = "-" if enable is None else ",".join(enable)
  out = subprocess.run([sys.executable, "-c", _PROBE, arg, *entry_points], env=env,
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# The training command line with the user's flags; without any, every module and main are
# imported by test_enable_after_importing_everything_tunes_jax (XLA_FLAGS still unset after
# the imports).
@pytest.mark.parametrize("entry_point,user_flags", [
    ("unitsface_jax.main", "--xla_force_host_platform_device_count=2"),
    ("unitsface_jax.evaluate", None),
    ("unitsface_jax.export.__main__", None),
])
@pytest.mark.slow
def test_importing_the_package_changes_nothing(entry_point, user_flags):
  env = {} if user_flags is None else {"XLA_FLAGS": user_flags}
  result = _probe("ALL", entry_point, **env)
  assert result["modules"] > 40
  assert result["after_import"] == result["xla_flags"] == user_flags
  assert result["devices"] == (1 if user_flags is None else 2)
  assert not result["custom_vjp"]  # XLA's own gradients for the strided convolution


@pytest.mark.slow
def test_enable_after_importing_everything_tunes_jax():
  # A flag with a visible effect (the device count) shows that what enable() adds after every
  # module is imported still reaches XLA; the real flag is checked to be there and accepted.
  count = "--xla_force_host_platform_device_count=3"
  result = _probe("ALL", "unitsface_jax.main", enable=[count])
  assert result["after_import"] is None
  assert YNN_FLAG in cpu_tuning.XLA_CPU_FLAGS
  assert result["xla_flags"].split() == [*cpu_tuning.XLA_CPU_FLAGS, count]
  assert result["applied"] == {"xla_flags": [*cpu_tuning.XLA_CPU_FLAGS, count],
                               "xla_flags_note": "", "strided_conv_gradients": True}
  assert (result["backend"], result["devices"]) == ("cpu", 3)
  assert result["custom_vjp"]


@pytest.mark.slow
def test_enable_keeps_user_flags_first():
  user = "--xla_force_host_platform_device_count=2"
  result = _probe("unitsface_jax.main", enable=[], XLA_FLAGS=user)
  assert result["xla_flags"].split() == [user, *cpu_tuning.XLA_CPU_FLAGS]
  assert result["devices"] == 2
  assert result["custom_vjp"]


@pytest.mark.slow
def test_environment_switch_makes_enable_do_nothing():
  user = "--xla_force_host_platform_device_count=2"
  result = _probe("unitsface_jax.main", enable=[],
                  **{cpu_tuning.OFF_ENV: "1", "XLA_FLAGS": user})
  assert result["xla_flags"] == user
  assert result["applied"]["strided_conv_gradients"] is False
  assert not result["custom_vjp"]


def _entry_point_stderr(module, *args, **env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_tuning.OFF_ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env_changes)
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300).stderr


# Each command line stops on a bad argument just after its first lines: enable() comes first.
_FAILING_RUNS = {
    "unitsface_jax.main": ["--config=configs/demo.py", "--workdir=/nonexistent",
                           "--config.optimizer.lr=-1.0"],
    "unitsface_jax.evaluate": [],
    "unitsface_jax.export": ["--params=/nonexistent.npz", "--format=npz", "--out=/x.npz"],
}


@pytest.mark.parametrize("module", sorted(_FAILING_RUNS))
@pytest.mark.slow
def test_command_lines_enable_the_tuning_first(module):
  args = _FAILING_RUNS[module]
  assert f"CPU tuning: XLA_FLAGS += {YNN_FLAG}" in _entry_point_stderr(module, *args)


@pytest.mark.slow
def test_command_line_switches_turn_the_tuning_off():
  args = _FAILING_RUNS["unitsface_jax.main"]
  assert "CPU tuning" not in _entry_point_stderr("unitsface_jax.main", *args, "--nocpu_tuning")
  assert "CPU tuning off" in _entry_point_stderr("unitsface_jax.main", *args,
                                                 **{cpu_tuning.OFF_ENV: "1"})


def test_user_value_of_the_same_flag_wins(monkeypatch):
  # The environment logic alone (this process's backends are up, which would skip it).
  monkeypatch.setattr(cpu_tuning, "_backends_initialized", lambda: False)
  own = "--xla_cpu_experimental_ynn_fusion_type=-reduce --xla_cpu_enable_fast_math=false"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": own}
  assert cpu_tuning.add_xla_flags(env) == []
  assert env["XLA_FLAGS"] == own
  env = {"JAX_PLATFORMS": "cpu"}
  assert cpu_tuning.add_xla_flags(env) == list(cpu_tuning.XLA_CPU_FLAGS)
  assert env["XLA_FLAGS"].split() == list(cpu_tuning.XLA_CPU_FLAGS)


def test_no_flags_for_accelerators(monkeypatch):
  monkeypatch.setattr(cpu_tuning, "_backends_initialized", lambda: False)
  for platforms in ("cuda", "tpu", "rocm", "cuda,cpu"):
    env = {"JAX_PLATFORMS": platforms}
    assert cpu_tuning.add_xla_flags(env) == []
    assert "XLA_FLAGS" not in env


def test_too_late_once_backends_started(monkeypatch):
  monkeypatch.setattr(cpu_tuning, "_strided_conv_gradients", False)  # restored afterwards
  jax.devices()  # this test process's backends are up: changing XLA_FLAGS would do nothing
  env = {"JAX_PLATFORMS": "cpu"}
  assert cpu_tuning.add_xla_flags(env) == []
  applied = cpu_tuning.enable(env)
  assert "XLA_FLAGS" not in env
  assert applied.xla_flags == () and "started before" in applied.xla_flags_note
  # The gradients are chosen while tracing, so they still apply.
  assert applied.strided_conv_gradients and cpu_tuning.strided_conv_gradients_active()


def test_strided_conv_gradients_context_restores_the_setting():
  assert not cpu_tuning.strided_conv_gradients_active()  # off unless asked for
  with cpu_tuning.strided_conv_gradients():
    assert cpu_tuning.strided_conv_gradients_active()
    with cpu_tuning.strided_conv_gradients(False):
      assert not cpu_tuning.strided_conv_gradients_active()
    assert cpu_tuning.strided_conv_gradients_active()
  assert not cpu_tuning.strided_conv_gradients_active()
