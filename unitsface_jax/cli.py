"""What every command line of the package does the same way (``main``, ``evaluate``,
``export``): its flags, the prologue before JAX starts, quieting, and the exit status.

  @cli.command(usage_errors=(OSError,), failures=(train.NonFiniteLossError,))
  def main(argv) -> int: ...

  if __name__ == "__main__":
    cli.run(main)

Exit status: 0 done; 2 the user's input is wrong (an ``errors.UserError``, or one of the
command's ``usage_errors``: one line, ``error: ...``, no traceback); 1 the run stopped for a
reason outside the package (one of its ``failures``: a non-finite loss, storage that refused a
save; one line); 3 a peer process of a multi-process run was lost (restart every process to
resume). Anything else is a bug in the package and keeps its traceback. ``--verbose`` (or
``UNITSFACE_VERBOSE=1``) logs the traceback of the first two kinds as well.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from absl import app, flags, logging

from unitsface_jax import cpu_tuning
from unitsface_jax import errors
from unitsface_jax import orbax_noise
from unitsface_jax import parallel

USAGE_STATUS, FAILED_STATUS, PEER_LOST_STATUS = 2, 1, 3
# Set to 1 in the environment: as --verbose.
VERBOSE_ENV = "UNITSFACE_VERBOSE"


def define_flags() -> None:
  """The flags every command line has (``--cpu_tuning``, ``--verbose``); call it once, at
  import of the command's module."""
  cpu_tuning.define_flag()
  flags.DEFINE_bool("verbose", False, "Also log the traceback of an error the command reports "
                    f"in one line (the user's input, a stopped run); {VERBOSE_ENV}=1 too.")


def _verbose() -> bool:
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or bool(
      getattr(flags.FLAGS, "verbose", False))


def _error(e: BaseException) -> str:
  return f"error: {e}"


def command(*, usage_errors: tuple[type[BaseException], ...] = (),
            failures: tuple[type[BaseException], ...] = ()):
  """Decorates a command's ``main(argv) -> int`` with the prologue and the exit statuses.

  The prologue, first, before JAX starts its backends (XLA reads ``XLA_FLAGS`` then, and a
  TPU is probed then): no TPU probe on a host without one (``cpu_tuning.skip_absent_tpu``),
  the CPU tuning unless ``--nocpu_tuning``, orbax quieted (``orbax_noise.install``).
  ``errors.UserError`` is checked first (its message may read like a lost peer's), then a lost
  peer, then ``usage_errors``, then ``failures``.
  """
  def decorate(main: Callable[[list[str]], int | None]):
    @functools.wraps(main)
    def run_command(argv: list[str]) -> int:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
      cpu_tuning.skip_absent_tpu()
      if flags.FLAGS.cpu_tuning:
        cpu_tuning.enable()
      orbax_noise.install(verbose=_verbose())
      try:
        return main(argv) or 0
      except Exception as e:  # pylint: disable=broad-except
        # The user's mistake first: its message may hold words a lost peer's does ("heartbeat"
        # in the lease of another run).
        if isinstance(e, errors.UserError):
          status = USAGE_STATUS
        elif parallel.lost_peer(e):
          _exit_peer_lost(e)
        elif isinstance(e, usage_errors):
          status = USAGE_STATUS
        elif isinstance(e, failures):
          status = FAILED_STATUS
        else:
          raise
        if _verbose():
          logging.exception("stopped")
        print(_error(e), file=sys.stderr)
        return status
    return run_command
  return decorate


def _exit_peer_lost(e: BaseException) -> None:
  """The run cannot go on without that process, and a normal exit would wait for it in
  jax.distributed's shutdown barrier until the missed heartbeats abort this process."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  print(f"error: lost a peer process of this multi-process run ({first[:200]}); stopping. "
        "Restart every process with the same command to resume from the last checkpoint",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(PEER_LOST_STATUS)  # pylint: disable=protected-access


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
  """Parses the flags (an unknown ``--config.x`` field or a bad flag: one line, exit 1), then
  runs ``main`` under ``absl.app``."""
  argv = list(sys.argv if argv is None else argv)
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (not a flags.Error) for --config.<unknown field>=...
    bad = [a for a in argv if a.startswith("--config.")]
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'").split())
    sys.exit(f"error: unknown config field among {bad}: {detail}")
  except flags.Error as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv, flags_parser=lambda _: remaining)
