"""How the training loop runs against the devices: bounded asynchronous dispatch
(``StepQueue``) and the step every process stops at on preemption (``Preemption``)."""

from __future__ import annotations

import collections
import signal
import threading

import jax
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
