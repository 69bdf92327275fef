"""Recipes and the entry point: every recipe validates; bad fields fail naming the field."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from unitsface_jax import config_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_and_variant_validates(recipe):
  from configs import default
  module = importlib.import_module(f"configs.{recipe}")
  # The loss variants each choose a loss, so only one of them combines with the others.
  others = [v for v in module.VARIANTS if v not in default.LOSS_VARIANTS]
  together = [",".join(others + [loss]) for loss in module.VARIANTS if loss not in others]
  for arg in (None, *module.VARIANTS, ",".join(others), *together):
    config_checks.validate(module.get_config(arg))


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_unknown_variant_is_refused_by_name(recipe):
  module = importlib.import_module(f"configs.{recipe}")
  with pytest.raises(ValueError, match="runlcoal"):
    module.get_config("runlcoal")


def test_official_casia_recipe_values():
  from configs import casia_r50
  c = casia_r50.get_config()
  assert (c.model.name, c.data.num_classes, c.loss.s2c, c.loss.s2c_margin, c.loss.s2s,
          c.loss.uss_start_epoch) == ("lresnet50_eir", 10_572, "cosface", 0.4, "uss", 1)
  assert (c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
  assert (tuple(c.schedule.decay_epochs), c.num_epochs, c.batch_size,
          c.optimizer.clip_norm) == ((16, 24), 28, 512, 10.0)


def test_webface42m_recipes_follow_arcface_torch():
  """configs/wf42m_pfc03_32gpu_r100.py and wf42m_pfc03_40epoch_8gpu_vit_b.py of arcface_torch:
  classes, images, PartialFC rate, optimiser, lr, decay, warm-up, epochs, images per update."""
  from configs import wf42m_r100, wf42m_vit_b
  for module, want in ((wf42m_r100, ("iresnet100", "sgd", 0.4, 5e-4, 2.0, 20, 4096)),
                       (wf42m_vit_b, ("vit_b", "adamw", 1e-3, 0.1, 4.0, 40, 256 * 8 * 12))):
    c = module.get_config()
    assert (c.data.num_classes, c.data.num_images, c.loss.sample_rate) == (
        2_059_906, 42_474_557, 0.3)
    assert (c.model.name, c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay,
            c.schedule.warmup_epochs, c.num_epochs,
            c.batch_size * c.optimizer.grad_accum_steps) == want
    assert c.schedule.name == "polynomial" and c.model.dtype == "bfloat16"


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "resnet9", "config.model.name = 'resnet9'"),
    ("loss.s2s_margin", 1.5, "config.loss.s2s_margin = 1.5"),
    ("batch_size", 0, "config.batch_size = 0"),
    ("model.width", 0, "config.model.width = 0: must be a positive"),
    ("schedule.decay_epochs", (24, 16), "config.schedule.decay_epochs"),
    ("schedule.power", 0.0, "config.schedule.power = 0.0: must be positive"),
    ("loss.s2c", "sphereface", "config.loss.s2c = 'sphereface': must be one of"),
    ("debug.signal_after_step", -1, "config.debug.signal_after_step = -1"),
    ("debug.signal", "SIGINT", "config.debug.signal = 'SIGINT': must be one of"),
    ("optimizer.name", "adam", "config.optimizer.name = 'adam': must be one of"),
    ("optimizer.b2", 1.0, "config.optimizer.b2 = 1.0: must be in"),
    ("init.head_only_steps", 4, "config.init.head_only_steps = 4: needs config.init.backbone"),
    ("init.head_only_steps", -1, "config.init.head_only_steps = -1: must be >= 0"),
])
def test_bad_values_name_the_field(field, value, message):
  from configs import demo
  config = demo.get_config()
  section, _, leaf = field.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message.replace(".", r"\.")
                     .replace("(", r"\(").replace(")", r"\)")):
    config_checks.validate(config)


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "unitsface_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,needle", [
    ("--config.model.nme=x", "nme"),
    ("--config.batch_size=abc", "config.batch_size"),
    ("--config.optimizer.lr=-1.0", "config.optimizer.lr"),
    ("--config.loss.s2c=sphereface", "config.loss.s2c"),
])
@pytest.mark.slow
def test_main_refuses_unknown_ill_typed_and_bad_fields(tmp_path, override, needle):
  proc = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert needle in proc.stderr, proc.stderr
