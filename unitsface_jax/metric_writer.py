"""Training metrics: JSON lines and TensorBoard event files in the workdir (process 0 only).

TensorBoard files are written with tensorboardX, which needs no TensorFlow; on ``gs://`` its
own GCS writer (google-cloud-storage, the ``gcs`` extra) uploads the event file whole at each
flush. An object store cannot append: there ``metrics.jsonl`` is kept in memory (what an
earlier run wrote, read back at the start, and every line since) and the object is replaced
whole at each write, so it is never a partial line and a resumed run's log continues the
earlier one as on a local disk.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
from etils import epath

from unitsface_jax import storage


def _summary_writer():
  """tensorboardX's ``SummaryWriter`` class, imported without torch.

  tensorboardX imports torch when it is installed (the ``torch`` extra), only to accept torch
  tensors, which this writer never passes (it writes Python floats): 1.3-2.5 s of every run's
  start. Unless torch is already loaded, the import sees torch as absent (a ``None`` entry in
  ``sys.modules`` makes ``import torch`` raise ImportError, which tensorboardX handles), and
  the entry is removed again, so a later ``import torch`` works as before.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends ``{"step": s, "time": t, name: value, ...}`` lines to WORKDIR/metrics.jsonl and
  the same scalars to TensorBoard under WORKDIR/tensorboard."""

  def __init__(self, workdir, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._lines = None  # the object's content, on a store that cannot append
    if self._active:
      if storage.is_remote(workdir):
        self._lines = [self._path.read_text()] if self._path.exists() else []
      self._path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        self._tb = _summary_writer()(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = {"step": int(step), "time": time.time(),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
    text = json.dumps(line) + "\n"
    if self._lines is None:
      with self._path.open("a") as f:
        f.write(text)
    else:
      self._lines.append(text)
      self._path.write_text("".join(self._lines))
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
