"""Paths a run cannot use (a recipe's placeholder, a missing file, a workdir that cannot be
written) stop it before anything is built: one line naming the field, exit status 2."""

import os
import subprocess
import sys

import pytest

from configs import demo
import command_lines
from unitsface_jax import config_checks

from test_configs import ROOT


@pytest.fixture
def blocked_workdir(tmp_path):
  """A workdir below a regular file: it cannot be created, even by root."""
  (tmp_path / "file").write_text("")
  return str(tmp_path / "file" / "run")


@pytest.mark.parametrize("override,message", [
    ({"data.path": "gs://YOUR_BUCKET/glint360k"},
     "config.data.path = 'gs://YOUR_BUCKET/glint360k': is a placeholder: set "
     "--config.data.path="),
    ({"data.path": "/nonexistent/casia"},
     "config.data.path = '/nonexistent/casia': does not exist: set --config.data.path="),
    ({"data.path": ""}, "config.data.path = '': is empty"),
    ({"eval.bins": ("/nonexistent/lfw.bin",), "eval.every_steps": 5},
     "config.eval.bins[0] = '/nonexistent/lfw.bin': does not exist: set "
     "--config.eval.bins='(\"your.bin\",)'"),
])
def test_unusable_paths_name_the_field(tmp_path, override, message):
  config = demo.get_config("smoke")
  for field, value in override.items():
    section, leaf = field.split(".")
    config[section][leaf] = value
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate_paths(config, str(tmp_path))
  assert str(e.value).startswith(message), e.value


def test_usable_paths_pass_and_leave_the_workdir_empty(tmp_path):
  config_checks.validate_paths(demo.get_config(), str(tmp_path / "new"))
  assert list((tmp_path / "new").iterdir()) == []
  config = demo.get_config("smoke")
  config.data.source, config.data.path = "synthetic", "gs://YOUR_BUCKET/x"  # not read
  config.eval.bins = ("/nonexistent.bin",)  # evaluation is off in smoke
  config_checks.validate_paths(config, str(tmp_path))


@pytest.mark.parametrize("where", ["below a file", "an existing read-only directory"])
def test_a_workdir_that_cannot_be_written_names_it(blocked_workdir, where):
  workdir = blocked_workdir if where == "below a file" else "/proc/self"  # even root cannot
  with pytest.raises(config_checks.ConfigError,
                     match=f"--workdir={workdir}: cannot be written: "):
    config_checks.validate_paths(demo.get_config("smoke"), workdir)


def test_main_stops_on_the_placeholder_with_exit_2(tmp_path, capsys):
  status, err = command_lines.run_main_stderr(
      capsys, "unitsface_jax.main", "--config=configs/glint_r100.py", f"--workdir={tmp_path}")
  assert status == 2
  assert err == ("error: config.data.path = 'gs://YOUR_BUCKET/glint360k': is a placeholder: "
                 "set --config.data.path=your copy of the data set (or "
                 "--config.data.source=synthetic)")
  assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--config=configs/casia_r50.py"], "error: config.data.path = '/data/casia-webface': "
     "does not exist"),
    (["--config=configs/demo.py:smoke", "--config.data.source=synthetic"],
     "error: --workdir={}: cannot be written: NotADirectoryError"),
])
def test_main_command_line_one_line_exit_2(blocked_workdir, args, needle):
  proc = subprocess.run([sys.executable, "-m", "unitsface_jax.main", *args,
                         f"--workdir={blocked_workdir}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if not l.startswith(("I", "W"))]
  assert len(lines) == 1 and lines[0].startswith(needle.format(blocked_workdir)), proc.stderr
