"""The command lines' shared prologue and exit statuses (unitsface_jax/cli.py)."""

import logging

from absl import flags
import pytest

from unitsface_jax import cli
from unitsface_jax import errors
from unitsface_jax import orbax_noise



@pytest.fixture(autouse=True)
def cpu_tuning_off():
  """--nocpu_tuning (and --verbose), defined for the test only: the command lines that
  tests/command_lines.py imports later in this process define them themselves."""
  defined = "cpu_tuning" not in flags.FLAGS
  if defined:
    cli.define_flags()
  previous = flags.FLAGS["cpu_tuning"].value
  flags.FLAGS["cpu_tuning"].value = False
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield
  flags.FLAGS["cpu_tuning"].value = previous
  if defined:
    delattr(flags.FLAGS, "cpu_tuning")
    delattr(flags.FLAGS, "verbose")


class _Mistake(ValueError):
  pass


def _command(error):
  @cli.command(usage_errors=(_Mistake,), failures=(ValueError,))
  def main(argv):
    del argv
    if error:
      raise error
    return None
  return main


def test_each_kind_of_error_has_its_status_and_one_line(capsys, caplog, monkeypatch):
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  assert _command(None)(["prog"]) == 0
  assert _command(_Mistake("config.x = 1: must be 2"))(["prog"]) == cli.USAGE_STATUS
  assert capsys.readouterr().err == "error: config.x = 1: must be 2\n"
  # Every errors.UserError of the package is the user's, without being listed.
  assert _command(errors.ConfigError("config.y: bad"))(["prog"]) == cli.USAGE_STATUS
  assert capsys.readouterr().err == "error: config.y: bad\n"
  assert _command(ValueError("disk full"))(["prog"]) == cli.FAILED_STATUS
  assert capsys.readouterr().err == "error: disk full\n"
  assert "Traceback" not in caplog.text
  with pytest.raises(KeyError):  # a bug keeps its traceback
    _command(KeyError("bug"))(["prog"])
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")  # or --verbose: the traceback too
  assert _command(_Mistake("config.x = 1: must be 2"))(["prog"]) == cli.USAGE_STATUS
  assert "Traceback" in caplog.text and "_Mistake" in caplog.text


def test_the_prologue_quiets_orbax_for_the_process():
  _command(None)(["prog"])
  record = logging.LogRecord("absl", logging.INFO, "/x/orbax/checkpoint/manager.py", 1,
                             "saved step 4", None, None)
  assert not logging.getLogger("absl").filter(record)
  warning = logging.LogRecord("absl", logging.WARNING, "/x/orbax/checkpoint/manager.py", 1,
                              "slow", None, None)
  assert orbax_noise._keep_absl(warning)  # pylint: disable=protected-access


def test_a_failed_read_quiets_asyncio_echoes_of_tensorstore_futures(monkeypatch):
  """After a read failed (``orbax_noise.reading``), asyncio's "Future exception was never
  retrieved" for TensorStore's futures (raised in C++: no orbax frame) is dropped; before,
  it is kept. It once came after a command line's one-line error, at exit."""
  monkeypatch.setattr(orbax_noise, "_failed_reads", 0)
  error = ValueError('OUT_OF_RANGE: Error reading "params.head.w/0.0" in OCDBT database')
  record = logging.LogRecord(
      "asyncio", logging.ERROR, "/x/asyncio/base_events.py", 1,
      "Future exception was never retrieved\nfuture: <Future finished exception=...>", None,
      (ValueError, error, None))
  assert orbax_noise._keep_asyncio(record)  # pylint: disable=protected-access
  with pytest.raises(ValueError):
    with orbax_noise.reading():
      raise error
  assert not orbax_noise._keep_asyncio(record)  # pylint: disable=protected-access
