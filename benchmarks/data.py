"""Input pipeline throughput vs. the raw JPEG decode rate of the same images, in one run.

  python benchmarks/data.py [--data=DIR] [--workers=2] [--batch_size=64] [--seconds=10]

Measures, on the same encoded images (default: the bundled ORL demo RecordIO set):
  raw:            simplejpeg.decode_jpeg to RGB in a loop, one process, images in memory;
  pipeline f32:   unitsface_jax.data.pipeline with ``--workers`` grain worker processes (read
                  from the .rec, decode, random flip, normalise to float32, batch, hand the
                  batch to this process), the default configuration;
  pipeline uint8: the same with ``normalize=False`` (the accelerator normalises);
  train:          uint8 with ``defer_flip`` (the training configuration: the accelerator
                  normalises and mirrors);
  train threads:  the same with no worker processes and ``--workers`` decoding threads in
                  this process (simplejpeg releases the GIL);
  in process:     the training configuration with no workers and one thread (what the
                  pipeline costs without any hand-over).
Each pipeline is started afresh in each of its rounds and timed after its workers have
started and delivered a first batch (then closed, so idle workers never overlap). Rounds
alternate (raw, f32, uint8, raw, ...) so load from other processes on a shared machine falls on
all alike; medians are reported, with the CPU seconds each image cost (this process and its
workers, from psutil) and the load average; and the CPU cost of creating and filling one
fresh shared-memory batch (grain's workers hand every batch over in a new block). The issue's
goal: pipeline >= 0.9 * workers * raw.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unitsface_jax.data import demo, pipeline, sources  # pylint: disable=wrong-import-position

_DATA = flags.DEFINE_string("data", str(demo.demo_path()), "RecordIO/TFDS/image folder.")
_WORKERS = flags.DEFINE_integer(
    "workers", 2, "grain worker processes, and decoding threads for the threaded rows.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Per-host batch size.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Seconds per measurement round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds of each measurement.")


def _cpu_seconds() -> tuple[float, float]:
  """CPU time so far of (this process, its children: the grain workers)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return float("nan"), float("nan")
  me = psutil.Process()
  children = 0.0
  for child in me.children(recursive=True):
    try:
      children += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return sum(me.cpu_times()[:2]), children


def _timed(step, images_per_step: int, seconds: float) -> tuple[float, float, float]:
  """Runs ``step`` for ``seconds``; returns (images/s, CPU microseconds per image in this
  process, in its worker processes)."""
  count, cpu0, start = 0, _cpu_seconds(), time.perf_counter()
  while time.perf_counter() - start < seconds:
    step()
    count += images_per_step
  wall, cpu1 = time.perf_counter() - start, _cpu_seconds()
  return (count / wall, 1e6 * (cpu1[0] - cpu0[0]) / count, 1e6 * (cpu1[1] - cpu0[1]) / count)


def _shm_fill_ms(shape, dtype, repeats: int = 20) -> float:
  """CPU ms to create and fill one fresh shared-memory batch, as grain's workers do per batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from grain import python as grain_python  # pylint: disable=g-import-not-at-top
  source = np.ones(shape, dtype)
  start = time.process_time()
  for _ in range(repeats):
    block = grain_python.SharedMemoryArray(shape, dtype)
    np.copyto(block, source)
    block.unlink_on_del()
    del block
  return 1e3 * (time.process_time() - start) / repeats


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv):
  del argv
  import simplejpeg  # pylint: disable=g-import-not-at-top
  source = sources.make_source("auto", _DATA.value)
  images = [source[i]["image"] for i in range(len(source))]

  def decode_all():
    for data in images:
      simplejpeg.decode_jpeg(data, colorspace="RGB")

  configs = {name: pipeline.PipelineConfig(batch_size=_BATCH.value, seed=0,
                                           worker_count=workers, read_threads=threads,
                                           normalize=normalize, defer_flip=defer)
             for name, normalize, defer, workers, threads in (
                 ("pipeline_f32", True, False, _WORKERS.value, 1),
                 ("pipeline_uint8", False, False, _WORKERS.value, 1),
                 # As training runs it: uint8, flips applied on the accelerator.
                 ("pipeline_train", False, True, _WORKERS.value, 1),
                 # The same with decoding threads in this process instead of worker processes
                 # (the JPEG decoder releases the GIL): no hand-over between processes.
                 ("pipeline_train_threads", False, True, 0, _WORKERS.value),
                 # For reference: the training configuration in this process, one thread.
                 ("pipeline_train_in_process", False, True, 0, 1))}
  results = {"raw": [], **{name: [] for name in configs}}
  loads = []
  for _ in range(_ROUNDS.value):
    results["raw"].append(_timed(decode_all, len(images), _SECONDS.value))
    # Each pipeline lives only for its own round, so no idle workers compete with the others.
    for name, config in configs.items():
      it = pipeline.PipelineIterator(source, config)
      next(it)  # worker start-up and the first batch are not throughput
      results[name].append(_timed(lambda it=it: next(it), _BATCH.value, _SECONDS.value))
      it.close()
    loads.append(os.getloadavg()[0])
  summary = {name: {"img_s": round(statistics.median(r[0] for r in rounds), 1),
                    "cpu_us_per_img": round(statistics.median(r[1] + r[2] for r in rounds), 1),
                    "cpu_us_per_img_main": round(statistics.median(r[1] for r in rounds), 1),
                    "cpu_us_per_img_workers": round(statistics.median(r[2] for r in rounds), 1),
                    "rounds_img_s": [round(r[0], 1) for r in rounds]}
             for name, rounds in results.items()}
  raw = summary["raw"]["img_s"]
  for name, config in configs.items():
    parallel = config.worker_count or config.read_threads
    summary[name]["ratio_to_workers_x_raw"] = round(summary[name]["img_s"] / (parallel * raw), 3)
  shape = (_BATCH.value, 112, 112, 3)
  shm = {"float32": round(_shm_fill_ms(shape, "float32"), 2),
         "uint8": round(_shm_fill_ms(shape, "uint8"), 2)}
  print(json.dumps({
      "data": _DATA.value, "images": len(images), "workers": _WORKERS.value,
      "batch_size": _BATCH.value, "seconds_per_round": _SECONDS.value,
      "results": summary, "shm_batch_create_fill_cpu_ms": shm, "load_average_1min": loads, "cpus": os.cpu_count(),
      "cpu": _cpu_model(), "python": platform.python_version(), "commit": _commit(),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }, indent=1))


if __name__ == "__main__":
  app.run(main)
