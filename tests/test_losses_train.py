"""Each loss variant of the recipes trains the demo smoke run to completion, with USS in its
second epoch, with PartialFC, gradient accumulation or bf16 head storage; and the command
line refuses what the head cannot run. (The loss arithmetic is tested in
test_losses_margin.py and, sharded, in tests/multidevice/test_head_losses.py.)"""

import json
import os
import pathlib
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest

import tiny_backbone
from configs import casia_r50
from configs import default
from configs import demo
from unitsface_jax import checkpoint
from unitsface_jax import head
from unitsface_jax import losses
from unitsface_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags
  flags.FLAGS(sys.argv[:1])

# configs/demo.py:smoke shrunk to 4 steps (2 epochs of 2): the loss alone, then + USS, on
# the tests' own backbone (tests/tiny_backbone.py: what is trained here is the head, and it
# compiles in a fraction of the smoke trunk's seconds a program).
TINY = {**tiny_backbone.CONFIG, "data.max_examples": 16, "num_epochs": 2,
        "checkpoint_every_steps": 4, "compilation_cache": False}
# Each variant with another of the settings it must compose with: PartialFC (20 of the 40
# demo classes a step), gradient accumulation over 2 micro-batches, bf16 storage of W and M.
SETTINGS = {"combined": {"loss.sample_rate": 0.5},
            "curricularface": {"loss.sample_rate": 0.5},
            "normbce": {"loss.sample_rate": 0.5, "loss.head_dtype": "bfloat16"},
            "adaface": {"optimizer.grad_accum_steps": 2},
            "uce": {"optimizer.grad_accum_steps": 2},
            "magface": {"loss.head_dtype": "bfloat16"}}


def _config(variant, **settings):
  config = demo.get_config(f"smoke,{variant}")
  config.update_from_flattened_dict({**TINY, **settings})
  return config


@pytest.mark.slow
@pytest.mark.parametrize("variant", default.LOSS_VARIANTS)
def test_loss_variant_trains_the_smoke_run_to_completion(variant, tmp_path):
  config = _config(variant, **SETTINGS[variant])
  last = train.train_and_evaluate(config, tmp_path)
  assert all(np.isfinite(last[k]) for k in ("loss", "s2c", "s2s", "grad_norm"))
  assert last["s2s"] > 0  # USS on in the second epoch
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=1, read_only=True)
  saved = ckpt.restore_arrays(4)
  ckpt.close()
  head_params, buffers = saved["params"]["head"], saved["head_buffers"]
  initial_bias, initial_stats = head.s2c_initial_state(train.head_config(config), 40)
  assert set(head_params.get("s2c_bias", {})) == set(initial_bias)
  assert set(buffers.get("s2c_stats", {})) == set(initial_stats)
  for key, value in initial_bias.items():  # trained by SGD
    assert np.any(np.asarray(head_params["s2c_bias"][key]) != np.asarray(value)), key
  for key, value in initial_stats.items():  # moved by four batches
    assert float(buffers["s2c_stats"][key]) != float(value), key


# Two losses whose statistics move with every batch, one with PartialFC (the run above has
# none) and one without (the run above has it). Every loss with and without PartialFC is
# checked against its single-device reference in tests/multidevice/test_head_losses.py; the
# head samples classes the same way for every loss, and the loss with per-class state
# (normbce) trains with PartialFC above.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["adaface", "curricularface"])
def test_loss_variant_trains_alone_with_the_other_partial_fc_setting(variant, tmp_path):
  """A loss without a sample-to-sample term (``loss.s2s = none``), with PartialFC where the
  run above has none and without it where the run above has it: the objective is the
  sample-to-class term alone."""
  rate = 1.0 if SETTINGS[variant].get("loss.sample_rate", 1.0) < 1.0 else 0.5
  config = _config(variant, **{"loss.s2s": "none", "loss.sample_rate": rate,
                               "num_epochs": 1})
  last = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"])
  assert last["s2s"] == 0.0
  assert last["loss"] == pytest.approx(config.loss.w_s2c * last["s2c"], rel=1e-5)


def test_every_loss_variant_of_the_recipes_is_valid():
  from unitsface_jax import config_checks
  for variant in default.LOSS_VARIANTS:
    for config in (casia_r50.get_config(variant), demo.get_config(variant)):
      config_checks.validate(config)
      assert config.loss.s2c in head.S2C_LOSSES
  with pytest.raises(ValueError, match="each choose a loss"):
    demo.get_config("adaface,magface")


@pytest.mark.parametrize("field,value,message", [
    ("loss.combined_form", "torch", "config.loss.combined_form = 'torch'"),
    ("loss.combined_m1", 0.0, "config.loss.combined_m1 = 0.0"),
    ("loss.adaface_t_alpha", 0.0, "config.loss.adaface_t_alpha = 0.0"),
    ("loss.curricular_alpha", 1.5, "config.loss.curricular_alpha = 1.5"),
    ("loss.magface_u_a", 5.0, "config.loss.magface_u_a = 5.0"),
    ("loss.magface_u_m", 0.3, "config.loss.magface_u_m = 0.3"),
    ("batch_size", 1, "config.batch_size = 1: AdaFace"),
])
def test_loss_options_the_head_cannot_run_are_refused_naming_the_field(field, value, message):
  from unitsface_jax import config_checks
  variant = {"combined": "combined", "adaface": "adaface", "curricular": "curricularface",
             "magface": "magface", "batch_size": "adaface"}
  config = demo.get_config(next(v for k, v in variant.items() if k in field))
  section, _, leaf = field.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message.replace(".", r"\.")):
    config_checks.validate(config)


def test_arcface_torch_form_refuses_what_its_combined_loss_cannot_run():
  from unitsface_jax import config_checks
  config = demo.get_config("combined")
  config.loss.combined_form = "arcface_torch"
  config.loss.combined_m1, config.loss.combined_m3 = 1.2, 0.0
  with pytest.raises(config_checks.ConfigError, match=r"config\.loss\.combined_m1 = 1\.2"):
    config_checks.validate(config)
  config.loss.combined_m3 = 0.2  # its CosFace branch: m1 and m2 ignored
  config_checks.validate(config)


@pytest.mark.slow
def test_main_trains_adaface_with_uss_and_partial_fc_on_two_devices(tmp_path):
  """``python -m unitsface_jax.main`` (tests/train_run.py: 2 simulated devices)."""
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, "loss.sample_rate": 0.5}.items()]
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "train_run.py"), "2",
       "--config=configs/demo.py:smoke,adaface", f"--workdir={tmp_path}", *overrides],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3, 4]
  means = [m["s2c_norm_mean"] for m in logged]
  assert means[0] != 20.0 and len(set(means)) == 4, means  # updated once per step
  assert logged[-1]["s2s"] > 0


@pytest.mark.slow
def test_main_refuses_a_loss_the_head_cannot_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "unitsface_jax.main", "--config=configs/demo.py:combined",
       f"--workdir={tmp_path}", "--config.loss.combined_form=arcface_torch",
       "--config.loss.combined_m3=0.0", "--config.loss.combined_m1=1.2"],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.loss.combined_m1 = 1.2" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_every_loss_option_of_the_config_reaches_the_head():
  config = demo.get_config()
  for i, (name, default) in enumerate(losses.registry.option_defaults().items()):
    if isinstance(default, bool):
      config.loss[name] = not default
    elif not isinstance(default, str):
      config.loss[name] = 0.125 * (i + 1)
  config.loss.combined_form = "arcface_torch"
  config.loss.uss_form = "paper"
  head_config = train.head_config(config)
  for name in losses.registry.option_defaults():
    assert getattr(head_config, name) == config.loss[name], name
  assert set(head.S2C_OPTIONS) < set(losses.registry.option_defaults())


def test_loss_state_starts_at_the_reference_values():
  """log(10·C) (CVI-SZU/UniTSFace head.py), AdaFace's 20 and 100, CurricularFace's t = 0."""
  import math
  from unitsface_jax import parallel
  mesh = parallel.make_mesh()
  want = {"normalized_bce": ({"bias": np.full(13, math.log(130.0))}, {}),
          "uce": ({"bias": math.log(130.0)}, {}),
          "adaface": ({}, {"norm_mean": 20.0, "norm_std": 100.0}),
          "curricularface": ({}, {"t": 0.0}),
          "magface": ({}, {}), "combined": ({}, {})}
  for name, (bias, stats) in want.items():
    state = head.init_head_state(jax.random.key(0), head.HeadConfig(13, 4, s2c_loss=name), mesh)
    for got, expected in ((state.params.s2c_bias, bias), (state.buffers.s2c_stats, stats)):
      assert got.keys() == expected.keys(), name
      for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-7, err_msg=f"{name} {key}")
