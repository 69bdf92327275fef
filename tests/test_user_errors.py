"""A user's mistake on the command line is one line naming what to change, without a
traceback, exit 2; a run stopped by its numbers is one line, exit 1 (unitsface_jax/cli.py)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import tiny_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# configs/demo.py:smoke, small, on the tests' own backbone (tests/tiny_backbone.py, which
# tests/train_run.py registers): the mistakes show before the first step or within a few.
TINY = ("--config=configs/demo.py:smoke", *tiny_backbone.FLAGS,
        "--config.data.max_examples=16", "--config.num_epochs=1",
        "--config.compilation_cache=False")

pytestmark = pytest.mark.slow  # each starts the training command line


def _main(workdir, *args, devices=1):
  env = {k: v for k, v in os.environ.items() if k != "UNITSFACE_VERBOSE"}
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "train_run.py"), str(devices), *TINY,
       f"--workdir={workdir}", *args],
      cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=600)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  return proc.returncode, errors, proc.stderr


def _one_line(status, errors, stderr, want_status, *pieces):
  assert status == want_status, stderr[-3000:]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  for piece in pieces:
    assert piece in errors[0], errors[0]


def test_fewer_classes_than_the_data_has(tmp_path):
  _one_line(*_main(tmp_path / "run", "--config.data.num_classes=10"), 2,
            "config.data.num_classes = 10")


def test_a_batch_that_does_not_split_over_the_devices(tmp_path):
  _one_line(*_main(tmp_path / "run", "--config.batch_size=7", devices=2), 2,
            "config.batch_size = 7", "2 devices")


def test_an_index_file_that_is_not_an_index(tmp_path):
  data = tmp_path / "orl"
  shutil.copytree(DATA / "orl_112", data)
  (data / "train.idx").write_text("this is not\tan index\n")
  _one_line(*_main(tmp_path / "run", "--config.data.source=recordio",
                   f"--config.data.path={data}"), 2, str(data / "train.idx"))


def test_a_changed_class_count_on_resume(tmp_path):
  synthetic = ("--config.data.source=synthetic", "--config.data.num_images=16")
  status, _, stderr = _main(tmp_path / "run", *synthetic, "--config.data.num_classes=40")
  assert status == 0, stderr[-3000:]
  _one_line(*_main(tmp_path / "run", *synthetic, "--config.data.num_classes=48",
                   "--config.num_epochs=2"), 2, "config.data.num_classes = 48",
            "trained with 40")


def test_a_learning_rate_that_explodes(tmp_path):
  """The line names the first non-finite term, its step, the learning rate and the checkpoint
  kept (the smoke run saves every 4 steps)."""
  status, errors, stderr = _main(tmp_path / "run", "--config.optimizer.lr=1e30",
                                 "--config.optimizer.clip_norm=0")
  _one_line(status, errors, stderr, 1, "became NaN/inf at step", "with learning rate 1e+30",
            "lower optimizer.lr")
  line = errors[0]
  bad = int(line.split("NaN/inf at step ")[1].split()[0])
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert all(step < bad for step in saved), (saved, line)
  if saved:
    assert f"checkpoint {saved[-1]} in {tmp_path / 'run' / 'checkpoints'} is kept" in line, line
  else:
    assert "no checkpoint was written before it" in line, line
  assert any(term in line for term in ("the sample-to-class (s2c) loss",
                                       "the sample-to-sample (s2s) loss", "the gradient norm")), line


@pytest.mark.parametrize("values, named", [
    ({"s2c": 1.0, "s2s": float("nan"), "grad_norm": float("inf")},
     "the sample-to-sample (s2s) loss"),
    ({"s2c": float("inf"), "s2s": float("nan"), "grad_norm": float("nan")},
     "the sample-to-class (s2c) loss"),
    ({"s2c": 1.0, "s2s": 0.0, "grad_norm": float("nan")}, "the gradient norm"),
])
def test_the_nan_line_names_the_first_non_finite_term(values, named, tmp_path):
  import types
  import jax.numpy as jnp
  from unitsface_jax import checkpoint, train
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=1)
  state = types.SimpleNamespace(first_nonfinite_step=jnp.int32(6))
  metrics = {k: jnp.float32(v) for k, v in {**values, "loss": float("nan"), "lr": 0.5}.items()}
  unchecked = {5: {}, 6: metrics, 7: {}}
  with pytest.raises(train.NonFiniteLossError) as error:
    train._check_finite(state, 8, unchecked, ckpt)  # pylint: disable=protected-access
  ckpt.close()
  assert str(error.value).startswith(f"{named} became NaN/inf at step 7 with learning rate 0.5 "
                                     "(found at step 8)"), error.value
  assert "no checkpoint was written before it" in str(error.value)
