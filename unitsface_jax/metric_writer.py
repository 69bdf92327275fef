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
import time

import jax
from etils import epath

from unitsface_jax import storage


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
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

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
