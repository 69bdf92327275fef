"""Checkpoints that lose nothing: WORKDIR/checkpoints/<step>/ with the train state, the data
iterator and the config, saved asynchronously by orbax's CheckpointManager; and the readers of
a saved run (``restore_state`` onto any mesh, ``backbone_from_workdir`` for export and
evaluation).

Items per step:
  state   every array of the run (backbone params, BN statistics, frozen scales, head W, M,
          seen, b, initialized, optimiser state, step; the epoch follows from the step),
          restored with the caller's target shardings so a run resumes on another device
          count;
  data    the grain iterator state (one file per process), so a resumed run sees the same
          batches it would have seen;
  config  the run's config as JSON, for the export CLI and for humans.

A checkpoint that cannot be read (a truncated array file, a missing item) is skipped with one
warning: training resumes from the newest readable one and moves the unreadable newer ones to
``checkpoints/<step>.unreadable`` (kept for inspection, out of the way of the run's next
saves); the readers of a run (``backbone_from_workdir``) skip them and move nothing.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from unitsface_jax import errors
from unitsface_jax import models
from unitsface_jax import orbax_noise
from unitsface_jax.pytrees import path_names
from unitsface_jax.parallel import DEVICE_AXIS


def _save_without_replica_slices() -> None:
  """On CPU, saves each array from one replica instead of splitting it over all replicas.

  orbax's replica-parallel save cuts a replicated array into one slice per replica with
  eager JAX slices, and every new slice shape compiles a small program: on a CPU mesh that
  made the first checkpoint of the 8-device smoke run ~12 s slower than a step. Writing from
  several replicas pays off only where each replica is a host with its own bandwidth (TPU
  pods); orbax itself turns it off on GPUs.
  """
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (the storage refused it or went away). The checkpoints
  saved before it are left as they were, and a rerun resumes from the latest of them."""


def first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# TensorStore ends a failed file write with the operating system's error number.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _write_cause(error: BaseException) -> str:
  """Why a write failed, in a few words: the operating system's error for a local file (e.g.
  "No space left on device [errno 28]", which TensorStore wraps in a message of several
  hundred characters), else the first line of the error."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno is not None:
      return f"{e.strerror or os.strerror(e.errno)} [errno {e.errno}]"
    match = _OS_ERROR_CODE.search(str(e)) if e is not None else None
    if match:
      code = int(match.group(1))
      return f"{os.strerror(code)} [errno {code}]"
  return first_line(error)


class CheckpointMismatchError(errors.UserError, ValueError):
  """A readable checkpoint that belongs to another model or config."""


class UnreadableCheckpointError(errors.UserError, ValueError):
  """No checkpoint of a run can be read."""


def _reason(error: BaseException) -> str:
  """The innermost cause of ``error`` in one line (orbax wraps TensorStore's message, e.g.
  ``OUT_OF_RANGE: Error reading "<array>" ...``, in a long dump of the store's spec)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}"


class Checkpoints:
  """Save/restore policy of a training run (keep the latest K, save every N steps).

  A save that fails, now or in its background commit, raises ``CheckpointWriteError`` naming
  its step: at ``save`` or at the next ``save`` or ``wait`` (each first waits for the save
  in flight, as orbax does before starting another).
  """

  def __init__(self, workdir, *, every_steps: int, keep: int, async_save: bool = True,
               with_data: bool = True, read_only: bool = False):
    # orbax refuses relative paths: a local one is made absolute (gs:// and such are kept).
    workdir = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / "checkpoints"
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._with_data = with_data
    self.every_steps = every_steps
    self._pending = None  # the step of the save in flight
    _save_without_replica_slices()
    item_names = ("state", "data", "config") if with_data else ("state", "config")
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    if with_data:
      handlers["data"] = grain.checkpoint.CheckpointHandler()
    if not read_only and jax.process_index() == 0 and self.directory.exists():
      unfinished = sorted(p.name for p in self.directory.iterdir()
                          if ".orbax-checkpoint-tmp" in p.name)
      if unfinished:
        logging.warning("removing %s in %s: saves that did not finish (the run stopped while "
                        "writing them)", ", ".join(unfinished), self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=item_names,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def set_aside(self, step: int) -> epath.Path:
    """Renames checkpoint ``step`` to ``<step>.unreadable`` (process 0; every process waits
    for it), so the manager no longer sees it; returns the new path."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.unreadable"
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f"{step}.unreadable.{n}"
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"unitsface_jax set aside checkpoint {step}")
    self._manager.reload()
    return target

  def save(self, step: int, state: Any, *, data_iterator=None,
           config: ml_collections.ConfigDict | None = None, force: bool = False) -> bool:
    """Saves every ``every_steps`` steps (or when ``force``); returns whether a save started.

    The policy is ours, not orbax's (which would also save the first step it sees), so a
    resumed run saves at exactly the steps an uninterrupted run saves at. A NamedTuple
    ``state`` (``train.TrainState``) is written as the dict of its fields.
    """
    if hasattr(state, "_asdict"):
      state = state._asdict()
    if not force and step % self.every_steps != 0:
      return False
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state),
             "config": ocp.args.JsonSave(json.loads(config.to_json()) if config else {})}
    if self._with_data:
      if data_iterator is None:
        raise ValueError("this run checkpoints its data iterator: pass data_iterator")
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  # TensorStore, gcsfs, OS errors
      raise self._write_error(step, e) from e
    self._pending = step if started else None
    return started

  def _write_error(self, step: int, error: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(f"saving checkpoint {step} to {self.directory} failed "
                                f"({_write_cause(error)}); the checkpoints before it are kept")

  def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> Any:
    """Restores ``state`` at ``step`` into ``abstract_state``'s shapes, dtypes and shardings
    (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``), and the data iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if self._with_data and data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_arrays(self, step: int) -> Any:
    """The saved ``state`` as plain nested dicts of arrays, without a target (for export)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]

  def saved_tree(self, step: int) -> Any:
    """The saved ``state``'s structure, with orbax's metadata (``shape``, ...) as leaves."""
    return self._manager.item_metadata(step)["state"]

  def saved_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every array of the saved ``state``, keyed by its path (see ``path_names``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(self.saved_tree(step), is_leaf=_is_array)
    return {path_names(p): tuple(v.shape) for p, v in flat}

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    """Blocks until async saves are on disk; raises ``CheckpointWriteError`` if one failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e

  def close(self) -> None:
    self._manager.close()


def _is_array(x) -> bool:
  return hasattr(x, "shape")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of ``tree``'s arrays (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _row_split(sharding: Any) -> bool:
  """Whether an array with this sharding is split by rows over the mesh: the class-sharded
  head state (``head.head_specs``: W, M, seen, class biases) and the optimiser state that
  mirrors it. Only these are padded to a multiple of the device count."""
  spec = getattr(sharding, "spec", None)
  return bool(spec) and spec[0] == DEVICE_AXIS


def restore_state(ckpt: Checkpoints, step: int, state: Any, mesh: jax.sharding.Mesh, *,
                  data_iterator=None) -> Any:
  """Restores the train state saved at ``step`` onto ``mesh``, whatever mesh saved it.

  ``state`` is this run's freshly built state: its shapes, dtypes and shardings are the
  target. The class-sharded arrays hold C padded to a multiple of the device count; when the
  saving run had another count they are read whole and re-padded with zero rows (or their
  padding rows cut) to this run's size. Any other difference in shape, a missing array or
  one this run does not have, is an error naming the array: the checkpoint belongs to another
  model or config. Arrays are matched by path, so containers without arrays (the empty
  loss-state dicts of ``head.HeadParams``/``HeadBuffers``) need not be on disk.
  """
  target = abstract_like(state)
  saved = ckpt.saved_shapes(step)
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  read = {}
  for path, t in flat:
    name = jax.tree_util.keystr(path)
    shape = saved.get(path_names(path))
    if shape is None:
      raise CheckpointMismatchError(f"checkpoint {step} in {ckpt.directory} has no array "
                                    f"{name}: it was written by another model/config")
    if shape != t.shape:
      if not _row_split(t.sharding) or shape[1:] != t.shape[1:]:
        raise CheckpointMismatchError(f"checkpoint {step} in {ckpt.directory}: {name} has "
                                      f"shape {shape}, this run expects {t.shape}")
      t = jax.ShapeDtypeStruct(shape, t.dtype, sharding=replicated)
    read[path_names(path)] = t
  extra = sorted(set(saved) - set(read))
  if extra:
    raise CheckpointMismatchError(
        f"checkpoint {step} in {ckpt.directory} has an array {'/'.join(extra[0])} this run does "
        "not: it was written by another model/config")
  # Read in the saved structure (which may differ from this run's in empty containers),
  # then put each array at its place in this run's.
  on_disk = jax.tree_util.tree_map_with_path(lambda p, _: read[path_names(p)],
                                             ckpt.saved_tree(step), is_leaf=_is_array)
  values = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      ckpt.restore(step, on_disk, data_iterator=data_iterator))[0]}
  restored = jax.tree_util.tree_unflatten(treedef, [values[path_names(p)] for p, _ in flat])

  # A class-sharded array padded for another device count: cut or zero-pad its rows (the
  # padded classes are masked out of every loss).
  def match_padded_rows(x, t):
    if x.shape == t.shape:
      return x
    rows = t.shape[0]
    x = x[:rows] if x.shape[0] >= rows else jnp.pad(
        x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return jax.device_put(x, t.sharding)

  return jax.tree.map(match_padded_rows, restored, target)


def _on_every_process(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (all processes call this together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_latest(ckpt: Checkpoints, state: Any, mesh: jax.sharding.Mesh, *,
                   data_iterator=None) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint every process can read (``restore_state``), or
  (None, ``state``) when there is none.

  An unreadable checkpoint is reported in one warning line and skipped; once an older one has
  been restored, the unreadable newer ones are moved to ``<step>.unreadable`` (the run saves
  those step numbers again). If none can be read, nothing is moved and
  ``UnreadableCheckpointError`` names the directory. A checkpoint of another model or config
  is not skipped: ``CheckpointMismatchError``.
  """
  unreadable = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      with orbax_noise.reading():
        restored, reason = restore_state(ckpt, step, state, mesh, data_iterator=data_iterator), ""
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      restored, reason = None, _reason(e)
    if _on_every_process(restored is not None):
      for bad in unreadable:
        logging.warning("checkpoint %d moved to %s", bad, ckpt.set_aside(bad))
      return step, restored
    logging.warning("checkpoint %d in %s is unreadable (%s); trying an older one", step,
                    ckpt.directory, reason or "on another process")
    unreadable.append(step)
  if unreadable:
    raise UnreadableCheckpointError(
        f"no readable checkpoint in {ckpt.directory} (steps {unreadable} cannot be read; see "
        "the warnings above): repair or remove them, or use another --workdir")
  return None, state


def backbone_from_workdir(workdir, step: int | None = None) -> tuple[str, nnx.Module]:
  """(model name, backbone in eval mode) from a run's checkpoint (default: the newest
  readable one; an unreadable one is skipped with a warning)."""
  ckpt = Checkpoints(workdir, every_steps=1, keep=1, read_only=True)
  try:
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint {ckpt.directory / str(step)} (the run has "
                                f"steps {sorted(steps)})")
      steps = [step]
    for candidate in steps:
      try:
        with orbax_noise.reading():
          config = ml_collections.ConfigDict(ckpt.restore_config(candidate))
          model = models.abstract_from_config(config.model)
          saved = ckpt.restore_arrays(candidate)
        step = candidate
        break
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %d in %s is unreadable (%s)", candidate, ckpt.directory,
                        _reason(e))
    else:
      raise UnreadableCheckpointError(
          f"no readable checkpoint in {ckpt.directory} (steps {steps} cannot be read)")
  finally:
    ckpt.close()
  flat = {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for prefix, selector in ((("params", "backbone"), nnx.Param),
                           (("model_state",), models.MODEL_STATE)):
    for path, var in nnx.to_flat_state(nnx.state(model, selector)):
      key = prefix + tuple(str(p) for p in path) + ("value",)
      if key not in flat:
        raise ValueError(f"checkpoint {step} in {workdir} has no {'/'.join(key)}")
      if np.shape(flat[key]) != var.shape:
        raise ValueError(f"checkpoint {step} in {workdir}: {'/'.join(key)} has shape "
                         f"{np.shape(flat[key])}, its config's model {var.shape}")
      var.set_value(jnp.asarray(flat[key], var.dtype))
  left = models.unfilled(model)
  if left:
    raise ValueError(f"checkpoint {step} in {workdir} does not set {left[:8]}")
  model.eval()
  return config.model.name, model
