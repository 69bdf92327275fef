"""A training run that meets a full disk, for tests/test_gcs.py and benchmarks/faults.py.

``unshare --user --map-root-user --mount python tests/full_disk_run.py MOUNT OUT COMMAND...``:
inside its own user and mount namespace (no privileges needed) it mounts a 64 MiB tmpfs on
MOUNT and runs ``COMMAND --workdir=MOUNT/run`` with the SIGSTOP drill after step 5 (checkpoint
4 on disk); while the run is paused a file fills what is left of the tmpfs, and the run goes
on into its next save. Then the file is removed and COMMAND runs again on the same workdir.
The two runs' stderr go to OUT/first.err and OUT/second.err, the workdir is copied to
OUT/run (the tmpfs ends with the namespace), and one JSON line reports what happened.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time


def _files(directory):
  """Every file under ``directory``: its relative path -> its bytes, in hex."""
  return {os.path.relpath(os.path.join(d, f), directory):
          open(os.path.join(d, f), "rb").read().hex()
          for d, _, files in os.walk(directory) for f in files}


def main():
  mount, out, command = sys.argv[1], sys.argv[2], sys.argv[3:]
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", mount], check=True)
  workdir = os.path.join(mount, "run")
  result = {}
  with open(os.path.join(out, "first.err"), "w") as err:
    first = subprocess.Popen(
        command + ["--workdir=" + workdir, "--config.debug.signal_after_step=5",
                   "--config.debug.signal=SIGSTOP"], stdout=subprocess.DEVNULL, stderr=err)
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    result["stopped"] = os.WIFSTOPPED(status)
    kept = os.path.join(workdir, "checkpoints", "4")
    before = _files(kept)
    filler = os.path.join(mount, "filler")
    with open(filler, "wb", buffering=0) as f:
      for chunk in (1 << 20, 1 << 12):
        try:
          while True:
            f.write(bytes(chunk))
        except OSError:
          pass
    result["free_bytes"] = shutil.disk_usage(mount).free
    resumed = time.monotonic()
    first.send_signal(signal.SIGCONT)
    result["first"] = first.wait(timeout=600)
    result["seconds_to_stop"] = round(time.monotonic() - resumed, 2)
  result["checkpoint_4_unchanged"] = bool(before) and _files(kept) == before
  result["left"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  os.remove(filler)
  with open(os.path.join(out, "second.err"), "w") as err:
    result["second"] = subprocess.run(command + ["--workdir=" + workdir],
                                      stdout=subprocess.DEVNULL, stderr=err).returncode
  shutil.copytree(workdir, os.path.join(out, "run"))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
