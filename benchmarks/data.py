"""Input pipeline throughput vs. the raw JPEG decode rate of the same images, in one run.

  python benchmarks/data.py [--data=DIR] [--workers=2] [--batch_size=64] [--seconds=20]

Measures, on the same encoded images (default: the bundled ORL demo RecordIO set):
  raw:      simplejpeg.decode_jpeg to RGB in a loop, one process, images held in memory;
  pipeline: unitsface_jax.data.pipeline with ``--workers`` grain worker processes (read from
            the .rec, decode, random flip, normalise to float32, batch, hand over to the
            training process), after the workers have started and delivered a first batch.
The issue's goal is pipeline >= 0.9 * workers * raw. Rounds alternate (raw, pipeline, raw, ...)
so load from other processes on a shared machine hits both alike; the medians are reported.
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
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes for the pipeline.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Per-host batch size.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds per measurement round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds of each measurement.")


def raw_decode_rate(images: list[bytes], seconds: float) -> float:
  import simplejpeg  # pylint: disable=g-import-not-at-top
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    for data in images:
      simplejpeg.decode_jpeg(data, colorspace="RGB")
    count += len(images)
  return count / (time.perf_counter() - start)


def pipeline_rate(it, batch_size: int, seconds: float) -> float:
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += batch_size
  return count / (time.perf_counter() - start)


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  source = sources.make_source("auto", _DATA.value)
  images = [source[i]["image"] for i in range(len(source))]
  config = pipeline.PipelineConfig(batch_size=_BATCH.value, seed=0, worker_count=_WORKERS.value)
  it = pipeline.PipelineIterator(source, config)
  start = time.perf_counter()
  next(it)  # worker start-up and the first batch are not throughput
  startup = time.perf_counter() - start
  raw, piped = [], []
  for _ in range(_ROUNDS.value):
    raw.append(raw_decode_rate(images, _SECONDS.value))
    piped.append(pipeline_rate(it, _BATCH.value, _SECONDS.value))
  it.close()
  raw_rate, pipe_rate = statistics.median(raw), statistics.median(piped)
  result = {
      "data": _DATA.value, "images": len(images), "workers": _WORKERS.value,
      "batch_size": _BATCH.value, "raw_decode_img_s": round(raw_rate, 1),
      "pipeline_img_s": round(pipe_rate, 1), "raw_rounds": [round(r, 1) for r in raw],
      "pipeline_rounds": [round(r, 1) for r in piped],
      "ratio_to_workers_x_raw": round(pipe_rate / (_WORKERS.value * raw_rate), 3),
      "startup_s": round(startup, 2), "cpus": os.cpu_count(),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "python": platform.python_version(), "commit": _commit(),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
