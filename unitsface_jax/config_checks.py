"""Checks a run's ConfigDict before anything is built, naming the field that is wrong.

Unknown and ill-typed ``--config.x.y=value`` overrides are refused by ml_collections'
config_flags (which names the field); this module checks the values that are well-typed but
meaningless (a negative batch, an unknown model, a margin outside its range);
``validate_paths`` checks that the paths a run reads exist and that its workdir can be written.
"""

from __future__ import annotations

import functools
import os
import socket

import ml_collections
from etils import epath

from unitsface_jax import errors
from unitsface_jax import head
from unitsface_jax import models
from unitsface_jax import optim
from unitsface_jax import parallel
from unitsface_jax import run_control
from unitsface_jax.data import sources
from unitsface_jax.losses import registry


ConfigError = errors.ConfigError


def _require(ok: bool, field: str, value, what: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field} = {value!r}: {what}")


def _at_least(config: ml_collections.ConfigDict, field: str, minimum: int, note: str = "") -> None:
  """``config.<field>`` (dotted) >= ``minimum``; ``note`` follows the message."""
  value = functools.reduce(lambda c, key: c[key], field.split("."), config)
  _require(value >= minimum, field, value, f"must be >= {minimum}{note}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value is unusable."""
  _require(config.model.name in models.list_models(), "model.name", config.model.name,
           f"must be one of {models.list_models()}")
  _require(config.model.dtype in models.DTYPES, "model.dtype", config.model.dtype,
           f"must be one of {sorted(models.DTYPES)}")
  _require(0.0 <= config.model.dropout < 1.0, "model.dropout",
           config.model.dropout, "must be in [0, 1)")
  _require(config.model.num_features > 0, "model.num_features", config.model.num_features,
           "must be positive")
  _require(isinstance(config.model.width, int) and config.model.width > 0, "model.width",
           config.model.width, "must be a positive number of channels")
  width_error = models.width_error(config.model.name, config.model.width)
  _require(width_error is None, "model.width", config.model.width, width_error)
  _require(not config.model.get("remat", False) or models.supports_remat(config.model.name),
           "model.remat", config.model.get("remat", False),
           f"{models.REMAT_ERROR} not {config.model.name}")
  _require(config.model.bn_stats in parallel.BN_STATS, "model.bn_stats", config.model.bn_stats,
           f"must be one of {parallel.BN_STATS}")
  _at_least(config, "num_devices", 0, " (0: all)")
  _require(config.loss.head_dtype in head.STORAGE_DTYPES, "loss.head_dtype", config.loss.head_dtype,
           f"must be one of {head.STORAGE_DTYPES}")
  _require(config.data.source in sources.SOURCES, "data.source", config.data.source,
           f"must be one of {sources.SOURCES}")
  _at_least(config, "data.num_classes", 2)
  _at_least(config, "data.max_examples", 0, " (0: all)")
  _at_least(config, "data.num_workers", 0)
  _at_least(config, "data.read_threads", 0)
  _require(config.data.shuffle in ("records", "chunks"), "data.shuffle", config.data.shuffle,
           "must be 'records' or 'chunks'")
  for field in ("chunk_records", "shuffle_window"):
    _require(isinstance(config.data[field], int) and config.data[field] >= 1, f"data.{field}",
             config.data[field], "must be a positive integer")
  _require(config.loss.s2c in registry.s2c_names(), "loss.s2c", config.loss.s2c,
           f"must be one of {registry.s2c_names()}")
  _require(config.loss.s2s in registry.s2s_names(), "loss.s2s", config.loss.s2s,
           f"must be one of {registry.s2s_names()}")
  for field in ("s2c_scale", "s2s_scale"):
    _require(config.loss[field] > 0, f"loss.{field}", config.loss[field], "must be positive")
  for field in ("s2c_margin", "s2s_margin"):
    _require(0.0 <= config.loss[field] < 1.0, f"loss.{field}",
             config.loss[field], "must be in [0, 1)")
  _validate_loss_options(config)
  _at_least(config, "loss.uss_start_epoch", 0)
  _require(0.0 < config.loss.sample_rate <= 1.0, "loss.sample_rate", config.loss.sample_rate,
           "must be in (0, 1]")
  _require(config.optimizer.name in optim.OPTIMIZERS, "optimizer.name", config.optimizer.name,
           f"must be one of {tuple(optim.OPTIMIZERS)}")
  _require(config.optimizer.lr > 0, "optimizer.lr", config.optimizer.lr, "must be positive")
  for field in ("b1", "b2"):
    _require(0.0 <= config.optimizer[field] < 1.0, f"optimizer.{field}", config.optimizer[field],
             "must be in [0, 1)")
  _require(config.optimizer.eps > 0, "optimizer.eps", config.optimizer.eps, "must be positive")
  _at_least(config, "init.head_only_steps", 0)
  _require(not config.init.head_only_steps or config.init.backbone, "init.head_only_steps",
           config.init.head_only_steps, "needs config.init.backbone (a backbone to keep frozen)")
  _require(config.init.head_only_steps % max(config.optimizer.grad_accum_steps, 1) == 0,
           "init.head_only_steps", config.init.head_only_steps,
           "must be a multiple of config.optimizer.grad_accum_steps (whole updates)")
  _require(0.0 <= config.optimizer.momentum < 1.0, "optimizer.momentum", config.optimizer.momentum,
           "must be in [0, 1)")
  _at_least(config, "optimizer.weight_decay", 0)
  _at_least(config, "optimizer.clip_norm", 0, " (0 disables clipping)")
  _at_least(config, "optimizer.grad_accum_steps", 1)
  _require(config.schedule.name in optim.SCHEDULES, "schedule.name", config.schedule.name,
           f"must be one of {optim.SCHEDULES}")
  _require(config.schedule.power > 0, "schedule.power", config.schedule.power, "must be positive")
  _require(list(config.schedule.decay_epochs) == sorted(config.schedule.decay_epochs),
           "schedule.decay_epochs", config.schedule.decay_epochs, "must be increasing")
  _at_least(config, "batch_size", 1)
  _at_least(config, "num_epochs", 1)
  _at_least(config, "eval.every_steps", 0, " (0 disables)")
  _at_least(config, "eval.batch_size", 1)
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[field] >= 1, field, config[field], "must be >= 1")
  _at_least(config, "debug.signal_after_step", 0, " (0: off)")
  _require(config.debug.signal in run_control.DRILL_SIGNALS, "debug.signal", config.debug.signal,
           f"must be one of {run_control.DRILL_SIGNALS}")


def _validate_loss_options(config: ml_collections.ConfigDict) -> None:
  """The options of the chosen losses, by their own checks (the others' are not read)."""
  for loss in (registry.s2c(config.loss.s2c), registry.s2s(config.loss.s2s)):
    options = {name: config.loss.get(name, default) for name, default in loss.options.items()}
    problem = loss.check(options, config.batch_size)
    if problem is not None:
      field, what = problem
      _require(False, field, _value(config, field), what)


def _value(config: ml_collections.ConfigDict, field: str):
  """The value at the dotted path ``field`` of ``config``."""
  for part in field.split("."):
    config = config[part]
  return config


# What the recipes write where a user must put their own location (gs://YOUR_BUCKET/...).
PLACEHOLDER_MARKS = ("YOUR_",)


def _placeholder(path: str) -> bool:
  return any(mark in path for mark in PLACEHOLDER_MARKS)


def _exists(field: str, path: str, hint: str) -> None:
  """Raises ConfigError unless ``path`` (local or gs://, through etils.epath) exists; ``hint``
  says what to set instead."""
  _require(not _placeholder(path), field, path, f"is a placeholder: set {hint}")
  try:
    found = epath.Path(path).exists()
  except Exception as e:  # pylint: disable=broad-except
    # e.g. a gs:// path without a GCS filesystem installed, or credentials refused
    raise ConfigError(f"config.{field} = {path!r}: cannot be checked: "
                      f"{type(e).__name__}: {e}") from e
  _require(found, field, path, f"does not exist: set {hint}")


def validate_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError naming the first path the run cannot use, before anything is built.

  The training data (``data.path``, unless the source is synthetic) and the verification sets
  (``eval.bins``, when evaluation is on) must exist and not be a recipe's placeholder; the
  workdir must be creatable and writable (checked by writing and removing a file in it).
  Works on local and gs:// paths alike (etils.epath).
  """
  if config.data.source != "synthetic":
    _require(bool(config.data.path), "data.path", config.data.path,
             "is empty: set --config.data.path=DIR (or --config.data.source=synthetic)")
    _exists("data.path", config.data.path, "--config.data.path=your copy of the data set "
            "(or --config.data.source=synthetic)")
  if config.eval.every_steps > 0:
    for i, path in enumerate(config.eval.bins):
      _exists(f"eval.bins[{i}]", path, "--config.eval.bins='(\"your.bin\",)' "
              "(or --config.eval.every_steps=0)")
  if _placeholder(workdir):
    raise ConfigError(f"--workdir={workdir}: is a placeholder: set it to a directory of yours")
  probe = epath.Path(workdir) / f".write_check.{socket.gethostname()}.{os.getpid()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--workdir={workdir}: cannot be written: {type(e).__name__}: {e}") from e
