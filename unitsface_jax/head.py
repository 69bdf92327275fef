"""The class-sharded UniTSFace head: margin softmax and sample-to-sample loss over all devices.

The class centres W [C, D], the memory bank M [C, D] and its ``seen`` mask are split in
contiguous row blocks of ⌈C/n⌉ over the n devices of the mesh (C is padded to n·⌈C/n⌉; padded
rows are masked out). Inside ``jax.shard_map`` each device all-gathers the global batch of
embeddings and labels, computes cosines against its own rows only, and finishes the class
reductions of the loss family (``unitsface_jax.losses``) with ``psum``/``pmax``: logits exist
only as [global batch, local classes] per device, never [global batch, C]. Then each device
writes the batch's features into the memory rows it owns (last occurrence wins across the
global batch). The sample-to-class and sample-to-sample losses are any registered ones
(``losses.registry``: their per-sample maths, options, bias and statistics come from there;
this module names none); running statistics (AdaFace's, CurricularFace's) are computed from
the gathered global batch, so they are the same on every device. PartialFC sampling
(arXiv 2203.15565; insightface arcface_torch partial_fc_v2.py) keeps a fixed number k of local classes per step, positives forced, so the
step compiles once.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from unitsface_jax import losses
from unitsface_jax.losses import registry
from unitsface_jax.losses import threshold
from unitsface_jax.parallel import DEVICE_AXIS
from unitsface_jax.parallel import padded_classes


def __getattr__(name: str):
  """``S2C_LOSSES`` and ``S2C_OPTIONS``: the registry's names, read when asked (a loss
  registered later is in them)."""
  if name == "S2C_LOSSES":
    return registry.s2c_names()
  if name == "S2C_OPTIONS":
    return tuple(registry.option_defaults("s2c"))
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# How W and M may be stored (``HeadConfig.storage_dtype``, ``config.loss.head_dtype``).
STORAGE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, init=False)
class HeadConfig:
  """What the head computes; hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    num_classes: C, the number of identities.
    embedding_dim: D.
    s2c_loss: a registered sample-to-class loss (``losses.registry.s2c_names()``).
    s2c_scale: s of the sample-to-class loss.
    s2c_margin: m of the sample-to-class loss (CosFace 0.4, ArcFace 0.5, AdaFace 0.4,
      CurricularFace 0.5, normalized BCE and UCE 0.4; unused by the combined margin and
      MagFace).
    s2s_loss: a registered sample-to-sample loss ("uss", "s2s_softmax", "s2s_bce", "none").
    s2s_scale: s of the sample-to-sample loss.
    s2s_margin: m of the sample-to-sample loss.
    sample_rate: PartialFC r; 1 keeps every class.
    storage_dtype: dtype of W and M in memory ("float32" or "bfloat16"); compute is fp32.
    matmul_precision: precision of the cosine matmuls ("highest": fp32; None: the backend
      default, a single bf16 pass on TPU: cheaper, less exact).
    options: the losses' options set explicitly, as sorted (name, value) pairs. Pass them as
      keywords (``HeadConfig(C, s2c_loss="adaface", adaface_h=0.5)``) and read them as
      attributes (``config.adaface_h``); an option not given reads as its registry default.
  """
  num_classes: int
  embedding_dim: int = 512
  s2c_loss: str = "cosface"
  s2c_scale: float = 64.0
  s2c_margin: float = 0.4
  s2s_loss: str = "uss"
  s2s_scale: float = 64.0
  s2s_margin: float = 0.1
  sample_rate: float = 1.0
  storage_dtype: str = "float32"
  matmul_precision: str | None = "highest"
  options: tuple[tuple[str, Any], ...] = ()

  def __init__(self, num_classes: int, embedding_dim: int = 512, s2c_loss: str = "cosface",
               s2c_scale: float = 64.0, s2c_margin: float = 0.4, s2s_loss: str = "uss",
               s2s_scale: float = 64.0, s2s_margin: float = 0.1, sample_rate: float = 1.0,
               storage_dtype: str = "float32", matmul_precision: str | None = "highest",
               options: tuple[tuple[str, Any], ...] = (), **option_values):
    values = {**dict(options), **option_values}
    unknown = sorted(set(values) - set(registry.option_defaults()))
    if unknown:
      raise TypeError(f"HeadConfig got unknown loss options {unknown}; the registered "
                      f"losses' options are {sorted(registry.option_defaults())}")
    fields = dict(num_classes=num_classes, embedding_dim=embedding_dim, s2c_loss=s2c_loss,
                  s2c_scale=s2c_scale, s2c_margin=s2c_margin, s2s_loss=s2s_loss,
                  s2s_scale=s2s_scale, s2s_margin=s2s_margin, sample_rate=sample_rate,
                  storage_dtype=storage_dtype, matmul_precision=matmul_precision,
                  options=tuple(sorted(values.items())))
    for name, value in fields.items():
      object.__setattr__(self, name, value)

  def __getattr__(self, name: str):
    # Only reached for names that are not fields: the losses' options.
    if name.startswith("__"):
      raise AttributeError(name)
    given = dict(self.__dict__.get("options", ()))
    if name in given:
      return given[name]
    defaults = registry.option_defaults()
    if name in defaults:
      return defaults[name]
    raise AttributeError(f"HeadConfig has no field or loss option {name!r}")

  def options_of(self, loss: registry.Loss) -> dict[str, Any]:
    """``loss``'s options: the values given, else the defaults."""
    return {name: getattr(self, name) for name in loss.options}

  @property
  def s2c(self) -> registry.SampleToClassLoss:
    return registry.s2c(self.s2c_loss)

  @property
  def s2s(self) -> registry.SampleToSampleLoss:
    return registry.s2s(self.s2s_loss)


class HeadParams(NamedTuple):
  """Trainable head parameters (differentiate the loss w.r.t. these).

  Attributes:
    w: [C_pad, D] class centres, class-sharded.
    bias: [] the USS bias b (threshold t = b/s), replicated.
    class_bias: [C_pad] the per-class bias of s2s BCE, class-sharded.
    s2c_bias: the bias of the sample-to-class loss, {"bias": [C_pad] class-sharded} for
      normalized BCE, {"bias": []} replicated for UCE, {} for the other losses (so their
      checkpoints hold no such array).
  """
  w: jax.Array
  bias: jax.Array
  class_bias: jax.Array
  s2c_bias: dict = {}


class HeadBuffers(NamedTuple):
  """Non-trainable head state.

  Attributes:
    memory: [C_pad, D] last feature seen per class, class-sharded.
    seen: [C_pad] bool, memory rows written at least once, class-sharded.
    initialized: [] bool, b (and the class biases) took their data-dependent first value.
    s2c_stats: running statistics of the global batch, replicated: {"norm_mean", "norm_std"}
      for AdaFace, {"t"} for CurricularFace, {} for the other losses.
  """
  memory: jax.Array
  seen: jax.Array
  initialized: jax.Array
  s2c_stats: dict = {}


class HeadState(NamedTuple):
  params: HeadParams
  buffers: HeadBuffers


def num_local_classes(config: HeadConfig, num_shards: int) -> int:
  """⌈C/n⌉, the rows of W and M each device owns."""
  return padded_classes(config.num_classes, num_shards) // num_shards


def num_sampled(config: HeadConfig, num_shards: int, global_batch: int) -> int:
  """k, classes kept per device: max(⌈r·C_local⌉, global batch), at most C_local.

  At least the global batch, so that every positive of the batch fits even if all of them
  live on one device (insightface partial_fc_v2.py samples a variable count instead).
  """
  local = num_local_classes(config, num_shards)
  if config.sample_rate >= 1.0:
    return local
  return min(local, max(math.ceil(config.sample_rate * local), global_batch))


def s2c_initial_state(config: HeadConfig | None, padded: int) -> tuple[dict, dict]:
  """Initial (s2c_bias, s2c_stats) of the sample-to-class loss; [C_pad] arrays are class rows.

  A bias (``loss.bias``) starts at ``loss.initial_bias(C)`` (normalized BCE and UCE: log(10·C),
  CVI-SZU/UniTSFace head.py), padded rows at 0; statistics at ``loss.initial_stats``
  (AdaFace's 20 and 100, CurricularFace's t = 0). Without ``config``, a loss with neither.
  """
  if config is None:
    return {}, {}
  loss = config.s2c
  stats = {name: jnp.float32(value) for name, value in loss.initial_stats.items()}
  if loss.bias == "none":
    return {}, stats
  value = loss.initial_bias(config.num_classes)
  if loss.bias == "scalar":
    return {"bias": jnp.float32(value)}, stats
  real = jnp.arange(padded) < config.num_classes
  return {"bias": jnp.where(real, value, 0.0).astype(jnp.float32)}, stats


def head_specs(config: HeadConfig | None = None) -> HeadState:
  """PartitionSpecs of the head state: rows split over ``DEVICE_AXIS``, scalars replicated.

  Without ``config``, the state of a loss with no bias or statistics (CosFace, ArcFace).
  """
  rows = P(DEVICE_AXIS)
  s2c_bias, s2c_stats = jax.eval_shape(lambda: s2c_initial_state(config, 1))
  bias_specs = jax.tree.map(lambda x: rows if x.ndim else P(), s2c_bias)
  return HeadState(HeadParams(w=rows, bias=P(), class_bias=rows, s2c_bias=bias_specs),
                   HeadBuffers(memory=rows, seen=rows, initialized=P(),
                               s2c_stats=jax.tree.map(lambda _: P(), s2c_stats)))


def head_shardings(mesh: Mesh, config: HeadConfig | None = None) -> HeadState:
  """NamedShardings of the head state on ``mesh``."""
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), head_specs(config))


def initial_head_state(key: jax.Array, config: HeadConfig, num_shards: int) -> HeadState:
  """A fresh head state for ``num_shards`` devices, unsharded (trace it under ``jax.jit``
  with ``head_shardings`` as the output shardings, or ``jax.eval_shape`` it).

  W ~ N(0, 1/D), the kaiming-normal (a=1, fan_in) initialisation of CVI-SZU/UniTSFace
  head.py; padded rows are zero. M is zero and unseen, b and the class biases are 0 until
  their first use (head.py initialises b from data when it is ≤ 0); the loss's own bias and
  statistics take their reference initial values (``s2c_initial_state``).
  """
  padded = padded_classes(config.num_classes, num_shards)
  dtype = jnp.dtype(config.storage_dtype)
  w = jax.random.normal(key, (padded, config.embedding_dim), jnp.float32)
  w = w / math.sqrt(config.embedding_dim)
  w = jnp.where((jnp.arange(padded) < config.num_classes)[:, None], w, 0.0)
  s2c_bias, s2c_stats = s2c_initial_state(config, padded)
  params = HeadParams(w=w.astype(dtype), bias=jnp.zeros((), jnp.float32),
                      class_bias=jnp.zeros((padded,), jnp.float32), s2c_bias=s2c_bias)
  buffers = HeadBuffers(memory=jnp.zeros((padded, config.embedding_dim), dtype),
                        seen=jnp.zeros((padded,), jnp.bool_),
                        initialized=jnp.zeros((), jnp.bool_), s2c_stats=s2c_stats)
  return HeadState(params, buffers)


def init_head_state(key: jax.Array, config: HeadConfig, mesh: Mesh) -> HeadState:
  """``initial_head_state`` created directly with its shardings on ``mesh``."""
  return jax.jit(functools.partial(initial_head_state, config=config,
                                   num_shards=mesh.shape[DEVICE_AXIS]),
                 out_shardings=head_shardings(mesh, config))(key)


def _pick_classes(key, offset, local_labels, real, num_sampled_classes):
  """PartialFC: the k local rows used this step, every positive of the global batch forced.

  Positives score 2, other real classes U[0, 1), padding −1; the top k are all positives
  plus uniformly random negatives, since k ≥ global batch ≥ #positives. Fixed k keeps every
  shape static (insightface partial_fc_v2.py samples a data-dependent count).
  """
  local = real.shape[0]
  if num_sampled_classes >= local:
    return jnp.arange(local)
  rows = jnp.where(local_labels >= 0, local_labels, local)  # local: dropped
  positive = jnp.zeros((local,), jnp.bool_).at[rows].set(True, mode="drop")
  noise = jax.random.uniform(jax.random.fold_in(key, offset), (local,))
  score = jnp.where(positive, 2.0, jnp.where(real, noise, -1.0))
  return jnp.sort(jax.lax.top_k(score, num_sampled_classes)[1])


# The class-axis reductions of the loss family: every device holds a block of classes, so a
# sum or max over classes is a local one followed by one over the devices.
_class_sum = functools.partial(jax.lax.psum, axis_name=DEVICE_AXIS)
_class_max = functools.partial(jax.lax.pmax, axis_name=DEVICE_AXIS)


def _s2s_term(config: HeadConfig, state: HeadState, memory_cols: registry.Columns,
              picked: jax.Array, active: jax.Array):
  """The sample-to-sample loss [B], with b's (or the class biases') data-dependent first value.

  Args:
    config: what to compute.
    state: this device's head state before the step (b, class biases, ``initialized``).
    memory_cols: the global batch against the memory rows ``picked`` (mask: rows that hold a
      feature and are real classes).
    picked: [k] the local rows scored.
    active: whether the sample-to-sample term is in use this step.

  Returns:
    (loss [B], params with b / class biases as this step uses them, initialized after it).
  """
  loss, params = config.s2s, state.params
  initialized = state.buffers.initialized
  ready, bias = active, None
  if loss.threshold != "none":
    # b takes its first value on the first active step whose batch has a valid negative:
    # an empty memory gives no value (head.py instead re-initialises while b <= 0).
    negative_lse = threshold.negative_logsumexp(
        memory_cols.cos, memory_cols.target, memory_cols.mask, scale=config.s2s_scale,
        class_max=memory_cols.class_max, class_sum=memory_cols.class_sum)
    first = threshold.mean_finite(negative_lse)
    ready = active & jnp.any(jnp.isfinite(negative_lse))
    first_use = ready & ~initialized
    if loss.threshold == "scalar":
      bias = threshold.threshold_bias_for_step(params.bias, first, first_use=first_use)
      params = params._replace(bias=bias)
    else:
      # head.py Sample_to_Sample_Based_BCE_Loss adds the same first value to every class.
      class_bias = params.class_bias + jax.lax.stop_gradient(jnp.where(first_use, first, 0.0))
      params, bias = params._replace(class_bias=class_bias), class_bias[picked]
  per_sample = loss.per_sample(memory_cols, scale=config.s2s_scale, margin=config.s2s_margin,
                               options=config.options_of(loss), bias=bias)
  return per_sample, params, initialized | ready


def _s2c_term(config: HeadConfig, params: HeadParams, stats: dict, norms: jax.Array,
              class_cols: registry.Columns, picked: jax.Array) -> tuple[jax.Array, dict]:
  """The sample-to-class loss [B] and the running statistics after this batch.

  Args:
    config: what to compute.
    params: this device's head parameters (the loss's bias).
    stats: the running statistics (replicated), as the loss's ``update_stats`` left them.
    norms: [B] feature norms of the raw embeddings of the global batch (replicated).
    class_cols: the global batch against the class rows ``picked``.
    picked: [k] the local rows scored.

  Returns:
    (per-sample loss [B], statistics after this step). They are functions of the global
    batch only, so every device computes the same values.
  """
  loss = config.s2c
  bias = params.s2c_bias.get("bias")
  if bias is not None and bias.ndim:
    bias = bias[picked]
  return loss.per_sample(class_cols, scale=config.s2c_scale, margin=config.s2c_margin,
                         options=config.options_of(loss), norms=norms, bias=bias, stats=stats)


def _local_head(state: HeadState, embeddings: jax.Array, labels: jax.Array, key: jax.Array,
                s2s_active: jax.Array, norms: jax.Array, *, config: HeadConfig,
                num_sampled_classes: int) -> tuple[dict[str, jax.Array], HeadState]:
  """One device's share of ``head_loss`` (runs inside ``jax.shard_map``): its rows of the
  head state, its slice of the batch; returns the replicated loss terms and its rows of the
  new state."""
  params, buffers = state
  # Every device sees the whole global batch; the transpose (psum_scatter) brings each
  # device's share of the embedding gradient back to the device that owns the sample.
  features = jax.lax.all_gather(embeddings, DEVICE_AXIS, tiled=True)
  labels = jax.lax.all_gather(labels, DEVICE_AXIS, tiled=True)
  features = features.astype(jnp.promote_types(features.dtype, jnp.float32))

  local = params.w.shape[0]
  offset = jax.lax.axis_index(DEVICE_AXIS) * local
  local_labels = labels - offset
  local_labels = jnp.where((local_labels >= 0) & (local_labels < local), local_labels, -1)
  real = offset + jnp.arange(local) < config.num_classes
  picked = _pick_classes(key, offset, local_labels, real, num_sampled_classes)
  target = local_labels[:, None] == picked[None, :]
  real = real[picked]
  reduce = dict(class_sum=_class_sum, class_max=_class_max)

  # Rows not picked are not read, so they get no gradient.
  cos_w = losses.cosine_similarity(features, params.w[picked],
                                   precision=config.matmul_precision)
  class_cols = registry.Columns(cos_w, target, jnp.broadcast_to(real, target.shape), **reduce)
  s2c, s2c_stats = _s2c_term(config, params, buffers.s2c_stats, norms, class_cols, picked)

  # Sample-to-sample term against the memory as it was before this step's write.
  cos_m = losses.cosine_similarity(features, jax.lax.stop_gradient(buffers.memory[picked]),
                                   precision=config.matmul_precision)
  written = jnp.broadcast_to(buffers.seen[picked] & real, target.shape)
  memory_cols = registry.Columns(cos_m, target, written, **reduce)
  s2s, params, initialized = _s2s_term(config, state, memory_cols, picked, s2s_active)

  # Memory write to the rows this device owns; last occurrence in the GLOBAL batch wins
  # because every device sees the same gathered batch in the same order.
  memory, seen = losses.write_memory(buffers.memory, buffers.seen, features, local_labels)
  terms = {"s2c": s2c, "s2s": s2s,
           "sampled_classes": jnp.where(real, offset + picked, -1)}
  return terms, HeadState(params, HeadBuffers(memory=memory, seen=seen,
                                              initialized=initialized, s2c_stats=s2c_stats))


def head_loss(state: HeadState, embeddings: jax.Array, labels: jax.Array, *,
              config: HeadConfig, mesh: Mesh, key: jax.Array | None = None,
              s2s_active: Any = True) -> tuple[dict[str, jax.Array], HeadState]:
  """Per-sample head losses on the global batch, and the head state after this step.

  Call it inside ``jax.jit`` (and ``jax.grad`` with ``has_aux=True``): the loss terms are
  differentiable w.r.t. ``embeddings``, ``state.params.w`` and ``state.params.bias`` (and
  ``class_bias`` for s2s BCE, ``s2c_bias`` for normalized BCE and UCE). Combine the terms with
  ``losses.unitsface_objective``; MagFace's "s2c" term includes λ_g·g(‖f‖).

  Args:
    state: the head state, sharded as ``head_shardings(mesh)``.
    embeddings: [B, D] backbone features, batch-sharded over ``DEVICE_AXIS``; B divisible by
      the device count.
    labels: [B] int labels in [0, C), batch-sharded.
    config: what to compute.
    mesh: the 1-D mesh of ``parallel.make_mesh``.
    key: PRNG key for PartialFC sampling, a fresh one every step; required when
      ``config.sample_rate < 1``.
    s2s_active: bool (may be traced): whether the sample-to-sample term is in use this step;
      b takes its data-dependent first value (``losses.init_threshold_bias`` on the global
      batch) on the first active step that has a valid negative, and only then.

  Returns:
    (loss_terms, new_state). loss_terms: "s2c" and "s2s" [B] per-sample losses (replicated);
    "sampled_classes" [n·k] the global class ids each device used this step (-1: padding).
    new_state: memory/seen updated with this batch, ``initialized`` set once active, and
    ``params.bias``/``params.class_bias`` holding their first value on the first active
    step (apply this step's optimizer update to these values; their gradient flows as if
    they had been the parameters, as in the official code); ``buffers.s2c_stats`` (AdaFace,
    CurricularFace) updated with this batch, the values this step's loss used.
  """
  num_shards = mesh.shape[DEVICE_AXIS]
  k = num_sampled(config, num_shards, embeddings.shape[0])
  if key is None:
    if k < num_local_classes(config, num_shards):
      raise ValueError("PartialFC sampling (sample_rate < 1) needs a PRNG key")
    key = jax.random.key(0)
  rows, specs = P(DEVICE_AXIS), head_specs(config)
  # The feature norms (AdaFace, MagFace) of the whole batch, replicated before any reduction
  # over them, so every device reduces the same values in the same order on any mesh. They
  # are computed here, not from the gathered features inside shard_map, whose values are
  # typed as varying over the devices.
  loss = config.s2c
  norms = jnp.zeros(embeddings.shape[:1], jnp.float32)
  if loss.needs_norms:
    norms = jax.lax.with_sharding_constraint(
        losses.feature_norm(embeddings.astype(jnp.promote_types(embeddings.dtype,
                                                                jnp.float32))),
        jax.sharding.NamedSharding(mesh, P()))
  if loss.update_stats is not None:
    # mk-minchul/AdaFace head.py updates the statistics first, then uses them.
    stats = loss.update_stats(norms, state.buffers.s2c_stats, config.options_of(loss))
    state = state._replace(buffers=state.buffers._replace(s2c_stats=stats))
  terms_specs = {"s2c": P(), "s2s": P(), "sampled_classes": rows}
  fn = jax.shard_map(
      functools.partial(_local_head, config=config, num_sampled_classes=k), mesh=mesh,
      in_specs=(specs, rows, rows, P(), P(), P()), out_specs=(terms_specs, specs))
  return fn(state, embeddings, labels, key, jnp.asarray(s2s_active, jnp.bool_), norms)
