"""Evaluation reports: a console table, a JSON file and ROC plots (PNG) in an output folder."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None,
                 percent: bool = True) -> str:
  """A fixed-width text table: one row per name, one column per metric.

  Args:
    rows: name -> metric -> value (non-numbers are skipped).
    columns: metric order (default: the numeric keys of the first row).
    percent: print values x100 with 2 decimals (the field's convention); else 5 decimals.
  """
  if not rows:
    return ""
  if columns is None:
    first = next(iter(rows.values()))
    columns = [k for k, v in first.items() if isinstance(v, (int, float, np.floating))]
  name_w = max(len("name"), *(len(n) for n in rows))
  widths = [max(len(c), 8) for c in columns]
  lines = ["  ".join(["name".ljust(name_w)] + [c.rjust(w) for c, w in zip(columns, widths)])]
  lines.append("-" * len(lines[0]))
  for name, vals in rows.items():
    cells = []
    for c, w in zip(columns, widths):
      v = vals.get(c)
      if v is None:
        cells.append("-".rjust(w))
      else:
        cells.append((f"{100 * v:.2f}" if percent else f"{v:.5f}").rjust(w))
    lines.append("  ".join([name.ljust(name_w)] + cells))
  return "\n".join(lines)


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def write_json(out_dir: str | epath.PathLike, name: str, results: Mapping) -> epath.Path:
  """Writes ``results`` (NumPy values converted) to ``<out_dir>/<name>.json``."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=True) + "\n")
  return path


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | epath.PathLike, *,
             title: str = "ROC", xlim: tuple[float, float] = (1e-6, 1.0),
             ylim: tuple[float, float] = (0.0, 1.0)) -> epath.Path:
  """Plots TPR against FPR (log axis) for each curve and saves a PNG.

  Uses a bare Agg canvas rather than pyplot, so no display and no global figure state are
  involved (the training loop may call this from a worker thread).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4.5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, (fpr, tpr) in curves.items():
    fpr = np.asarray(fpr, np.float64)
    keep = fpr > 0  # a log axis cannot show FPR 0
    ax.plot(fpr[keep], np.asarray(tpr)[keep], lw=1.2, label=name)
  ax.set_xscale("log")
  ax.set_xlim(*xlim)
  ax.set_ylim(*ylim)
  ax.grid(linestyle="--", linewidth=0.6)
  ax.set_xlabel("False Positive Rate")
  ax.set_ylabel("True Positive Rate")
  ax.set_title(title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  return path
