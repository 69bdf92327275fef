"""The launch scripts: what a dry run says every host runs, and local_multiprocess.sh starting
(and, when one fails, stopping) real processes."""

import os
import pathlib
import re
import subprocess

import pytest

import tiny_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
POD_ARGS = ["--config=configs/glint_r100.py", "--config.data.path=gs://b/glint360k",
            "--workdir=gs://b/runs/r 100"]  # a space: the command must quote it
POD_MAIN = ("python -m unitsface_jax.main --distributed --config=configs/glint_r100.py "
            r"--config.data.path=gs://b/glint360k --workdir=gs://b/runs/r\ 100")


def dry_run(script, *args, **env):
  proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, **env))
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


@pytest.mark.parametrize("how", [("--dry_run",), ()])
def test_tpu_pod_dry_run_installs_the_tpu_extra_then_trains(how):
  lines = dry_run("tpu_pod.sh", *how, "my-tpu", "us-central2-b", *POD_ARGS,
                  **({} if how else {"DRY_RUN": "1"}))
  assert lines == ["this machine checks first (exit 2: the config does not fit the slice):",
                   "  python -m unitsface_jax.plan --topology=TOPOLOGY "
                   "--config=configs/glint_r100.py --config.data.path=gs://b/glint360k",
                   "every worker of TPU my-tpu (zone us-central2-b) runs:",
                   "  cd ~/unitsface_jax",
                   "  python -m pip install -e '.[tpu]'",
                   f"  {POD_MAIN}"]
  lines = dry_run("tpu_pod.sh", "--dry_run", "my-tpu", "z", *POD_ARGS, TOPOLOGY="v5p:2x4x4")
  assert lines[1].startswith("  python -m unitsface_jax.plan --topology=v5p:2x4x4 ")
  assert dry_run("tpu_pod.sh", "--dry_run", "my-tpu", "z", *POD_ARGS, PLAN="0")[0] == (
      "every worker of TPU my-tpu (zone z) runs:")


@pytest.mark.slow
def test_tpu_pod_stops_before_any_worker_when_the_config_does_not_fit():
  """The plan refuses the config (a head of 200M classes on a v5e:2x2) on this machine: exit
  2 with its one error line, and gcloud (not installed here) is never reached."""
  proc = subprocess.run(
      ["bash", str(LAUNCH / "tpu_pod.sh"), "my-tpu", "z", "--config=configs/demo.py:smoke",
       "--config.data.num_classes=200000000", "--workdir=gs://b/runs/x"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TOPOLOGY="v5e:2x2", INSTALL="0", PYTHONPATH=str(ROOT)))
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "needs" in errors[0] and "v5e:2x2" in errors[0], proc.stderr
  assert "gcloud" not in proc.stderr


def test_slurm_dry_run_installs_the_gcs_extra_only_for_gs_paths():
  assert dry_run("slurm_gpu.sbatch", "--dry_run", *POD_ARGS) == [
      "every node runs (srun --ntasks-per-node=1):",
      "  python -m pip install -e '.[gcs]'",
      "every task, one per GPU, runs (srun):",
      f"  {POD_MAIN}"]
  local = ["--config=configs/casia_r50.py", "--workdir=/shared/runs/casia"]
  assert dry_run("slurm_gpu.sbatch", *local, DRY_RUN="1")[:2] == [
      "every node runs (srun --ntasks-per-node=1):", "  python -m pip install -e '.'"]
  assert dry_run("slurm_gpu.sbatch", *local, DRY_RUN="1", INSTALL="0") == [
      "every task, one per GPU, runs (srun):",
      "  python -m unitsface_jax.main --distributed --config=configs/casia_r50.py "
      "--workdir=/shared/runs/casia"]


def test_local_dry_run_names_each_process_and_one_coordinator(tmp_path):
  lines = dry_run("local_multiprocess.sh", "--dry_run", "2", "4", "--config=configs/demo.py",
                  "--workdir=/tmp/mp", LOG_DIR=str(tmp_path), XLA_FLAGS="--xla_dump_to=/x")
  pattern = (r"  env XLA_FLAGS=--xla_dump_to=/x\\ --xla_force_host_platform_device_count=4 "
             r"JAX_PLATFORMS=cpu python -m unitsface_jax.main --distributed "
             r"--coordinator_address=127\.0\.0\.1:(\d+) --num_processes=2 --process_id={} "
             r"--config=configs/demo\.py --workdir=/tmp/mp")
  assert lines[0] == f"process 0 runs (log: {tmp_path}/unitsface_proc0.log):"
  assert lines[2] == f"process 1 runs (log: {tmp_path}/unitsface_proc1.log):"
  ports = [re.fullmatch(pattern.format(i), lines[2 * i + 1]) for i in range(2)]
  assert all(ports) and ports[0].group(1) == ports[1].group(1), lines
  assert len(lines) == 4 and not list(tmp_path.iterdir())


def _processes_with(text: str) -> list[int]:
  found = []
  for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
    try:
      if text in cmdline.read_bytes().decode(errors="replace"):
        found.append(int(cmdline.parent.name))
    except OSError:  # the process ended meanwhile
      pass
  return found


def launch_local(logs, workdir, *flags, devices=1, timeout, env=None, tiny=False):
  """``local_multiprocess.sh 2 DEVICES`` on the tiny smoke run, logs in ``logs``. Returns
  (status, stderr, the processes still running with ``workdir`` in their command line when
  it returned); those are then killed, so no test leaves a training behind. ``tiny``: the
  processes know the tests' backbones (tests/launch_site/sitecustomize.py), for flags that
  name one."""
  path = tiny_backbone.CHILD_PYTHONPATH if tiny else str(ROOT)
  env = dict(env or os.environ, PYTHONPATH=path, LOG_DIR=str(logs),
             UNITSFACE_NO_XLA_FLAGS="1")
  proc = subprocess.Popen(
      ["bash", str(LAUNCH / "local_multiprocess.sh"), "2", str(devices),
       "--config=configs/demo.py:smoke", f"--workdir={workdir}", "--config.model.width=4",
       "--config.model.num_features=32", *flags],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    left = _processes_with(str(workdir))
    for pid in left:
      os.kill(pid, 9)
  return proc.returncode, err, left


@pytest.mark.slow
def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  """Process 1 cannot start (its log path is a directory): process 0, which would wait for it
  in jax.distributed.initialize for minutes, is stopped and the script exits 1."""
  (tmp_path / "unitsface_proc1.log").mkdir()
  workdir = tmp_path / "run"
  code, err, left = launch_local(tmp_path, workdir, timeout=120)
  assert code == 1, err
  assert "a process exited with status 1: stopping the others" in err
  assert left == []
