"""The package's CPU XLA flags: added on import, never over the user's, and opt-out-able.

Each case runs ``import unitsface_jax`` in a fresh interpreter, since XLA_FLAGS only matters
before JAX starts its backends; what is checked is the environment JAX then sees, and that
JAX starts with it (XLA aborts on a flag it does not know).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax

from unitsface_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

_PROBE = """
import json, os
import unitsface_jax
import jax
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS"), "devices": jax.device_count(),
                  "backend": jax.default_backend()}))
"""


def _probe(**env_changes):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", xla_flags.OPT_OUT_ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_flags_applied_on_import():
  assert YNN_FLAG in xla_flags.CPU_FLAGS
  result = _probe()
  assert result["backend"] == "cpu"
  assert result["xla_flags"].split() == list(xla_flags.CPU_FLAGS)


def test_opt_out_leaves_xla_flags_alone():
  assert _probe(**{xla_flags.OPT_OUT_ENV: "1"})["xla_flags"] is None
  user = "--xla_force_host_platform_device_count=2"
  result = _probe(**{xla_flags.OPT_OUT_ENV: "1", "XLA_FLAGS": user})
  assert result["xla_flags"] == user


def test_user_flags_kept_and_never_overridden():
  user = "--xla_force_host_platform_device_count=2"
  result = _probe(XLA_FLAGS=user)
  assert result["xla_flags"].split() == [user, *xla_flags.CPU_FLAGS]
  assert result["devices"] == 2


def test_user_value_of_the_same_flag_wins(monkeypatch):
  # The environment logic alone (this process's backends are up, which would skip it).
  monkeypatch.setattr(xla_flags, "_backends_initialized", lambda: False)
  own = "--xla_cpu_experimental_ynn_fusion_type=-reduce --xla_cpu_enable_fast_math=false"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": own}
  assert xla_flags.apply_cpu_defaults(env) == []
  assert env["XLA_FLAGS"] == own
  env = {"JAX_PLATFORMS": "cpu"}
  assert xla_flags.apply_cpu_defaults(env) == list(xla_flags.CPU_FLAGS)
  assert env["XLA_FLAGS"].split() == list(xla_flags.CPU_FLAGS)


def test_not_applied_for_accelerators(monkeypatch):
  monkeypatch.setattr(xla_flags, "_backends_initialized", lambda: False)
  for platforms in ("cuda", "tpu", "rocm", "cuda,cpu"):
    env = {"JAX_PLATFORMS": platforms}
    assert xla_flags.apply_cpu_defaults(env) == []
    assert "XLA_FLAGS" not in env


def test_not_applied_once_backends_started():
  jax.devices()  # this test process's backends are up: changing XLA_FLAGS would do nothing
  env = {"JAX_PLATFORMS": "cpu"}
  assert xla_flags.apply_cpu_defaults(env) == []
  assert "XLA_FLAGS" not in env
