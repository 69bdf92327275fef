"""How the training loop runs against the devices: bounded asynchronous dispatch
(``StepQueue``), the step every process stops at on preemption (``Preemption``), and the bound
on a step that does not finish (``StepWatchdog``)."""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import logging

from unitsface_jax import parallel

# How many steps the host may dispatch before the device has finished them: the loop waits
# for step N-1 once it has dispatched step N, so the device always has the next step queued
# while the host reads the following batch, and a save or a stop waits for at most two steps.
MAX_STEPS_IN_FLIGHT = 2


class StepQueue:
  """Bounds JAX's asynchronous dispatch: ``push`` takes an output of the step just dispatched
  and returns once fewer than ``MAX_STEPS_IN_FLIGHT`` pushed steps may still be running.

  Without it the host runs as far ahead of the device as nothing forces a sync (~30 steps of
  an iresnet100 on a CPU between two log steps), each queued step holding its batch, and a
  preemption save waits for all of them.
  """

  def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT):
    self.limit = limit
    self.pending = collections.deque()

  def push(self, output: jax.Array) -> None:
    self.pending.append(output)
    while len(self.pending) >= self.limit:
      jax.block_until_ready(self.pending.popleft())


# The signals the preemption drill may send itself (``config.debug.signal``).
DRILL_SIGNALS = ("SIGTERM", "SIGKILL", "SIGSTOP")

# The coordination service's key under which the processes agree on the step to stop at.
_STOP_KEY = "unitsface_jax/preemption_stop_step"


class Preemption:
  """SIGTERM (TPU preemption, SLURM time limit) -> save at a step boundary, exit 0.

  One process stops at the step where it sees the signal. Several processes must stop at the
  same step (the save is collective): the first to see a signal at step d proposes d +
  MAX_STEPS_IN_FLIGHT in jax.distributed's key-value store (first writer wins), and every
  process reads the key at each step (one small RPC to the coordinator, no device sync).
  Why every process is still at or before that step when it reads it: a process checks at
  step n only after step n-1 finished on its devices, which needs every process to have
  dispatched step n-1 (the step's collectives span all of them); so a process at step d+2
  checks after the proposer dispatched d+1, hence after it wrote the key at d.

  A context manager: SIGTERM is handled inside the ``with`` block, as before it outside.
  """

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None
    self._stop_at = None

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Whether to stop after ``step``; called after every step, once step - 1 has finished."""
    if jax.process_count() == 1:
      return self.requested.is_set()
    if self._stop_at is None:
      client = parallel.coordination_client()
      value = parallel.key_value_try_get(client, _STOP_KEY)
      if value is None and self.requested.is_set():
        value = parallel.key_value_set_once(client, _STOP_KEY,
                                            str(step + MAX_STEPS_IN_FLIGHT))
      if value is not None:
        self._stop_at = int(value)
        logging.info("preemption: every process stops after step %d", self._stop_at)
    return self._stop_at is not None and step >= self._stop_at


# The exit status of a process whose step hung: the lost-peer status (``cli``), since the
# remedy is the same (restart every process; the run resumes from its last checkpoint).
HUNG_STATUS = 3
# The steps the watchdog does not time: the first compiles, and on several hosts the first
# collectives wait for the slowest host's compilation.
WATCHDOG_WARMUP_STEPS = 3
# The automatic bound (``config.step_timeout_s = 0``): 20 median steps, at least 5 minutes.
# The floor is above the longest wait a healthy run can show inside one step: a peer host
# retrying a storage read for its batch (gcsfs retries for up to about two minutes) or
# copying its part of a checkpoint off the device, which its peers wait for in the step's
# collectives; the multiple covers steps that change cost within a run (USS from its epoch,
# PartialFC, evaluation steps between them do not count: nothing is dispatched).
WATCHDOG_FLOOR_S = 300.0
WATCHDOG_MEDIAN_STEPS = 20


class StepWatchdog:
  """Ends the process when a dispatched step has not finished within the bound.

  A hung collective (a peer process stopped, wedged or cut off while its coordination
  heartbeat may still run) blocks every other process in its next collective, with no
  error, until the coordination service's heartbeat timeout if ever. The loop tells the
  watchdog each step it dispatches (``dispatched(step, output)``); a thread polls whether the
  oldest unfinished output is ready (``jax.Array.is_ready``: no sync), and once one has been
  running longer than the bound it prints one line naming the step, the host and the process,
  and exits with ``HUNG_STATUS`` (the lost-peer path: restart every process, the run resumes
  from its last checkpoint). It cannot raise in the main thread, which is blocked in the
  runtime, so it ends the process (``os._exit``), as the lost-peer path does.

  ``timeout_s`` > 0: that many seconds; 0: ``max(WATCHDOG_FLOOR_S, WATCHDOG_MEDIAN_STEPS x``
  the median interval between dispatches, measured after the warm-up); < 0: off. The first
  ``WATCHDOG_WARMUP_STEPS`` steps are not timed. A context manager (the thread runs inside).
  """

  def __init__(self, timeout_s: float, *, poll_s: float = 1.0):
    self.timeout_s = float(timeout_s)
    self.poll_s = poll_s
    self._pending = collections.deque()  # (step, dispatch time, output), oldest first
    self._dispatch_times = collections.deque(maxlen=101)
    self._seen = 0
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> StepWatchdog:
    if self.timeout_s >= 0:
      self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def dispatched(self, step: int, output: jax.Array) -> None:
    """``step`` (1-based) was dispatched; ``output`` is ready once it has finished."""
    self._seen += 1
    if self._seen <= WATCHDOG_WARMUP_STEPS or self._thread is None:
      return
    now = time.monotonic()
    self._dispatch_times.append(now)
    self._pending.append((step, now, output))

  def bound(self) -> float | None:
    """The current bound in seconds (None: not known yet, nothing is timed)."""
    if self.timeout_s > 0:
      return self.timeout_s
    times = list(self._dispatch_times)
    if len(times) < 4:
      return None
    return max(WATCHDOG_FLOOR_S, WATCHDOG_MEDIAN_STEPS * float(np.median(np.diff(times))))

  def _watch(self) -> None:
    poll = self.poll_s if self.timeout_s <= 0 else min(self.poll_s, self.timeout_s / 10)
    while not self._stop.wait(poll):
      while self._pending and self._pending[0][2].is_ready():
        self._pending.popleft()
      if not self._pending:
        continue
      step, since, _ = self._pending[0]
      bound, waited = self.bound(), time.monotonic() - since
      if bound is not None and waited > bound:
        self._hung(step, waited)

  def _hung(self, step: int, waited: float) -> None:
    print(f"error: step {step} has not finished after {waited:.0f} s (config.step_timeout_s "
          f"bound {self.bound():.0f} s) on {socket.gethostname()}, process "
          f"{jax.process_index()} of {jax.process_count()}: a peer process or a collective "
          "hangs; stopping. Restart every process with the same command to resume from the "
          "last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(HUNG_STATUS)  # pylint: disable=protected-access
