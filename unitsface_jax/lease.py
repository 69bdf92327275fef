"""One run per workdir: a lease on ``WORKDIR/lease.json``.

A run takes the lease before it touches anything in the workdir and gives it back when it
stops (at the end, on preemption, on an error). Process 0 of the run writes the lease with a
create-only precondition (``O_EXCL`` on a local disk, ``ifGenerationMatch=0`` on gs://), so of
two runs started together exactly one gets it; the other processes of a multi-host run learn
the outcome from process 0 through jax.distributed's key-value store and share its lease.

The lease holds the host, the process id, the start time and a heartbeat that a thread renews
every ``HEARTBEAT_S`` while the run lives. A second run that finds it stops with
``LeaseHeldError`` (one line naming the holder, exit 2) unless the holder is gone:

- on this host, its process no longer exists (a run killed with SIGKILL, or whose machine
  rebooted, and relaunched at once; or its pid is this process's, which holds no such lease:
  a restarted container): taken over at once;
- otherwise (another host, or a live pid on this host that may belong to another program
  now), its heartbeat is older than ``STALE_AFTER_S`` (a preempted VM never gives its lease
  back): taken over after that.

Both takeovers print one warning line. ``STALE_AFTER_S`` is 10 missed heartbeats (5 minutes):
the heartbeat thread runs while the main thread compiles or saves (XLA and the writes release
the GIL), and gcsfs gives up a failing write after about a minute of retries, so a live run
never looks stale; a preempted TPU VM or a requeued job takes longer than that to come back.

A run whose lease another run took over (its heartbeat stopped for longer than the bound and
it came back, or two relaunches took over one stale lease at the same moment and the later
one's lease replaced the earlier one's) learns it at its next renewal or when it reads the
lease before its next save (``check``): the training loop stops there with
``LeaseLostError``, so it never writes over the other run's checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
from absl import logging

from unitsface_jax import errors
from unitsface_jax import parallel
from unitsface_jax import storage

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# The tokens of the leases this process holds now.
_HELD_HERE: set[str] = set()
# The key under which process 0 tells the others whether it took the lease ("" if it did,
# else the error's message).
_KEY = "unitsface_jax/lease"


class LeaseHeldError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lease."""


class LeaseLostError(RuntimeError):
  """Another run took over this run's lease."""


# ------------------------------------------------------------------ one file, local or gs://
def _gcs(path: str):
  import fsspec  # pylint: disable=g-import-not-at-top  # the gcs extra
  return fsspec.filesystem("gcs"), path.removeprefix("gs://")


def _create(path: str, data: bytes) -> None:
  """Writes ``path`` only if it does not exist (else ``FileExistsError``)."""
  if storage.is_gcs(path):
    fs, name = _gcs(path)
    fs.pipe_file(name, data, mode="create")
    return
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  with os.fdopen(fd, "wb") as f:
    f.write(data)


def _read(path: str) -> dict | None:
  try:
    if storage.is_gcs(path):
      fs, name = _gcs(path)
      data = fs.cat_file(name)
    else:
      with open(path, "rb") as f:
        data = f.read()
  except FileNotFoundError:
    return None
  try:
    return json.loads(data)
  except ValueError:
    return {}  # being written, or not a lease: judged by its age below


def _replace(path: str, data: bytes) -> None:
  if storage.is_gcs(path):
    fs, name = _gcs(path)
    fs.pipe_file(name, data)
    return
  temporary = f"{path}.{uuid.uuid4().hex}.tmp"
  with open(temporary, "wb") as f:
    f.write(data)
  os.replace(temporary, path)


def _remove(path: str) -> None:
  try:
    if storage.is_gcs(path):
      fs, name = _gcs(path)
      fs.rm_file(name)
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


def _modified(path: str) -> float | None:
  """When the file was last written (for a lease that cannot be parsed)."""
  try:
    if storage.is_gcs(path):
      fs, name = _gcs(path)
      return fs.modified(name).timestamp()
    return os.stat(path).st_mtime
  except FileNotFoundError:
    return None


# ------------------------------------------------------------------ the lease
def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}, "
          f"heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago")


class Lease:
  """A context manager: takes the lease of ``workdir`` on entry (``LeaseHeldError`` if a live
  run holds it), renews it from a thread, gives it back on exit."""

  def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = str(workdir) if storage.is_remote(workdir) else os.path.abspath(workdir)
    self.path = f"{self.workdir.rstrip('/')}/{LEASE_FILE}"
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.lost = threading.Event()
    self._held = False
    self._stop = threading.Event()
    self._thread = None
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                    "token": uuid.uuid4().hex, "processes": jax.process_count()}

  # ---- taking it
  def _stale_reason(self, holder: dict) -> str | None:
    """Why ``holder`` no longer runs (None if it may)."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
      # This process's own pid but not one of its leases: an earlier incarnation (a restarted
      # container numbers its processes from 1 again, under the same host name).
      ended = (holder.get("token") not in _HELD_HERE if pid == os.getpid()
               else not _process_exists(pid))
      if ended:
        return f"its process {pid} on this host has ended"
    # A live process on this host may be another program that reuses an ended run's pid:
    # the heartbeat decides then, as for another host.
    beat = holder.get("heartbeat") or _modified(self.path) or time.time()
    age = time.time() - beat
    if age > self.stale_after_s:
      return f"its heartbeat is {age:.0f} s old (over {self.stale_after_s:.0f} s)"
    return None

  def _take(self) -> None:
    data = self._data()
    # The token counts as held here before the file exists: another Lease of this process
    # that reads the file between its creation and our return must not judge it an ended
    # incarnation's (its pid is ours) and take it over.
    token = self._record["token"]
    _HELD_HERE.add(token)
    try:
      self._take_file(data)
    except BaseException:
      _HELD_HERE.discard(token)
      raise

  def _take_file(self, data: bytes) -> None:
    for _ in range(3):  # a takeover races with at most a few others
      try:
        _create(self.path, data)
        return
      except FileExistsError:
        pass
      holder = _read(self.path)
      if holder is None:
        continue  # given back in between
      reason = self._stale_reason(holder)
      if reason is None:
        raise LeaseHeldError(
            f"{self.workdir} is in use by another run ({_describe(holder)}; {self.path}): "
            "wait for it to end or stop it, or use another --workdir; if no run uses it, "
            f"remove {self.path}")
      logging.warning("taking over the lease of %s from %s: %s", self.workdir,
                      _describe(holder), reason)
      _remove(self.path)
    raise LeaseHeldError(f"{self.workdir}: could not take {self.path}, other runs keep "
                         "taking it; start one run at a time")

  def _data(self) -> bytes:
    return json.dumps({**self._record, "heartbeat": time.time()}).encode()

  def __enter__(self) -> Lease:
    if not storage.is_remote(self.workdir):
      os.makedirs(self.workdir, exist_ok=True)
    client = parallel.coordination_client() if jax.process_count() > 1 else None
    outcome = ""
    if jax.process_index() == 0:
      try:
        self._take()
        self._held = True
      except Exception as e:
        if client is not None:  # the others stop too, with the same line
          client.key_value_set(_KEY, (str(e) or type(e).__name__).splitlines()[0])
        raise
      if client is not None:
        client.key_value_set(_KEY, "taken")
    else:
      outcome = client.blocking_key_value_get(_KEY, 600_000)
      outcome = "" if outcome == "taken" else outcome
    if outcome:
      raise LeaseHeldError(outcome)
    if self._held:
      self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
      self._thread.start()
    return self

  # ---- keeping it
  def _renew(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = _read(self.path)
        if holder is not None and holder.get("token") != self._record["token"]:
          logging.error("another run took over the lease of %s (%s): this run stops before "
                        "its next save", self.workdir, _describe(holder))
          self.lost.set()
          return
        _replace(self.path, self._data())
      except Exception as e:  # pylint: disable=broad-except
        # A failed renewal is retried at the next beat; ten in a row make the lease stale.
        logging.warning("renewing the lease %s: %s", self.path, e)

  def check(self) -> None:
    """Raises ``LeaseLostError`` if another run has taken this run's lease: the heartbeat
    found so, or the lease read now names another run (read before each save, so a run whose
    lease was taken over since its last heartbeat does not write over the other's
    checkpoints; two relaunches that take over one stale lease together are settled here)."""
    if self._held and not self.lost.is_set():
      try:
        holder = _read(self.path)
      except Exception as e:  # pylint: disable=broad-except  # the save will say more
        logging.warning("reading the lease %s: %s", self.path, e)
        holder = None
      if holder is not None and holder.get("token") != self._record["token"]:
        logging.error("another run took over the lease of %s (%s)", self.workdir,
                      _describe(holder))
        self.lost.set()
    if self.lost.is_set():
      raise LeaseLostError(f"another run took over the lease of {self.workdir} ({self.path}) "
                           "while this one was not renewing it: stopped without saving")

  # ---- giving it back
  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._held and not self.lost.is_set():
      try:
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self._record["token"]:
          _remove(self.path)
      except Exception as e:  # pylint: disable=broad-except
        # The storage that stopped the run may refuse this too: the next run takes the lease
        # over (its process has ended), and the error that stopped this one is the one shown.
        logging.warning("giving back the lease %s: %s", self.path, e)
    self._held = False
    _HELD_HERE.discard(self._record["token"])
