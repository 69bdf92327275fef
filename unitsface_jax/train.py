"""``train_and_evaluate(config, workdir)``: the whole training run, top to bottom.

Sections, in the order a batch meets them (big_vision style): mesh; input pipeline; model,
head and optimiser created already sharded; the pure train step; checkpoint restore; the
loop with logging, evaluation, checkpoints, the NaN guard and preemption.

Decisions (docs/design.md, "Decisions"):
- The backbone is data-parallel (batch split over the one mesh axis, parameters replicated);
  the head's W, M and seen are class-sharded (``unitsface_jax.head``).
- BatchNorm statistics: ``config.model.bn_stats = "global"`` (default) normalises with the
  statistics of the whole global batch (XLA inserts the all-reduce), so results do not depend
  on the device count and a run resumes on any count; ``"per_device"`` uses each device's own
  slice, as PyTorch DDP without SyncBN does (cheaper on many devices).
- Everything random is a function of (seed, step): dropout and PartialFC keys are
  ``fold_in(key, step)``, the data order is a function of (seed, epoch), so a resumed run
  repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import collections
import logging as py_logging
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx

from unitsface_jax import checkpoint as checkpoint_lib
from unitsface_jax import finetune
from unitsface_jax import head as head_lib
from unitsface_jax import losses, metric_writer, models, optim, parallel
from unitsface_jax.data import pipeline as pipeline_lib
from unitsface_jax.data import pixels
from unitsface_jax.data import sources as sources_lib


def _quiet_orbax() -> None:
  """orbax logs every save step at INFO; keep its warnings, drop the rest of its chatter."""
  logger = logging.get_absl_logger()
  if not any(getattr(f, "_unitsface", False) for f in logger.filters):
    def keep(record):
      return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname
    keep._unitsface = True  # pylint: disable=protected-access
    logger.addFilter(keep)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


def make_source(config: ml_collections.ConfigDict):
  """The training source named by ``config.data``, cut to its first
  ``config.data.max_examples`` examples when that is set."""
  if config.data.source == "synthetic":
    source = sources_lib.make_source("synthetic", num_examples=config.data.num_images,
                                     num_classes=config.data.num_classes)
  else:
    source = sources_lib.make_source(config.data.source, config.data.path)
  if config.data.max_examples:
    source = sources_lib.Subset(source, min(config.data.max_examples, len(source)))
  return source


def make_data_iterator(config: ml_collections.ConfigDict,
                       source) -> pipeline_lib.PipelineIterator:
  """This process's share of every global batch, as the training loop reads it: uint8 images
  and the flip coins, mirrored and normalised in the train step (``config.data`` sets the
  workers, read threads, bad-record policy and the shuffle: records or chunks)."""
  return pipeline_lib.PipelineIterator(
      source, pipeline_lib.PipelineConfig(
          batch_size=config.batch_size // jax.process_count(), seed=config.seed,
          worker_count=config.data.num_workers, read_threads=config.data.read_threads,
          skip_bad_records=config.data.skip_bad_records, normalize=False, defer_flip=True,
          chunk_records=config.data.chunk_records if config.data.shuffle == "chunks" else 0,
          shuffle_window=config.data.shuffle_window),
      process_index=jax.process_index(), process_count=jax.process_count())


def head_config(config: ml_collections.ConfigDict) -> head_lib.HeadConfig:
  return head_lib.HeadConfig(
      num_classes=config.data.num_classes, embedding_dim=config.model.num_features,
      s2c_loss=config.loss.s2c, s2c_scale=config.loss.s2c_scale,
      s2c_margin=config.loss.s2c_margin, s2s_loss=config.loss.s2s,
      s2s_scale=config.loss.s2s_scale, s2s_margin=config.loss.s2s_margin,
      sample_rate=config.loss.sample_rate, storage_dtype=config.loss.head_dtype,
      **{name: config.loss[name] for name in head_lib.S2C_OPTIONS})


def init_state(config, mesh, tx, key):
  """The train state, every array created directly with its sharding.

  Returns (graphdef, rng_state, state): ``rng_state`` is the model's dropout stream (reseeded
  from (seed, step) in every step, so it is not checkpointed); ``state`` = {"params":
  {"backbone", "head"}, "model_state", "head_buffers", "opt_state", "step",
  "first_nonfinite_step"}, all of it checkpointed.
  """
  replicated = parallel.replicated(mesh)
  model_key, head_key = jax.random.split(key)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.from_config(config.model, model_key)))

  def init_backbone(k):
    _, params, model_state, rng_state = nnx.split(models.from_config(config.model, k),
                                                  nnx.Param, models.MODEL_STATE, ...)
    return params, model_state, rng_state

  params, model_state, rng_state = jax.jit(init_backbone, out_shardings=replicated)(model_key)
  head_state = head_lib.init_head_state(head_key, head_config(config), mesh)
  all_params = {"backbone": params, "head": head_state.params}
  opt_shardings = _mirror_shardings(jax.eval_shape(tx.init, all_params), all_params,
                                    replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(all_params)
  state = {"params": all_params, "model_state": model_state,
           "head_buffers": head_state.buffers, "opt_state": opt_state,
           "step": jax.device_put(jnp.int32(0), replicated),
           "first_nonfinite_step": jax.device_put(jnp.int32(-1), replicated)}
  return graphdef, rng_state, state


def _mirror_shardings(opt_shapes, params, replicated):
  """The optimiser state takes the shardings of the parameters it mirrors (SGD's momentum,
  Adam's mu and nu, accumulated gradients of W are class-sharded like W); its counters are
  replicated. A state leaf mirrors a parameter when its path ends with the parameter's path
  and it has its shape, which also finds the parameters in optax.multi_transform's per-part
  states (optax.tree_map_params does not)."""
  by_path = {checkpoint_lib.path_names(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def sharding(path, leaf):
    names = checkpoint_lib.path_names(path)
    for n in range(len(names), 0, -1):
      param = by_path.get(names[-n:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(sharding, opt_shapes)


def data_fingerprint(images: jax.Array, labels: jax.Array) -> jax.Array:
  """Which examples, in which order, mirrored or not: an int32 digest of a batch in [0, 999983).

  Per example, a position-weighted sum of the uint8 pixels (weights 1..251 repeating over the
  flattened image, so mirroring or shifting an image changes it) mixed with the label; the
  examples weighted by their place in the batch. Integer arithmetic wraps modulo 2^32, so the
  sums are exact in any order and the digest is the same on any device count. Equal
  fingerprints at a step say (up to collisions) that two runs trained on the same batch there.
  """
  flat = images.reshape(images.shape[0], -1).astype(jnp.uint32)
  weights = jnp.arange(flat.shape[1], dtype=jnp.uint32) % 251 + 1
  pixel_sums = jnp.sum(flat * weights, axis=1, dtype=jnp.uint32)
  examples = pixel_sums * jnp.uint32(1_000_003) + labels.astype(jnp.uint32)
  order = jnp.arange(1, labels.shape[0] + 1, dtype=jnp.uint32)
  return (jnp.sum(examples * order, dtype=jnp.uint32) % jnp.uint32(999_983)).astype(jnp.int32)


def make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch: int, *,
                    head_only: bool = False):
  """The pure, jitted update: backbone fwd/bwd, sharded head, objective, optimiser, PReLU
  clamp.

  ``head_only`` (the first ``config.init.head_only_steps`` of a fine-tuning run): the
  backbone is frozen: it runs in inference mode (running BatchNorm statistics, which it does
  not update; no dropout), no gradient is computed through it, and its parameters and its
  part of the optimiser state stay as they are (``optim.keep_frozen``).
  """
  hc = head_config(config)
  seed_key = jax.random.key(config.seed)
  dropout_root, sample_root = jax.random.split(seed_key)
  accum = config.optimizer.grad_accum_steps
  lr_schedule = optim.update_schedule(config, steps_per_epoch)
  groups = mesh.size if config.model.bn_stats == "per_device" else 0
  uses_s2s = config.loss.s2s != "none"

  def train_step(state, images, labels, flips=None):
    # The pipeline ships uint8 (4x less host traffic) and, with defer_flip, the coin flips
    # it did not apply; mirroring and (x / 255 - 0.5) / 0.5 happen here, on the device.
    if flips is not None:
      images = pixels.mirror_where(images, flips)
    fingerprint = data_fingerprint(images, labels)
    images = pixels.normalize(images)
    step = state["step"]
    epoch = step // steps_per_epoch
    # Whether the sample-to-sample term is in this step's loss (and b may initialise).
    s2s_active = jnp.logical_and(uses_s2s, epoch >= config.loss.uss_start_epoch)

    def loss_fn(trained):
      params = {"backbone": state["params"]["backbone"], "head": trained} if head_only else (
          trained)
      model = nnx.merge(graphdef, params["backbone"], state["model_state"], rng_state,
                        copy=True)
      if head_only:
        model.eval()
      else:
        if groups:
          _set_bn_groups(model, groups)
        # Dropout, and a ViT's drop path and token masking, draw from this stream.
        nnx.reseed(model, dropout=jax.random.fold_in(dropout_root, step))
      embeddings = model(images)
      head_state = head_lib.HeadState(params["head"], state["head_buffers"])
      terms, new_head = head_lib.head_loss(
          head_state, embeddings, labels, config=hc, mesh=mesh,
          key=jax.random.fold_in(sample_root, step), s2s_active=s2s_active)
      loss = losses.unitsface_objective(
          terms["s2c"], terms["s2s"], s2s_active, s2c_weight=config.loss.w_s2c,
          s2s_weight=config.loss.w_s2s)
      return loss, (terms, new_head, nnx.state(model, models.MODEL_STATE))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if head_only:
      (loss, (terms, new_head, model_state)), head_grads = grad_fn(state["params"]["head"])
      grads = {"backbone": jax.tree.map(jnp.zeros_like, state["params"]["backbone"]),
               "head": head_grads}
    else:
      (loss, (terms, new_head, model_state)), grads = grad_fn(state["params"])
    # b takes its data-dependent first value inside the head; this step's update applies to
    # that value (as the official code, which initialises b in the forward pass).
    params = {"backbone": state["params"]["backbone"], "head": new_head.params}
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    params = {"backbone": optim.clamp_prelu(params["backbone"]), "head": params["head"]}
    if head_only:
      params = optim.keep_frozen(params, state["params"])
      opt_state = optim.keep_frozen(opt_state, state["opt_state"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    first_bad = jnp.where((state["first_nonfinite_step"] < 0) & ~finite, step,
                          state["first_nonfinite_step"])
    new_state = {"params": params, "model_state": model_state,
                 "head_buffers": new_head.buffers, "opt_state": opt_state, "step": step + 1,
                 "first_nonfinite_step": first_bad}
    metrics = {"loss": loss, "s2c": jnp.mean(terms["s2c"]),
               "s2s": jnp.where(s2s_active, jnp.mean(terms["s2s"]), 0.0),
               "grad_norm": grad_norm, "lr": lr_schedule(step // accum),
               "threshold_t": params["head"].bias / config.loss.s2s_scale,
               "memory_filled": jnp.mean(new_head.buffers.seen[:config.data.num_classes]
                                         .astype(jnp.float32)),
               # Lets a resumed or rescaled run be checked against another.
               "data_fingerprint": fingerprint}
    # AdaFace's norm statistics, CurricularFace's t (none for the other losses).
    metrics.update({f"s2c_{k}": v for k, v in new_head.buffers.s2c_stats.items()})
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,))


def _set_bn_groups(model: nnx.Module, groups: int) -> None:
  for _, module in nnx.iter_modules(model):
    if isinstance(module, models.BatchNorm):
      module.num_groups = groups


# How many steps the host may dispatch before the device has finished them: the loop waits
# for step N-1 once it has dispatched step N, so the device always has the next step queued
# while the host reads the following batch, and a save or a stop waits for at most two steps.
MAX_STEPS_IN_FLIGHT = 2


class StepQueue:
  """Bounds JAX's asynchronous dispatch: ``push`` takes an output of the step just dispatched
  and returns once fewer than ``MAX_STEPS_IN_FLIGHT`` pushed steps may still be running.

  Without it the host runs as far ahead of the device as nothing forces a sync (~30 steps of
  an iresnet100 on a CPU between two log steps), each queued step holding its batch, and a
  preemption save waits for all of them.
  """

  def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT):
    self.limit = limit
    self.pending = collections.deque()

  def push(self, output: jax.Array) -> None:
    self.pending.append(output)
    while len(self.pending) >= self.limit:
      jax.block_until_ready(self.pending.popleft())


# The coordination service's key under which the processes agree on the step to stop at.
_STOP_KEY = "unitsface_jax/preemption_stop_step"


class _Preemption:
  """SIGTERM (TPU preemption, SLURM time limit) -> save at a step boundary, exit 0.

  One process stops at the step where it sees the signal. Several processes must stop at the
  same step (the save is collective): the first to see a signal at step d proposes d +
  MAX_STEPS_IN_FLIGHT in jax.distributed's key-value store (first writer wins), and every
  process reads the key at each step (one small RPC to the coordinator, no device sync).
  Why every process is still at or before that step when it reads it: a process checks at
  step n only after step n-1 finished on its devices, which needs every process to have
  dispatched step n-1 (the step's collectives span all of them); so a process at step d+2
  checks after the proposer dispatched d+1, hence after it wrote the key at d.
  """

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None
    self._stop_at = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

  def reached(self, step: int) -> bool:
    """Whether to stop after ``step``; called after every step, once step - 1 has finished."""
    if jax.process_count() == 1:
      return self.requested.is_set()
    if self._stop_at is None:
      client = parallel.coordination_client()
      value = parallel.key_value_try_get(client, _STOP_KEY)
      if value is None and self.requested.is_set():
        value = parallel.key_value_set_once(client, _STOP_KEY,
                                            str(step + MAX_STEPS_IN_FLIGHT))
      if value is not None:
        self._stop_at = int(value)
        logging.info("preemption: every process stops after step %d", self._stop_at)
    return self._stop_at is not None and step >= self._stop_at

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _eval_sets(config):
  from unitsface_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  return verification.load_sets(list(config.eval.bins)) if config.eval.bins else []


def evaluate(config, graphdef, rng_state, state, sets) -> dict[str, float]:
  """Flip-fused verification accuracy of the current backbone on each set."""
  from unitsface_jax.evaluation import extract, verification  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, state["params"]["backbone"], state["model_state"], rng_state,
                    copy=True)
  model.eval()
  results = verification.evaluate_sets(extract.nnx_apply_fn(model), sets,
                                       batch_size=config.eval.batch_size)
  return {f"eval/{name}/accuracy": r["accuracy"] for name, r in results.items()}


def use_compilation_cache(config: ml_collections.ConfigDict, workdir) -> str | None:
  """Keeps compiled programs in ``WORKDIR/jax_cache`` (``config.compilation_cache``).

  A resumed run (after preemption, or on the same devices after a crash) then loads the train
  step instead of compiling it again, which takes minutes for an iresnet100 on a large mesh.
  A cache directory already set (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept.
  Must run before the first compilation; returns the directory in use, or None.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not config.get("compilation_cache", True):
    return current or None
  path = str(epath.Path(workdir) / "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's latest checkpoint) and returns the last metrics."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _quiet_orbax()
  use_compilation_cache(config, workdir)

  # ---------------------------------------------------------------- mesh
  mesh = parallel.mesh_from_config(config)
  parallel.warm_up_cpu_collectives(mesh)  # before any small reduce-scatter: see there
  n_dev, n_proc = mesh.size, jax.process_count()
  if config.batch_size % n_dev or config.batch_size % n_proc:
    raise ValueError(f"config.batch_size = {config.batch_size} must divide evenly over "
                     f"{n_dev} devices and {n_proc} processes")

  # ---------------------------------------------------------------- input pipeline
  source = make_source(config)
  if source.num_classes != config.data.num_classes:
    raise ValueError(f"config.data.num_classes = {config.data.num_classes} but the source "
                     f"has {source.num_classes} classes")
  steps_per_epoch = pipeline_lib.steps_per_epoch(len(source), config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  data = make_data_iterator(config, source)

  # ---------------------------------------------------------------- model, head, optimiser
  tx = optim.make(config, steps_per_epoch)
  graphdef, rng_state, state = init_state(config, mesh, tx, jax.random.key(config.seed))
  train_step = make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch)
  head_only_steps = config.init.head_only_steps
  head_step = make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch,
                              head_only=True) if head_only_steps else None

  # ---------------------------------------------------------------- checkpoint restore
  ckpt = checkpoint_lib.Checkpoints(workdir, every_steps=config.checkpoint_every_steps,
                                    keep=config.keep_checkpoints)
  latest, state = checkpoint_lib.restore_latest(ckpt, state, mesh, data_iterator=data)
  if latest is not None:
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  elif config.init.backbone:
    # Fine-tuning: the backbone's weights and BatchNorm statistics before step 0 (a resumed
    # run took them from its own checkpoint above); the head stays as initialised.
    backbone, model_state = finetune.backbone_arrays(
        config.init.backbone, config.model, jax.random.key(config.seed))
    replicated = parallel.replicated(mesh)
    state["params"]["backbone"] = jax.device_put(backbone, replicated)
    state["model_state"] = jax.device_put(model_state, replicated)
    logging.info("backbone initialised from %s", config.init.backbone)
  start_step = int(state["step"])
  if start_step != (latest or 0):
    raise RuntimeError(f"checkpoint {latest} holds step {start_step}")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------- loop
  writer = metric_writer.MetricWriter(workdir)
  eval_sets = _eval_sets(config) if config.eval.every_steps > 0 else []
  preemption = _Preemption()
  last, at_start = {}, {}
  if eval_sets and config.eval.before_training and start_step == 0:
    at_start = evaluate(config, graphdef, rng_state, state, eval_sets)
    logging.info("step 0 (initial weights) %s", at_start)
    writer.write(0, at_start)
  t0, t_steps = None, 0
  in_flight = StepQueue()
  try:
    for step in range(start_step, total_steps):
      batch = next(data)
      images, labels, flips = parallel.global_batch(
          (batch["image"], batch["label"], batch["flip"]), mesh)
      step_fn = head_step if step < head_only_steps else train_step
      state, metrics = step_fn(state, images, labels, flips)
      in_flight.push(metrics["loss"])
      if t0 is None:  # throughput and ETA from the end of the first (compiling) step
        jax.block_until_ready(metrics["loss"])
        t0 = time.time()
      else:
        t_steps += 1
      done = step + 1
      log_now = done % config.log_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
      epoch_end = done % steps_per_epoch == 0
      if log_now or save_now or epoch_end:
        _check_finite(state, done)
      if log_now:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - t0 if t0 else 0.0
        m["samples_per_s"] = t_steps * config.batch_size / max(elapsed, 1e-9)
        m["epoch"] = step / steps_per_epoch
        eta = (total_steps - done) * elapsed / max(t_steps, 1)
        logging.info("step %d/%d epoch %.2f loss %.4f (s2c %.4f s2s %.4f) lr %.4g t %.4f "
                     "%.1f img/s ETA %.0fs", done, total_steps, m["epoch"], m["loss"],
                     m["s2c"], m["s2s"], m["lr"], m["threshold_t"], m["samples_per_s"], eta)
        writer.write(done, m)
        last = m
      if eval_sets and (done % config.eval.every_steps == 0 or done == total_steps):
        results = evaluate(config, graphdef, rng_state, state, eval_sets)
        logging.info("step %d %s", done, results)
        writer.write(done, results)
        last.update(results)
      if save_now or epoch_end:
        ckpt.save(done, state, data_iterator=data, config=config, force=epoch_end)
      if done == config.debug.signal_after_step:
        # The drill (configs/default.py, "debug"): a preemption or crash at a known step. The
        # saves finish first, so what the signal finds on disk is the same on any machine;
        # raise_signal runs the Python handler (``_Preemption``'s) before it returns.
        ckpt.wait()
        signal.raise_signal(getattr(signal, config.debug.signal))
      if preemption.reached(done):
        logging.warning("preemption requested: saving step %d and stopping", done)
        _check_finite(state, done)
        ckpt.save(done, state, data_iterator=data, config=config, force=True)
        break
  except BaseException:
    # Stopping on an error (a failed write, NaN, a signal): what can still be finished is,
    # and a second failure while at it (the storage that failed fails again) is logged, not
    # raised over the first.
    for close in (ckpt.wait, ckpt.close, writer.close, data.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("while stopping: %s", checkpoint_lib.first_line(e))
    raise
  else:
    ckpt.wait()
    ckpt.close()
    writer.close()
    data.close()
  finally:
    preemption.restore()
  for name, value in at_start.items():
    if name in last:
      logging.info("%s: %.4f with the initial weights, %.4f after training", name, value,
                   last[name])
  return last


def _check_finite(state, step: int) -> None:
  bad = int(state["first_nonfinite_step"])
  if bad >= 0:
    raise NonFiniteLossError(
        f"the loss or gradient norm became NaN/inf at step {bad + 1} (checked at step {step}); "
        "stopping without saving, the last good checkpoint is kept")
