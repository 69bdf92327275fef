"""The loss registry (unitsface_jax/losses/registry.py): a loss added as one file trains the
smoke recipe with no other edit; the README's tables are the registry's."""

import pathlib
import sys

from absl import flags
import numpy as np
import pytest

import tiny_backbone
from configs import demo
from unitsface_jax import checkpoint
from unitsface_jax import config_checks
from unitsface_jax import head
from unitsface_jax import train
from unitsface_jax.losses import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]

if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags
  flags.FLAGS(sys.argv[:1])


@pytest.fixture
def toy_loss():
  loss = registry.load_file(ROOT / "tests" / "toy_loss.py")
  yield loss
  registry.unregister(loss.name)


def test_readme_loss_tables_are_the_registrys():
  readme = (ROOT / "README.md").read_text()
  assert registry.markdown_tables() in readme, (
      "README.md's loss tables differ from the registry: paste the output of "
      "`python -m unitsface_jax.losses.registry`")


def test_every_registered_loss_is_one_file_that_names_itself():
  for name in registry.s2c_names():
    assert (ROOT / "unitsface_jax/losses/s2c" / f"{name}.py").exists(), name
  for name in registry.s2s_names():
    assert (ROOT / "unitsface_jax/losses/s2s" / f"{name}.py").exists(), name


def test_a_name_or_option_taken_twice_is_refused(toy_loss):
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.SampleToClassLoss(name="cosface", per_sample=None))
  with pytest.raises(ValueError, match="toy_temperature"):
    registry.register(registry.SampleToClassLoss(
        name="other", per_sample=None, options={"toy_temperature": 3.0}))
  assert "other" not in registry.s2c_names()
  with pytest.raises(KeyError, match="unknown s2c loss 'nope'"):
    registry.s2c("nope")


def test_a_loss_from_a_file_is_configured_and_checked_by_the_registry(toy_loss):
  config = demo.get_config("smoke")
  assert config.loss.toy_temperature == 2.0  # the defaults read the registry
  config.loss.s2c = "toy_normface"
  config_checks.validate(config)
  config.loss.toy_temperature = 0.0
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.loss\.toy_temperature = 0\.0: must be positive"):
    config_checks.validate(config)
  assert "toy_normface" in head.S2C_LOSSES and "toy_temperature" in head.S2C_OPTIONS


@pytest.mark.slow
def test_a_loss_added_as_one_file_trains_the_smoke_recipe(toy_loss, tmp_path):
  config = demo.get_config("smoke")
  config.loss.s2c = "toy_normface"
  config.update_from_flattened_dict({
      **tiny_backbone.CONFIG, "data.max_examples": 16, "num_epochs": 2,
      "checkpoint_every_steps": 4, "compilation_cache": False})
  config_checks.validate(config)
  last = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(last["loss"]) and last["s2s"] > 0
  assert last["s2c_mean_target_cos"] != 0.0  # its statistic moved and was logged
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=1, read_only=True)
  saved = ckpt.restore_arrays(4)
  ckpt.close()
  bias = np.asarray(saved["params"]["head"]["s2c_bias"]["bias"])
  assert bias.shape == (40,) and np.any(bias != 0.25)  # its per-class bias was trained
  assert float(saved["head_buffers"]["s2c_stats"]["mean_target_cos"]) == pytest.approx(
      last["s2c_mean_target_cos"])
