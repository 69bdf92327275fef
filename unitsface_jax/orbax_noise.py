"""Everything the package does about orbax's noise, in one place.

orbax logs every save step at INFO through absl, logs a failed read at length (a traceback
per array), and when a restore fails its reads still in flight are reported again by Python
as unraisable exceptions and by asyncio's logger (hundreds of lines per unreadable
checkpoint, after the package has reported it in one line). ``install`` quiets all of that
for the rest of a command-line process (``unitsface_jax.cli`` calls it; importing this module
changes nothing); ``reading()`` drops orbax's own log lines around a read whose failure the
caller reports itself. Warnings that are not about those reads pass as before.
"""

from __future__ import annotations

import contextlib
import gc
import logging as py_logging
import sys
import warnings

_MARK = "_unitsface_orbax_noise"


def _from_orbax(record: py_logging.LogRecord) -> bool:
  return "/orbax/" in record.pathname


def _raised_in_orbax(error: BaseException | None) -> bool:
  tb = getattr(error, "__traceback__", None)
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is the echo of a failed restore: orbax reads a checkpoint
  with one coroutine per array on an event loop that ``asyncio.run`` closes when the first
  read fails, so the reads still in flight raise later (in an orbax coroutine, or "Event loop
  is closed" from their done-callbacks), each printed with its TensorStore spec."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "/orbax/" in code.co_filename:
    return True
  if _raised_in_orbax(unraisable.exc_value):
    return True
  return (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")


def _keep_absl(record: py_logging.LogRecord) -> bool:
  """orbax's INFO chatter (every save step) goes; its warnings stay. So do its errors, but for
  those with a traceback: a failed save, logged by each of its background threads in turn
  (four tracebacks for one full disk), which ``checkpoint.Checkpoints`` raises as one
  ``CheckpointWriteError`` naming the step, the path and the cause."""
  if not _from_orbax(record):
    return True
  if record.levelno >= py_logging.ERROR:
    return not record.exc_info
  return record.levelno >= py_logging.WARNING


def _keep_absl_verbose(record: py_logging.LogRecord) -> bool:
  """With ``--verbose``: only orbax's INFO chatter goes."""
  return record.levelno >= py_logging.WARNING or not _from_orbax(record)


# Reads that failed in this process (``reading``): from then on asyncio's "... exception was
# never retrieved" records are their echoes (orbax is the package's only user of asyncio).
_failed_reads = 0


def _keep_asyncio(record: py_logging.LogRecord) -> bool:
  """asyncio reports the abandoned reads as "Task exception was never retrieved" (raised in
  orbax) or, for TensorStore's futures, "Future exception was never retrieved" (raised in
  C++, with no orbax frame to tell them by)."""
  error = record.exc_info[1] if record.exc_info else None
  first_line = str(record.msg).split("\n", 1)[0]  # asyncio adds "future: <...>" lines
  if _failed_reads and first_line.endswith("exception was never retrieved"):
    return False
  return not _raised_in_orbax(error)


def install(*, verbose: bool = False) -> None:
  """Quiets orbax for the rest of the process: its INFO lines and (unless ``verbose``) the
  tracebacks of a failed save on absl's logger, and the echoes of an abandoned read on
  ``sys.unraisablehook`` and asyncio's logger. Idempotent."""
  previous = sys.unraisablehook
  if getattr(previous, _MARK, False):
    return

  def hook(unraisable):
    if not _abandoned_read(unraisable):
      previous(unraisable)

  setattr(hook, _MARK, True)
  sys.unraisablehook = hook
  py_logging.getLogger("absl").addFilter(_keep_absl_verbose if verbose else _keep_absl)
  py_logging.getLogger("asyncio").addFilter(_keep_asyncio)


@contextlib.contextmanager
def reading():
  """Within: none of orbax's log lines (a failed read logs tracebacks per array); the caller
  reports the failure in one line.

  A failed read leaves the reads still in flight as abandoned coroutines: they are collected
  here, before the caller reports the failure, so that their echoes (handled by ``install``)
  and Python's "coroutine ... was never awaited" warnings come now, where they are dropped,
  and not whenever the garbage collector next runs, which can be at interpreter exit, after
  the command line's one-line error and past the hooks."""
  logger = py_logging.getLogger("absl")

  def drop(record):
    return not _from_orbax(record)

  logger.addFilter(drop)
  try:
    yield
  except BaseException:
    global _failed_reads
    _failed_reads += 1
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                              category=RuntimeWarning)
      gc.collect()
    raise
  finally:
    logger.removeFilter(drop)
