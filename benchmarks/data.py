"""Input pipeline throughput vs. the raw JPEG decode rate of the same images, in one run.

  python benchmarks/data.py [--data=DIR] [--workers=2] [--batch_size=64] [--seconds=10]
  python benchmarks/data.py --gcs [--workers=2] [--seconds=10] [--synthetic_records=N]

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
With ``--gcs`` it measures instead where the records come from (the issue 13 rows): the
training configuration with ``--workers`` decoding threads reading the RecordIO set from the
local disk, and from a GCS emulator on 127.0.0.1 (fake-gcs-server, ``tests/gcs_server.py``)
through ``gs://`` as the package reads it (the file fits the 256 MiB block cache: 8 MiB range
requests) and with the cache off (what a file larger than the cache costs: one range request
per record with the exact shuffle, one per chunk with ``data.shuffle = "chunks"``,
``--chunk_records`` and ``--shuffle_window``; ``--synthetic_records=N`` reads a set of N
synthetic faces instead of ``--data``); with the HTTP requests per 64 records counted from
the server's log. The
emulator answers in well under a millisecond; real GCS takes tens of milliseconds a request,
so on GCS the uncached row is the one that changes most.
Each pipeline is started afresh in each of its rounds and timed after its workers have
started and delivered a first batch (then closed, so idle workers never overlap). Rounds
alternate (raw, f32, uint8, raw, ...) so load from other processes on a shared machine falls on
all alike; medians are reported, with the CPU seconds each image cost (this process and its
workers, from psutil) and the load average; and the CPU cost of creating and filling one
fresh shared-memory batch (grain's workers hand every batch over in a new block). The issue's
goal: pipeline >= 0.9 * workers * raw.
"""

from __future__ import annotations

import dataclasses
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
_GCS = flags.DEFINE_bool("gcs", False, "Measure local disk against a GCS emulator (RecordIO).")
_SYNTHETIC = flags.DEFINE_integer(
    "synthetic_records", 0, "With --gcs: read a RecordIO set of this many synthetic 112x112 "
    "JPEGs (written to a temporary folder) instead of --data.")
_CHUNK_RECORDS = flags.DEFINE_integer("chunk_records", 1024,
                                      "With --gcs: config.data.chunk_records of the chunks row.")
_WINDOW = flags.DEFINE_integer("shuffle_window", 16,
                               "With --gcs: config.data.shuffle_window of the chunks row.")


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


def _gcs_main() -> None:
  """Local disk against the GCS emulator, the training configuration with decoding threads."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from unitsface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
  import gcs_server  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    data = pathlib.Path(_DATA.value)
    if _SYNTHETIC.value:
      data = pathlib.Path(tmp) / "synthetic"
      fake = sources.SyntheticSource(_SYNTHETIC.value, num_classes=_SYNTHETIC.value // 64)
      recordio.write_insightface(data, ((i * fake.num_classes // len(fake), fake[i]["image"])
                                        for i in range(len(fake))), fake.num_classes)
    port = gcs_server.unused_port()
    with gcs_server.GcsServer(pathlib.Path(tmp) / "root", port) as server:
      os.environ.update(server.env())
      url = server.create_bucket("bench") + "/data"
      gcs_server.upload_tree(data, url)
      config = pipeline.PipelineConfig(batch_size=_BATCH.value, seed=0, worker_count=0,
                                       read_threads=_WORKERS.value, normalize=False,
                                       defer_flip=True)
      chunks = dataclasses.replace(config, chunk_records=_CHUNK_RECORDS.value,
                                   shuffle_window=_WINDOW.value)

      def uncached():
        source = sources.RecordIOSource(url)
        source.reader = recordio.RecordIOReader(
            epath.Path(url) / "train.rec", epath.Path(url) / "train.idx", cache_bytes=0)
        return source

      # The same set converted to ArrayRecord (data/prepare.py), local and in the bucket.
      from unitsface_jax.data import prepare  # pylint: disable=g-import-not-at-top
      built = pathlib.Path(prepare.prepare(data, pathlib.Path(tmp) / "tfds")["dir"])
      built_url = f"{url}_tfds"
      gcs_server.upload_tree(built, built_url)
      # A local row last: reads a closed pipeline still has in flight must not outlive the
      # server (riegeli retries a vanished server for minutes).
      # The chunks row first and the uncached row before a row counted on another file: the
      # range requests a closed pipeline still has in flight (a batch's, in records mode) land
      # in the next row's count.
      makers = {"gcs_uncached_chunks": uncached, "gcs_cached": lambda: sources.RecordIOSource(url),
                "gcs_uncached": uncached,
                "arrayrecord_gcs": lambda: sources.TFDSSource(built_url),
                "arrayrecord_local": lambda: sources.TFDSSource(built),
                "local": lambda: sources.RecordIOSource(data)}
      rec = r"^/download/.*/o/data%2Ftrain\.rec\?"
      counted = {"gcs_cached": rec, "gcs_uncached": rec, "gcs_uncached_chunks": rec,
                 "arrayrecord_gcs": r"array_record"}
      results = {name: [] for name in makers}
      requests = {name: [0, 0] for name in makers}  # (requests, records)
      loads = []
      for _ in range(_ROUNDS.value):
        for name, make in makers.items():
          pattern = counted.get(name, "^$")  # local rows make no requests
          before = server.requests("GET", pattern)
          # A fresh reader: a cold cache.
          it = pipeline.PipelineIterator(make(), chunks if name.endswith("_chunks") else config)
          count = [0]

          def step(it=it, count=count):
            next(it)
            count[0] += _BATCH.value

          step()
          results[name].append(_timed(step, _BATCH.value, _SECONDS.value))
          it.close()
          requests[name][0] += server.requests("GET", pattern) - before
          requests[name][1] += count[0]
        loads.append(os.getloadavg()[0])
  summary = {name: {"img_s": round(statistics.median(r[0] for r in rounds), 1),
                    "rounds_img_s": [round(r[0], 1) for r in rounds],
                    "cpu_us_per_img": round(statistics.median(r[1] + r[2] for r in rounds), 1),
                    "requests_per_64_records": (round(64 * requests[name][0]
                                                      / requests[name][1], 3)
                                                if name in counted else None),
                    "records": requests[name][1]}
             for name, rounds in results.items()}
  print(json.dumps({
      "data": _DATA.value, "synthetic_records": _SYNTHETIC.value,
      "chunk_records": _CHUNK_RECORDS.value, "shuffle_window": _WINDOW.value,
      "read_threads": _WORKERS.value, "batch_size": _BATCH.value,
      "seconds_per_round": _SECONDS.value, "results": summary, "load_average_1min": loads,
      "cpus": os.cpu_count(), "cpu": _cpu_model(), "commit": _commit(),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1), flush=True)


def main(argv):
  del argv
  if _GCS.value:
    _gcs_main()
    return
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
