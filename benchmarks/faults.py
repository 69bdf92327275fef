r"""The faults a run meets, each injected into the tiny smoke run and measured: what the user
sees (exit status, lines on stderr, ``error:`` lines, tracebacks), the seconds from the fault
to the exit, and whether the same command, started again, ends with the uninterrupted run's
checkpoint bit for bit. Prints the Markdown table of BENCHMARKS.md ("Faults") and one JSON line
per fault.

  python benchmarks/faults.py [--faults sigkill,sigterm,...] [--json_out faults.jsonl]

The run: ``configs/demo.py:smoke`` (16 steps of batch 8, checkpoints every 4) with the tests'
narrow trunk (width 4, 32-d embeddings), one CPU device, or two processes of one device each
(jax.distributed on 127.0.0.1) for the faults of a multi-process run. A fault is injected from
outside once the run has logged a chosen step (``metrics.jsonl``), except the full disk (the
run pauses itself after step 5 with the SIGSTOP drill, a file fills a 64 MiB tmpfs mounted in
a user namespace, and the run goes on) and the second run (started while the first is paused
by the drill). One compilation cache (a temporary folder) serves every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # digest() reads checkpoints with the package's orbax setup
TINY = ["--config=configs/demo.py:smoke", "--config.model.width=4",
        "--config.model.num_features=32", "--nocpu_tuning"]
RUN = ROOT / "tests" / "train_run.py"


def _env(cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=cache)
  env.pop("XLA_FLAGS", None)
  return env


def _command(workdir, *flags, devices=1):
  return [sys.executable, str(RUN), str(devices), *TINY, f"--workdir={workdir}", *flags]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two(workdir, *flags, port):
  return [_command(workdir, *flags, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}") for i in range(2)]


def _logged_step(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
           if line.strip().endswith("}")]
  return max(steps, default=0)


def _wait_for_step(workdir, step: int, procs, timeout=600) -> None:
  deadline = time.time() + timeout
  while _logged_step(workdir) < step:
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      raise RuntimeError(f"the run ended or stalled before step {step}")
    time.sleep(0.05)


def digest(workdir, step: int = 16) -> str:
  """sha256 of every array of checkpoint ``step``'s state, in path order, restored onto this
  process's one device with an explicit target, as tests/test_train.py's ``saved_state``
  does: ``checkpoint.Checkpoints.restore_arrays`` refuses a checkpoint saved on two devices
  ("Topology mismatch")."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        meta.tree if hasattr(meta, "tree") else meta,
                        is_leaf=lambda m: hasattr(m, "shape"))
  leaves = jax.tree_util.tree_flatten_with_path(ckptr.restore(path, target))[0]
  h = hashlib.sha256()
  for key, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(key).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def _seen(stderr: str) -> dict:
  lines = stderr.splitlines()
  return {"lines": len(lines), "error_lines": [l for l in lines if l.startswith("error: ")],
          "tracebacks": stderr.count("Traceback")}


class Faults:
  """Each fault as a method returning its row (a dict)."""

  def __init__(self, scratch: pathlib.Path, cache: str):
    self.scratch, self.env = scratch, _env(cache)
    self._references = {}

  def _dir(self, name) -> pathlib.Path:
    path = self.scratch / name
    shutil.rmtree(path, ignore_errors=True)
    return path

  def _run(self, commands, timeout=900):
    """Runs the processes of one run to their end: [(status, stderr)] and the seconds."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    start = time.time()
    procs = [subprocess.Popen(c, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
             for c, log in zip(commands, logs)]
    for p in procs:
      p.wait(timeout=timeout)
    seconds = time.time() - start
    out = []
    for p, log in zip(procs, logs):
      log.seek(0)
      out.append((p.returncode, log.read()))
    return out, seconds

  def reference(self, processes: int) -> str:
    if processes not in self._references:
      workdir = self._dir(f"reference{processes}")
      commands = ([_command(workdir)] if processes == 1 else
                  _two(workdir, port=_free_port()))
      results, _ = self._run(commands)
      assert all(code == 0 for code, _ in results), results[0][1][-3000:]
      self._references[processes] = digest(workdir)
    return self._references[processes]

  def _relaunch(self, workdir, processes=1) -> dict:
    commands = [_command(workdir)] if processes == 1 else _two(workdir, port=_free_port())
    results, seconds = self._run(commands)
    status = [code for code, _ in results]
    same = all(code == 0 for code in status) and digest(workdir) == self.reference(processes)
    return {"relaunch_status": status[0] if processes == 1 else status,
            "relaunch_s": round(seconds, 1), "bitwise": same,
            "relaunch_warnings": [l[l.index("] ") + 2:][:100] for l in results[0][1].splitlines()
                                  if l.startswith("W") and "] " in l
                                  and "Type handler registry" not in l]}

  def _signal_at(self, name, sig, step, processes=1, target=0, flags=()):
    """Sends ``sig`` to process ``target`` once step ``step`` is logged; the time from the
    signal to the exit of process 0 (the survivor when ``target`` is 1)."""
    workdir = self._dir(name)
    commands = ([_command(workdir, *flags)] if processes == 1 else
                _two(workdir, *flags, port=_free_port()))
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
             for c, log in zip(commands, logs)]
    try:
      _wait_for_step(workdir, step, procs)
      sent = time.time()
      procs[target].send_signal(sig)
      procs[0].wait(timeout=600)
      seconds = time.time() - sent
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    logs[0].seek(0)
    row = {"status": procs[0].returncode, "seconds_to_stop": round(seconds, 2),
           **_seen(logs[0].read())}
    return workdir, row

  def sigkill(self):
    workdir, row = self._signal_at("sigkill", signal.SIGKILL, 6)
    return {"fault": "SIGKILL (a crash) after step 6", **row, **self._relaunch(workdir)}

  def sigterm(self):
    workdir, row = self._signal_at("sigterm", signal.SIGTERM, 6)
    return {"fault": "SIGTERM (preemption) after step 6", **row, **self._relaunch(workdir)}

  def unreadable(self):
    workdir, _ = self._signal_at("unreadable", signal.SIGKILL, 13)
    ckpts = workdir / "checkpoints"
    newest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    largest = max((p for p in (ckpts / str(newest) / "state").rglob("*")
                   if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:1000])
    return {"fault": f"unreadable newest checkpoint ({newest}, truncated) after a crash",
            "status": "-", "seconds_to_stop": "-", "lines": "-", "error_lines": [],
            "tracebacks": 0, **self._relaunch(workdir)}

  def second_run(self):
    workdir = self._dir("second_run")
    first = subprocess.Popen(_command(workdir, "--config.debug.signal_after_step=6",
                                      "--config.debug.signal=SIGSTOP"),
                             cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
      _, status = os.waitpid(first.pid, os.WUNTRACED)
      assert os.WIFSTOPPED(status)
      results, seconds = self._run([_command(workdir)])
      first.send_signal(signal.SIGCONT)
      first.wait(timeout=600)
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
    code, stderr = results[0]
    same = first.returncode == 0 and digest(workdir) == self.reference(1)
    return {"fault": "a second run on the same workdir", "status": code,
            "seconds_to_stop": round(seconds, 2), **_seen(stderr),
            "relaunch_status": f"first run: {first.returncode}", "relaunch_s": "-",
            "bitwise": same, "relaunch_warnings": []}

  def nan(self):
    workdir = self._dir("nan")
    results, seconds = self._run([_command(workdir, "--config.optimizer.lr=1e30",
                                           "--config.optimizer.clip_norm=0")])
    code, stderr = results[0]
    return {"fault": "a learning rate that explodes (lr 1e30, no clipping)", "status": code,
            "seconds_to_stop": f"{seconds:.1f} (whole run)", **_seen(stderr),
            "relaunch_status": "-", "relaunch_s": "-", "bitwise": "-",
            "relaunch_warnings": []}

  def full_disk(self):
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                      capture_output=True, check=False).returncode != 0:
      return {"fault": "a full disk", "status": "not run: no user namespaces"}
    out = self._dir("full_disk")
    out.mkdir()
    (out / "mount").mkdir()
    command = [sys.executable, str(RUN), "1", *TINY, "--config.log_every_steps=16"]
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable,
                           str(ROOT / "tests" / "full_disk_run.py"), str(out / "mount"),
                           str(out), *command],
                          cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=900)
    result = json.loads(proc.stdout.splitlines()[-1])
    first = (out / "first.err").read_text()
    same = result["second"] == 0 and digest(out / "run") == self.reference(1)
    second = (out / "second.err").read_text()
    return {"fault": "a full disk at the save of step 8 (64 MiB tmpfs)", "status": result["first"],
            "seconds_to_stop": result["seconds_to_stop"], **_seen(first), "relaunch_status": result["second"],
            "relaunch_s": "-", "bitwise": same,
            "relaunch_warnings": [l[l.index("] ") + 2:][:100] for l in second.splitlines()
                                  if l.startswith("W") and "] " in l
                                  and "Type handler registry" not in l]}

  def lost_peer(self):
    workdir, row = self._signal_at("lost_peer", signal.SIGKILL, 5, processes=2, target=1)
    return {"fault": "a lost peer (process 1 of 2 SIGKILLed after step 5)", **row,
            **self._relaunch(workdir, processes=2)}

  def hung_peer(self):
    workdir, row = self._signal_at("hung_peer", signal.SIGSTOP, 5, processes=2, target=1,
                                   flags=("--config.step_timeout_s=10",))
    return {"fault": "a hung peer (process 1 of 2 SIGSTOPped after step 5; step_timeout_s=10)",
            **row, **self._relaunch(workdir, processes=2)}


FAULTS = ("sigkill", "sigterm", "unreadable", "full_disk", "second_run", "nan", "lost_peer",
          "hung_peer")


def table(rows) -> str:
  out = ["| fault | exit | stderr lines (`error:` lines, tracebacks) | fault to exit (s) | "
         "the same command again | bitwise as uninterrupted |", "|---|---|---|---|---|---|"]
  for r in rows:
    if "lines" not in r:
      out.append(f"| {r['fault']} | {r['status']} | | | | |")
      continue
    lines = ("-" if r["lines"] == "-" else
             f"{r['lines']} ({len(r['error_lines'])}, {r['tracebacks']})")
    again = (f"{r['relaunch_status']} in {r['relaunch_s']} s" if r["relaunch_s"] != "-"
             else str(r["relaunch_status"]))
    if r.get("relaunch_warnings"):
      again += "; warns: " + " / ".join(f"`{w}`" for w in r["relaunch_warnings"])
    out.append(f"| {r['fault']} | {r['status']} | {lines} | {r['seconds_to_stop']} | {again} "
               f"| {r['bitwise']} |")
  out.append("")
  for r in rows:
    for line in r.get("error_lines", []):
      out.append(f"- {r['fault']}: `{line[:300]}`")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--faults", default=",".join(FAULTS))
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with tempfile.TemporaryDirectory(prefix="faults_") as scratch:
    faults = Faults(pathlib.Path(scratch), os.path.join(scratch, "jax_cache"))
    rows = []
    for name in args.faults.split(","):
      start = time.time()
      row = json.loads(json.dumps(getattr(faults, name)()).replace(scratch, "$SCRATCH"))
      row["bench_s"] = round(time.time() - start, 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.json_out:
        with open(args.json_out, "a") as f:
          f.write(json.dumps(row) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
