"""One run per workdir (``unitsface_jax/lease.py``): the lease is taken create-only, refused
while its holder lives, taken over when the holder is gone, renewed, and given back; on a local
disk and on the GCS server. The command-line runs (two at once, a killed run relaunched) are in
tests/test_train.py and tests/test_gcs.py."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from absl import logging
from etils import epath

from unitsface_jax import lease


def _holder(path):
  return json.loads(epath.Path(path).read_text())


def _write(path, **record):
  epath.Path(path).write_text(json.dumps(record))


def _ended_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  request.getfixturevalue("gcs")
  return f"gs://test/lease/{tmp_path.name}"


def test_a_lease_is_written_held_and_given_back(workdir):
  with lease.Lease(workdir) as held:
    record = _holder(held.path)
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert time.time() - record["heartbeat"] < 60 and record["started"] <= record["heartbeat"]
  assert not epath.Path(held.path).exists()


def test_a_second_run_on_a_live_lease_is_refused_in_one_line(workdir):
  with lease.Lease(workdir) as first:
    before = epath.Path(first.path).read_text()
    with pytest.raises(lease.LeaseHeldError) as error:
      with lease.Lease(workdir):
        pass
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{workdir} is in use by another run")
    assert f"process {os.getpid()} on {socket.gethostname()}" in message, message
    assert "use another --workdir" in message and first.path in message
    assert epath.Path(first.path).read_text() == before  # the holder's lease untouched
  assert not epath.Path(first.path).exists()


def test_the_lease_of_an_ended_process_on_this_host_is_taken_over_at_once(workdir, caplog):
  path = f"{workdir}/{lease.LEASE_FILE}"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  pid = _ended_pid()
  _write(path, host=socket.gethostname(), pid=pid, started=time.time(),
         heartbeat=time.time(), token="killed")
  with caplog.at_level(logging.WARNING):
    with lease.Lease(workdir) as held:
      assert _holder(held.path)["pid"] == os.getpid()
  taken = [r.getMessage() for r in caplog.records if "taking over the lease" in r.getMessage()]
  assert len(taken) == 1 and f"its process {pid} on this host has ended" in taken[0], taken


def test_another_hosts_lease_is_taken_over_only_once_its_heartbeat_is_stale(workdir, caplog):
  path = f"{workdir}/{lease.LEASE_FILE}"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  now = time.time()
  _write(path, host="tpu-vm-7", pid=1, started=now - 3600, heartbeat=now - 60, token="alive")
  with pytest.raises(lease.LeaseHeldError, match="process 1 on tpu-vm-7"):
    with lease.Lease(workdir):
      pass
  assert _holder(path)["token"] == "alive"
  _write(path, host="tpu-vm-7", pid=1, started=now - 3600,
         heartbeat=now - lease.STALE_AFTER_S - 5, token="preempted")
  with caplog.at_level(logging.WARNING):
    with lease.Lease(workdir) as held:
      assert _holder(held.path)["host"] == socket.gethostname()
  assert any("its heartbeat is" in r.getMessage() for r in caplog.records)


def test_the_heartbeat_is_renewed_and_a_lease_taken_by_another_run_is_noticed(tmp_path):
  workdir = str(tmp_path / "run")
  with lease.Lease(workdir, heartbeat_s=0.05) as held:
    first = _holder(held.path)["heartbeat"]
    deadline = time.time() + 30
    while _holder(held.path)["heartbeat"] == first and time.time() < deadline:
      time.sleep(0.05)
    assert _holder(held.path)["heartbeat"] > first
    held.check()  # still ours
    # The other run renews its lease as this one does: a heartbeat of this run that read the
    # lease just before the other wrote it may write over it once (local files have no
    # conditional write), and the other's next beat puts it back.
    deadline = time.time() + 30
    while not held.lost.is_set() and time.time() < deadline:
      _write(held.path, host="elsewhere", pid=1, started=0, heartbeat=time.time(),
             token="other")
      held.lost.wait(0.2)
    assert held.lost.is_set()
    with pytest.raises(lease.LeaseLostError, match="another run took over the lease"):
      held.check()
  assert _holder(held.path)["token"] == "other"  # the other run's lease is not given back


def test_of_two_runs_started_together_one_takes_the_lease(tmp_path):
  workdir = str(tmp_path / "run")
  # The run that takes the lease holds it until every other run has tried: on a busy machine
  # a thread can reach its attempt after a fixed hold has ended, and then rightly takes a
  # lease given back.
  outcomes, start, tried = [], threading.Barrier(4), threading.Barrier(4, timeout=60)

  def contend():
    start.wait()
    try:
      with lease.Lease(workdir):
        outcomes.append("took")
        tried.wait()
    except lease.LeaseHeldError:
      outcomes.append("refused")
      tried.wait()

  threads = [threading.Thread(target=contend) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcomes) == ["refused"] * 3 + ["took"]


def test_a_lease_being_taken_in_this_process_is_not_taken_over(tmp_path, monkeypatch):
  """A second run of this process that reads the lease between its creation and the first
  run's return (the window two threads started together hit) finds it held, not left by an
  ended incarnation of this process (the lease names this pid either way)."""
  workdir = str(tmp_path / "run")
  create, outcomes = lease._create, []  # pylint: disable=protected-access

  def create_then_contend(path, data):
    create(path, data)
    if not outcomes:
      outcomes.append("first created")
      try:
        with lease.Lease(workdir):
          outcomes.append("second took")
      except lease.LeaseHeldError:
        outcomes.append("second refused")

  monkeypatch.setattr(lease, "_create", create_then_contend)
  with lease.Lease(workdir):
    pass
  assert outcomes == ["first created", "second refused"]


def test_a_lease_replaced_between_heartbeats_is_found_before_the_next_save(workdir):
  """Two relaunches that take over one stale lease together: the one whose lease was
  replaced learns it from ``check`` (read before each save), not only at its next heartbeat."""
  with lease.Lease(workdir, heartbeat_s=3600) as held:
    held.check()
    _write(held.path, host="elsewhere", pid=1, started=0, heartbeat=time.time(),
           token="the other relaunch")
    with pytest.raises(lease.LeaseLostError, match="another run took over the lease"):
      held.check()
  assert _holder(held.path)["token"] == "the other relaunch"


def test_a_lease_naming_this_process_that_it_does_not_hold_is_an_earlier_incarnation(
    workdir, caplog):
  """A restarted container numbers its processes from 1 again under the same host name: a
  lease with this process's pid that this process does not hold is taken over at once."""
  path = f"{workdir}/{lease.LEASE_FILE}"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _write(path, host=socket.gethostname(), pid=os.getpid(), started=time.time(),
         heartbeat=time.time(), token="before the restart")
  with caplog.at_level(logging.WARNING):
    with lease.Lease(workdir) as held:
      assert _holder(held.path)["token"] != "before the restart"
  assert any(f"its process {os.getpid()} on this host has ended" in r.getMessage()
             for r in caplog.records)


def test_a_live_pid_on_this_host_with_a_stale_heartbeat_is_taken_over(workdir, caplog):
  """A pid of this host that is alive but whose lease stopped beating long ago belongs to
  another program now (the run ended without giving its lease back, its pid was reused)."""
  path = f"{workdir}/{lease.LEASE_FILE}"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _write(path, host=socket.gethostname(), pid=1, started=0,
         heartbeat=time.time() - lease.STALE_AFTER_S - 5, token="long gone")
  with caplog.at_level(logging.WARNING):
    with lease.Lease(workdir) as held:
      assert _holder(held.path)["pid"] == os.getpid()
  assert any("its heartbeat is" in r.getMessage() for r in caplog.records)
