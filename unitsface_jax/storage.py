"""Paths on local disk or in Google Cloud Storage (``gs://``), one check for the extra it needs.

Every path the package takes goes through ``etils.epath``, which reads and writes ``gs://``
through gcsfs (fsspec); orbax writes checkpoints through TensorStore and ArrayRecord reads
through riegeli, both with their own GCS clients. gcsfs is not a core dependency: it comes
with the ``gcs`` extra (``pip install 'unitsface_jax[gcs]'``, or ``[tpu]``). The entry points
call ``require_gcs`` on every path field before anything is built, so a ``gs://`` path without
the extra stops in one line naming the field and the extra, not in a traceback from deep
inside the first reader.

Emulators (tests): gcsfs and google-cloud-storage follow ``STORAGE_EMULATOR_HOST``,
TensorStore ``TENSORSTORE_GCS_HTTP_URL``, riegeli (ArrayRecord) ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.
gcsfs >= 2025.x first asks the bucket's storage layout over gRPC (zonal and hierarchical
buckets), which an emulator does not serve: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (read
when gcsfs is imported; gcsfs/__init__.py) keeps the plain JSON API client.

No JAX, NumPy only: the data layer uses this module in grain's worker processes.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from unitsface_jax import errors

GCS_INSTALL = "pip install 'unitsface_jax[gcs]'"


class MissingExtraError(errors.UserError, ImportError):
  """A ``gs://`` path was given but the GCS filesystem (the ``gcs`` extra) is not installed."""


def is_remote(path) -> bool:
  """Whether ``path`` names an object store (``gs://``, ...) rather than the local disk."""
  return "://" in os.fspath(path)


def is_gcs(path) -> bool:
  return os.fspath(path).startswith("gs://")


def require_gcs(path, field: str) -> None:
  """Raises ``MissingExtraError`` naming ``field`` when ``path`` is on GCS and gcsfs is absent.

  Args:
    path: a path or URL (None and local paths pass).
    field: what the user set, as they wrote it: ``config.data.path``, ``--workdir``.
  """
  if path is None or not is_gcs(path):
    return
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise MissingExtraError(f"{field} = {os.fspath(path)!r} is in Google Cloud Storage, which "
                            f"needs the gcs extra: {GCS_INSTALL}") from None


def require_gcs_all(fields: Mapping[str, Any]) -> None:
  """``require_gcs`` on each ``{field: path or list of paths}`` (None and "" are skipped)."""
  for field, value in fields.items():
    values = [value] if isinstance(value, (str, os.PathLike)) or value is None else value
    for i, path in enumerate(values):
      if path:
        require_gcs(path, field if len(values) == 1 else f"{field}[{i}]")


def config_paths(config) -> dict[str, Iterable[str] | str | None]:
  """The path fields of a training config, keyed by their name (for ``require_gcs_all`` and
  other checks of every path a run reads)."""
  fields = {"config.eval.bins": list(config.eval.bins)}
  if config.data.source != "synthetic":
    fields["config.data.path"] = config.data.path
  if config.get("init") and config.init.backbone:
    fields["config.init.backbone"] = config.init.backbone
  return fields
