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

import dataclasses
import functools
import math
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx

from unitsface_jax import checkpoint as checkpoint_lib
from unitsface_jax import errors
from unitsface_jax import finetune
from unitsface_jax import lease as lease_lib
from unitsface_jax import head as head_lib
from unitsface_jax import losses, metric_writer, models, optim, parallel, pytrees, run_control
from unitsface_jax.data import pipeline as pipeline_lib
from unitsface_jax.data import pixels
from unitsface_jax.data import sources as sources_lib


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
  """The head's static description (``head.HeadConfig``) from ``config.loss`` and the sizes."""
  return head_lib.HeadConfig(
      num_classes=config.data.num_classes, embedding_dim=config.model.num_features,
      s2c_loss=config.loss.s2c, s2c_scale=config.loss.s2c_scale,
      s2c_margin=config.loss.s2c_margin, s2s_loss=config.loss.s2s,
      s2s_scale=config.loss.s2s_scale, s2s_margin=config.loss.s2s_margin,
      sample_rate=config.loss.sample_rate, storage_dtype=config.loss.head_dtype,
      **{name: config.loss[name] for name in losses.registry.option_defaults()
         if name in config.loss})


# ==================================================================== state
class TrainState(NamedTuple):
  """Everything a run checkpoints (a pytree; orbax writes it as a dict of these fields).

  Attributes:
    params: {"backbone": the backbone's nnx.Param state, "head": ``head.HeadParams``}.
    model_state: the backbone's BatchNorm statistics and frozen scales.
    head_buffers: ``head.HeadBuffers`` (memory bank, seen mask, b's flag, loss statistics).
    opt_state: the optax state of ``optim.make`` over ``params``.
    step: [] int32, train steps done (micro-batches with gradient accumulation).
    first_nonfinite_step: [] int32, the first step whose loss or gradient norm was NaN/inf,
      -1 while none was.
  """
  params: dict
  model_state: Any
  head_buffers: head_lib.HeadBuffers
  opt_state: Any
  step: jax.Array
  first_nonfinite_step: jax.Array


class Batch(NamedTuple):
  """One global batch as the step reads it: uint8 images [B, H, W, 3], int labels [B] and
  the flip coins [B] the pipeline drew but did not apply (None: nothing to mirror)."""
  images: jax.Array
  labels: jax.Array
  flips: jax.Array | None = None


def _create_state(key: jax.Array, *, config, tx, num_shards: int):
  """The train state before sharding: (the backbone's graph, its dropout stream, the state).
  Traced under ``jax.jit`` (``init_state``) or ``jax.eval_shape`` (``abstract_state``)."""
  model_key, head_key = jax.random.split(key)
  model = models.from_config(config.model, model_key)
  graphdef, params, model_state, rng_state = nnx.split(model, nnx.Param, models.MODEL_STATE,
                                                       ...)
  head_state = head_lib.initial_head_state(head_key, head_config(config), num_shards)
  all_params = {"backbone": params, "head": head_state.params}
  return graphdef, rng_state, TrainState(
      params=all_params, model_state=model_state, head_buffers=head_state.buffers,
      opt_state=tx.init(all_params), step=jnp.int32(0), first_nonfinite_step=jnp.int32(-1))


def _state_layout(config, mesh, tx):
  """(graphdef, the state's shapes, its shardings, the function that creates it on ``mesh``).

  One description of the state for both a real run and the TPU plan (``plan.py``): the
  backbone and its optimiser state are replicated, the head is class-sharded
  (``head.head_shardings``), and each optimiser-state leaf that mirrors a parameter takes
  that parameter's sharding (``_mirror_shardings``).
  """
  create = functools.partial(_create_state, config=config, tx=tx,
                             num_shards=mesh.shape[parallel.DEVICE_AXIS])
  graphdef, rng_shapes, shapes = jax.eval_shape(create, jax.random.key(0))
  replicated = parallel.replicated(mesh)
  param_shardings = {"backbone": jax.tree.map(lambda _: replicated, shapes.params["backbone"]),
                     "head": head_lib.head_shardings(mesh, head_config(config)).params}
  shardings = TrainState(
      params=param_shardings,
      model_state=jax.tree.map(lambda _: replicated, shapes.model_state),
      head_buffers=head_lib.head_shardings(mesh, head_config(config)).buffers,
      opt_state=_mirror_shardings(shapes.opt_state, shapes.params, param_shardings,
                                  replicated),
      step=replicated, first_nonfinite_step=replicated)
  return graphdef, rng_shapes, shapes, shardings, create


def init_state(config, mesh, tx, key):
  """The train state, every array created directly with its sharding.

  Returns (graphdef, rng_state, state): ``rng_state`` is the model's dropout stream (reseeded
  from (seed, step) in every step, so it is not checkpointed); ``state`` a ``TrainState``, all
  of it checkpointed.
  """
  graphdef, _, _, shardings, create = _state_layout(config, mesh, tx)
  initialise = jax.jit(lambda k: create(k)[1:],
                       out_shardings=(parallel.replicated(mesh), shardings))
  rng_state, state = initialise.lower(key).compile(
      compiler_options=_INIT_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform, {}))(key)
  return graphdef, rng_state, state


# The initialiser runs once, and on the CPU XLA spends most of its compile time optimising the
# unrolled Threefry rounds of every parameter's random draw: LLVM's -O1 compiles the smoke
# recipe's initialiser about 3x faster (9.6 -> 3.5 s) and an iresnet50's 8.6 -> 5.6 s, with
# the same running time and bitwise the same parameters (tests/test_train.py).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def abstract_state(config, mesh, tx):
  """``init_state`` without allocating anything: (graphdef, the dropout stream's shapes, the
  state as ``jax.ShapeDtypeStruct``s carrying the shardings ``init_state`` gives its arrays).
  ``mesh`` may hold compile-only devices (``jax.experimental.topologies``)."""
  graphdef, rng_shapes, shapes, shardings, _ = _state_layout(config, mesh, tx)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       shapes, shardings)
  return graphdef, rng_shapes, state


def _mirror_shardings(opt_shapes, params, param_shardings, replicated):
  """The optimiser state takes the shardings of the parameters it mirrors (SGD's momentum,
  Adam's mu and nu, accumulated gradients of W are class-sharded like W); its counters are
  replicated. A state leaf mirrors a parameter when its path ends with the parameter's path
  and it has its shape, which also finds the parameters in optax.multi_transform's per-part
  states (optax.tree_map_params does not)."""
  by_path = {}
  for (path, param), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                     jax.tree.leaves(param_shardings)):
    by_path[pytrees.path_names(path)] = (param.shape, sharding)

  def sharding(names, leaf):
    for n in range(len(names), 0, -1):
      shape, param_sharding = by_path.get(names[-n:], (None, None))
      if shape == leaf.shape:
        return param_sharding
    return replicated

  return pytrees.map_with_names(sharding, opt_shapes)


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


# ==================================================================== the step
@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a train step is compiled for; bound to it with ``functools.partial`` (never traced).

  Attributes:
    config: the run's config.
    mesh: the mesh the step runs on.
    graphdef: the backbone's graph (``nnx.split``).
    rng_shapes: shapes of the backbone's dropout stream, rebuilt from (seed, step) in every
      step.
    tx: the optimiser.
    steps_per_epoch: train steps per epoch (the schedule and the USS start epoch count them).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any
  rng_shapes: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int

  @property
  def head(self) -> head_lib.HeadConfig:
    return head_config(self.config)


def _step_inputs(context: StepContext, state: TrainState, batch: Batch):
  """(normalised images, labels, data fingerprint, whether the s2s term is active).

  The pipeline ships uint8 (4x less host traffic) and, with defer_flip, the coin flips it did
  not apply; mirroring and (x / 255 - 0.5) / 0.5 happen here, on the device.
  """
  images = batch.images
  if batch.flips is not None:
    images = pixels.mirror_where(images, batch.flips)
  fingerprint = data_fingerprint(images, batch.labels)
  epoch = state.step // context.steps_per_epoch
  s2s_active = jnp.logical_and(context.config.loss.s2s != "none",
                               epoch >= context.config.loss.uss_start_epoch)
  return pixels.normalize(images), batch.labels, fingerprint, s2s_active


def _objective(params, context: StepContext, state: TrainState, images, labels, s2s_active,
               *, train_backbone: bool):
  """The loss of one batch as a function of ``params`` (what ``jax.grad`` differentiates),
  with (loss terms, head state after the step, BatchNorm statistics after it)."""
  config, step = context.config, state.step
  dropout_root, sample_root = jax.random.split(jax.random.key(config.seed))
  model = nnx.merge(context.graphdef, params["backbone"], state.model_state,
                    _dropout_stream(context.rng_shapes, dropout_root, step), copy=True)
  if train_backbone:
    if config.model.bn_stats == "per_device":
      _set_bn_groups(model, context.mesh.size)
    # Dropout, and a ViT's drop path and token masking, draw from this stream.
    nnx.reseed(model, dropout=jax.random.fold_in(dropout_root, step))
  else:
    model.eval()
  embeddings = model(images)
  terms, new_head = head_lib.head_loss(
      head_lib.HeadState(params["head"], state.head_buffers), embeddings, labels,
      config=context.head, mesh=context.mesh, key=jax.random.fold_in(sample_root, step),
      s2s_active=s2s_active)
  loss = losses.unitsface_objective(terms["s2c"], terms["s2s"], s2s_active,
                                    s2c_weight=config.loss.w_s2c, s2s_weight=config.loss.w_s2s)
  return loss, (terms, new_head, nnx.state(model, models.MODEL_STATE))


def _dropout_stream(rng_shapes, root: jax.Array, step: jax.Array):
  """The backbone's dropout stream at ``step``: key fold_in(root, step), count 0 (what
  ``nnx.reseed`` sets), so the stream is a function of (seed, step) and is not checkpointed."""
  key = jax.random.fold_in(root, step)
  return jax.tree.map(
      lambda x: key if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jnp.zeros(x.shape, x.dtype), rng_shapes)


def _apply_gradients(context: StepContext, state: TrainState, loss, aux, grads, fingerprint,
                     s2s_active):
  """The optimiser update, PReLU clamp and NaN guard; (new state, metrics)."""
  config = context.config
  terms, new_head, model_state = aux
  # b takes its data-dependent first value inside the head; this step's update applies to
  # that value (as the official code, which initialises b in the forward pass).
  params = {"backbone": state.params["backbone"], "head": new_head.params}
  updates, opt_state = context.tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  params = {"backbone": optim.clamp_prelu(params["backbone"]), "head": params["head"]}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                        state.first_nonfinite_step)
  new_state = TrainState(params=params, model_state=model_state,
                         head_buffers=new_head.buffers, opt_state=opt_state,
                         step=state.step + 1, first_nonfinite_step=first_bad)
  lr_schedule = optim.update_schedule(config, context.steps_per_epoch)
  metrics = {"loss": loss, "s2c": jnp.mean(terms["s2c"]),
             "s2s": jnp.where(s2s_active, jnp.mean(terms["s2s"]), 0.0),
             "grad_norm": grad_norm,
             "lr": lr_schedule(state.step // config.optimizer.grad_accum_steps),
             "threshold_t": params["head"].bias / config.loss.s2s_scale,
             "memory_filled": jnp.mean(new_head.buffers.seen[:config.data.num_classes]
                                       .astype(jnp.float32)),
             # Lets a resumed or rescaled run be checked against another.
             "data_fingerprint": fingerprint}
  # AdaFace's norm statistics, CurricularFace's t (none for the other losses).
  metrics.update({f"s2c_{k}": v for k, v in new_head.buffers.s2c_stats.items()})
  return new_state, metrics


def train_step(context: StepContext, state: TrainState, batch: Batch):
  """One update: backbone fwd/bwd, the sharded head, the objective, the optimiser, the PReLU
  clamp and the NaN guard. Pure; ``make_train_step`` jits it with ``context`` bound."""
  images, labels, fingerprint, s2s_active = _step_inputs(context, state, batch)
  (loss, aux), grads = jax.value_and_grad(_objective, has_aux=True)(
      state.params, context, state, images, labels, s2s_active, train_backbone=True)
  return _apply_gradients(context, state, loss, aux, grads, fingerprint, s2s_active)


def head_only_step(context: StepContext, state: TrainState, batch: Batch):
  """``train_step`` with the backbone frozen (the first ``config.init.head_only_steps`` of a
  fine-tuning run): the backbone runs in inference mode (running BatchNorm statistics, which
  it does not update; no dropout) outside the differentiated function, and its parameters and
  its part of the optimiser state stay as they are (``optim.keep_frozen``)."""
  images, labels, fingerprint, s2s_active = _step_inputs(context, state, batch)
  backbone = state.params["backbone"]

  def head_objective(head_params):
    return _objective({"backbone": backbone, "head": head_params}, context, state, images,
                      labels, s2s_active, train_backbone=False)

  (loss, aux), head_grads = jax.value_and_grad(head_objective, has_aux=True)(
      state.params["head"])
  grads = {"backbone": jax.tree.map(jnp.zeros_like, backbone), "head": head_grads}
  new_state, metrics = _apply_gradients(context, state, loss, aux, grads, fingerprint,
                                        s2s_active)
  return new_state._replace(
      params=optim.keep_frozen(new_state.params, state.params),
      opt_state=optim.keep_frozen(new_state.opt_state, state.opt_state)), metrics


def make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch: int, *,
                    head_only: bool = False):
  """``train_step`` (or ``head_only_step``) jitted for this run, the state donated:
  ``step(state, batch) -> (state, metrics)``."""
  rng_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rng_state)
  context = StepContext(config=config, mesh=mesh, graphdef=graphdef, rng_shapes=rng_shapes,
                        tx=tx, steps_per_epoch=steps_per_epoch)
  step_fn = head_only_step if head_only else train_step
  return jax.jit(functools.partial(step_fn, context), donate_argnums=(0,))


def _set_bn_groups(model: nnx.Module, groups: int) -> None:
  for _, module in nnx.iter_modules(model):
    if isinstance(module, models.BatchNorm):
      module.num_groups = groups


# ==================================================================== evaluation
def _eval_sets(config):
  from unitsface_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  return verification.load_sets(list(config.eval.bins)) if config.eval.bins else []


def evaluate(config, graphdef, rng_state, state: TrainState, sets) -> dict[str, float]:
  """Flip-fused verification accuracy of the current backbone on each set."""
  from unitsface_jax.evaluation import extract, verification  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, state.params["backbone"], state.model_state, rng_state,
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


# ==================================================================== setup
@dataclasses.dataclass
class Run:
  """What ``setup`` builds and ``loop`` runs: the state (restored or fresh), the two jitted
  steps, the data, the checkpoints and the schedule of the run."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  graphdef: Any
  rng_state: Any
  state: TrainState
  train_step: Any
  head_step: Any
  data: pipeline_lib.PipelineIterator
  ckpt: checkpoint_lib.Checkpoints
  steps_per_epoch: int
  total_steps: int
  start_step: int
  lease: lease_lib.Lease | None = None  # checked before each save


def check_batch_layout(batch_size: int, num_devices: int, num_processes: int) -> None:
  """The global batch must split evenly over the devices and the processes."""
  if batch_size % num_devices or batch_size % num_processes:
    raise errors.ConfigError(f"config.batch_size = {batch_size} must divide evenly over "
                     f"{num_devices} devices and {num_processes} processes")


def _check_same_classes(config: ml_collections.ConfigDict, ckpt, step: int) -> None:
  """A run resumes only with the class count it was saved with: W and M are restored onto any
  device count by cutting or zero-padding their padded rows, which would otherwise turn a
  changed ``data.num_classes`` into untrained (or dropped) classes without a word."""
  saved = ckpt.restore_config(step).get("data", {}).get("num_classes")
  if saved is not None and saved != config.data.num_classes:
    raise checkpoint_lib.CheckpointMismatchError(
        f"config.data.num_classes = {config.data.num_classes}, but checkpoint {step} in "
        f"{ckpt.directory} was trained with {saved}: resume with "
        f"--config.data.num_classes={saved}, or use another --workdir")


def setup(config: ml_collections.ConfigDict, workdir) -> Run:
  """Mesh, data, state (restored from WORKDIR's latest checkpoint, or fine-tuned from
  ``config.init.backbone``, or fresh) and the jitted steps."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  use_compilation_cache(config, workdir)

  mesh = parallel.mesh_from_config(config)
  parallel.warm_up_cpu_collectives(mesh)  # before any small reduce-scatter: see there
  check_batch_layout(config.batch_size, mesh.size, jax.process_count())

  source = make_source(config)
  if source.num_classes != config.data.num_classes:
    raise errors.ConfigError(f"config.data.num_classes = {config.data.num_classes} but the source "
                     f"has {source.num_classes} classes")
  steps_per_epoch = pipeline_lib.steps_per_epoch(len(source), config.batch_size)
  data = make_data_iterator(config, source)

  tx = optim.make(config, steps_per_epoch)
  graphdef, rng_state, state = init_state(config, mesh, tx, jax.random.key(config.seed))
  steps = {head_only: make_train_step(config, mesh, graphdef, rng_state, tx, steps_per_epoch,
                                      head_only=head_only)
           for head_only in ((False, True) if config.init.head_only_steps else (False,))}

  ckpt = checkpoint_lib.Checkpoints(workdir, every_steps=config.checkpoint_every_steps,
                                    keep=config.keep_checkpoints)
  latest, state = checkpoint_lib.restore_latest(ckpt, state, mesh, data_iterator=data)
  if latest is not None:
    _check_same_classes(config, ckpt, latest)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  elif config.init.backbone:
    # Fine-tuning: the backbone's weights and BatchNorm statistics before step 0 (a resumed
    # run took them from its own checkpoint above); the head stays as initialised.
    backbone, model_state = finetune.backbone_arrays(config.init.backbone, config.model)
    replicated = parallel.replicated(mesh)
    state = state._replace(params={**state.params,
                                   "backbone": jax.device_put(backbone, replicated)},
                           model_state=jax.device_put(model_state, replicated))
    logging.info("backbone initialised from %s", config.init.backbone)
  start_step = int(state.step)
  if start_step != (latest or 0):
    raise RuntimeError(f"checkpoint {latest} holds step {start_step}")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return Run(config=config, workdir=workdir, mesh=mesh, graphdef=graphdef,
             rng_state=rng_state, state=state, train_step=steps[False],
             head_step=steps.get(True), data=data, ckpt=ckpt,
             steps_per_epoch=steps_per_epoch,
             total_steps=config.num_epochs * steps_per_epoch, start_step=start_step)


# ==================================================================== loop
def itstime(done: int, every: int, total: int) -> bool:
  """Whether a periodic action is due after ``done`` steps: every ``every`` steps (0: never)
  and at the last step (big_vision's ``itstime``)."""
  return done == total or (every > 0 and done % every == 0)


def loop(run: Run) -> dict[str, Any]:
  """Trains from ``run.start_step`` to the end (or a preemption); returns the last metrics."""
  config, state, ckpt, data = run.config, run.state, run.ckpt, run.data
  writer = metric_writer.MetricWriter(run.workdir)
  eval_sets = _eval_sets(config) if config.eval.every_steps > 0 else []
  last, at_start = {}, {}
  if eval_sets and config.eval.before_training and run.start_step == 0:
    at_start = evaluate(config, run.graphdef, run.rng_state, state, eval_sets)
    logging.info("step 0 (initial weights) %s", at_start)
    writer.write(0, at_start)
  timer = _Throughput(config.batch_size)
  in_flight = run_control.StepQueue()
  unchecked = {}  # step -> metrics, of the steps since the last finiteness check
  try:
    with (run_control.Preemption() as preemption,
          run_control.StepWatchdog(config.step_timeout_s) as watchdog):
      for step in range(run.start_step, run.total_steps):
        batch = next(data)
        batch = Batch(*parallel.global_batch((batch["image"], batch["label"], batch["flip"]),
                                             run.mesh))
        step_fn = run.head_step if step < config.init.head_only_steps else run.train_step
        state, metrics = step_fn(state, batch)
        watchdog.dispatched(step + 1, metrics["loss"])
        in_flight.push(metrics["loss"])
        unchecked[step] = metrics  # on the device until a check needs them
        timer.step_done(metrics["loss"])
        done = step + 1
        log_now = itstime(done, config.log_every_steps, run.total_steps)
        save_now = itstime(done, config.checkpoint_every_steps, run.total_steps)
        epoch_end = itstime(done, run.steps_per_epoch, run.total_steps)
        if log_now or save_now or epoch_end:
          _check_finite(state, done, unchecked, ckpt)
        if log_now:
          last = _log_metrics(metrics, done, run, timer, writer)
        if eval_sets and itstime(done, config.eval.every_steps, run.total_steps):
          results = evaluate(config, run.graphdef, run.rng_state, state, eval_sets)
          logging.info("step %d %s", done, results)
          writer.write(done, results)
          last.update(results)
        if save_now or epoch_end:
          if run.lease is not None:
            run.lease.check()
          ckpt.save(done, state, data_iterator=data, config=config,
                    force=epoch_end)
        if done == config.debug.signal_after_step:
          # The drill (configs/default.py, "debug"): a preemption or crash at a known step.
          # The saves finish first, so what the signal finds on disk is the same on any
          # machine; raise_signal runs the Python handler (``Preemption``'s) before it
          # returns.
          ckpt.wait()
          signal.raise_signal(getattr(signal, config.debug.signal))
        if preemption.reached(done):
          logging.warning("preemption requested: saving step %d and stopping", done)
          _check_finite(state, done, unchecked, ckpt)
          if run.lease is not None:
            run.lease.check()
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
  for close in (ckpt.wait, ckpt.close, writer.close, data.close):
    close()
  for name, value in at_start.items():
    if name in last:
      logging.info("%s: %.4f with the initial weights, %.4f after training", name, value,
                   last[name])
  return last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Trains (resuming from WORKDIR's latest checkpoint) and returns the last metrics; holds
  the workdir's lease (``lease.py``: one run per workdir) from before setup to the end."""
  with lease_lib.Lease(workdir) as lease:
    run = setup(config, workdir)
    run.lease = lease
    return loop(run)


class _Throughput:
  """img/s and the ETA, from the end of the first (compiling) step."""

  def __init__(self, batch_size: int):
    self.batch_size, self.start, self.steps = batch_size, None, 0

  def step_done(self, output: jax.Array) -> None:
    if self.start is None:
      jax.block_until_ready(output)
      self.start = time.time()
    else:
      self.steps += 1

  def rate_and_eta(self, steps_left: int) -> tuple[float, float]:
    elapsed = time.time() - self.start if self.start else 0.0
    return (self.steps * self.batch_size / max(elapsed, 1e-9),
            steps_left * elapsed / max(self.steps, 1))


def _log_metrics(metrics, done: int, run: Run, timer: _Throughput, writer) -> dict:
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  m["samples_per_s"], eta = timer.rate_and_eta(run.total_steps - done)
  m["epoch"] = (done - 1) / run.steps_per_epoch
  logging.info("step %d/%d epoch %.2f loss %.4f (s2c %.4f s2s %.4f) lr %.4g t %.4f "
               "%.1f img/s ETA %.0fs", done, run.total_steps, m["epoch"], m["loss"],
               m["s2c"], m["s2s"], m["lr"], m["threshold_t"], m["samples_per_s"], eta)
  writer.write(done, m)
  return m


def _check_finite(state: TrainState, done: int, unchecked: dict, ckpt) -> None:
  """Raises ``NonFiniteLossError`` if a step since the last check had a NaN/inf loss or
  gradient norm, naming the first such step, its first non-finite term (the sample-to-class
  loss, the sample-to-sample loss, the gradient norm), its learning rate and the checkpoint
  the run keeps; forgets the checked steps' metrics otherwise."""
  bad = int(state.first_nonfinite_step)
  if bad < 0:
    unchecked.clear()
    return
  metrics = unchecked.get(bad)
  if metrics is None:  # a step before this process's first (a restored state)
    what, lr = "the loss or the gradient norm", ""
  else:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    terms = [("s2c", "the sample-to-class (s2c) loss"), ("s2s", "the sample-to-sample (s2s) loss"),
             ("grad_norm", "the gradient norm"), ("loss", "the loss")]
    what = next((name for key, name in terms if not math.isfinite(m[key])), "the loss")
    lr = f" with learning rate {m['lr']:.4g}"
  ckpt.wait()
  kept = ckpt.latest_step()
  kept = (f"checkpoint {kept} in {ckpt.directory} is kept" if kept is not None
          else "no checkpoint was written before it")
  raise NonFiniteLossError(
      f"{what} became NaN/inf at step {bad + 1}{lr} (found at step {done}); stopped without "
      f"saving, {kept}: lower optimizer.lr or set optimizer.clip_norm")