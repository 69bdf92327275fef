"""A user's mistake on the command line is one line naming what to change, without a
traceback, exit 2; a run stopped by its numbers is one line, exit 1 (unitsface_jax/cli.py)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# configs/demo.py:smoke, small: the mistakes show before the first step or within a few.
TINY = ("--config=configs/demo.py:smoke", "--config.model.width=4",
        "--config.model.num_features=32", "--config.data.max_examples=16",
        "--config.num_epochs=1", "--config.compilation_cache=False")

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
  _one_line(*_main(tmp_path / "run", "--config.optimizer.lr=1e30",
                   "--config.optimizer.clip_norm=0"), 1, "NaN/inf at step")
