"""The class-sharded UniTSFace head: margin softmax and sample-to-sample loss over all devices.

The class centres W [C, D], the memory bank M [C, D] and its ``seen`` mask are split in
contiguous row blocks of ⌈C/n⌉ over the n devices of the mesh (C is padded to n·⌈C/n⌉; padded
rows are masked out). Inside ``jax.shard_map`` each device all-gathers the global batch of
embeddings and labels, computes cosines against its own rows only, and finishes the class
reductions of the loss family (``unitsface_jax.losses``) with ``psum``/``pmax``: logits exist
only as [global batch, local classes] per device, never [global batch, C]. Then each device
writes the batch's features into the memory rows it owns (last occurrence wins across the
global batch). The sample-to-class loss is any of ``S2C_LOSSES`` (CosFace, ArcFace, the
combined margin, AdaFace, CurricularFace, MagFace, normalized BCE, UCE); AdaFace's and
CurricularFace's running statistics are computed from the gathered global batch, so they are
the same on every device. PartialFC sampling (arXiv 2203.15565; insightface arcface_torch
partial_fc_v2.py) keeps a fixed number k of local classes per step, positives forced, so the
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
from unitsface_jax.losses import class_axis
from unitsface_jax.losses import margin as margin_lib
from unitsface_jax.losses import sample_to_class
from unitsface_jax.losses import sample_to_sample
from unitsface_jax.parallel import DEVICE_AXIS
from unitsface_jax.parallel import padded_classes


# The sample-to-class losses the head computes (``HeadConfig.s2c_loss``).
S2C_LOSSES = ("cosface", "arcface", "combined", "adaface", "curricularface", "magface",
              "normalized_bce", "uce")
# The forms of the combined margin (``HeadConfig.combined_form``).
COMBINED_FORMS = ("formula", "arcface_torch")
# The HeadConfig fields of the sample-to-class losses' options, named as in ``config.loss``.
S2C_OPTIONS = ("combined_m1", "combined_m2", "combined_m3", "combined_form", "adaface_h",
               "adaface_t_alpha", "curricular_alpha", "magface_l_a", "magface_u_a",
               "magface_l_m", "magface_u_m", "magface_lambda_g")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """What the head computes; hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    num_classes: C, the number of identities.
    embedding_dim: D.
    s2c_loss: one of ``S2C_LOSSES``.
    s2c_scale: s of the sample-to-class loss.
    s2c_margin: m of the sample-to-class loss (CosFace 0.4, ArcFace 0.5, AdaFace 0.4,
      CurricularFace 0.5, normalized BCE and UCE 0.4; unused by the combined margin and
      MagFace).
    arcface_straight_through: ArcFace (and combined) margin without gradient (insightface
      behaviour).
    combined_m1, combined_m2, combined_m3: the combined margin cos(m1·θ + m2) − m3.
    combined_form: "formula" (that formula for any m1, m2, m3) or "arcface_torch"
      (insightface arcface_torch ``CombinedMarginLoss``: m3 > 0 runs CosFace with m3 and
      ignores m1, m2; m1 = 1, m3 = 0 runs ArcFace with m2 and a gradient-free margin; no
      other combination).
    adaface_h, adaface_t_alpha: AdaFace's h and the EMA weight of its norm statistics.
    curricular_alpha: the EMA weight of CurricularFace's t.
    magface_l_a, magface_u_a, magface_l_m, magface_u_m, magface_lambda_g: MagFace's norm
      range, margin range and regulariser weight λ_g.
    s2s_loss: "uss", "s2s_softmax", "s2s_bce" or "none".
    s2s_scale: s of the sample-to-sample loss.
    s2s_margin: m of the sample-to-sample loss.
    uss_form: "code" or "paper" (see ``losses.uss``).
    sample_rate: PartialFC r; 1 keeps every class.
    storage_dtype: dtype of W and M in memory ("float32" or "bfloat16"); compute is fp32.
    matmul_precision: precision of the cosine matmuls ("highest": fp32; None: the backend
      default, a single bf16 pass on TPU: cheaper, less exact).
  """
  num_classes: int
  embedding_dim: int = 512
  s2c_loss: str = "cosface"
  s2c_scale: float = 64.0
  s2c_margin: float = 0.4
  arcface_straight_through: bool = False
  s2s_loss: str = "uss"
  s2s_scale: float = 64.0
  s2s_margin: float = 0.1
  uss_form: str = "code"
  combined_m1: float = 1.0
  combined_m2: float = 0.3
  combined_m3: float = 0.2
  combined_form: str = "formula"
  adaface_h: float = 0.333
  adaface_t_alpha: float = 0.01
  curricular_alpha: float = 0.01
  magface_l_a: float = 10.0
  magface_u_a: float = 110.0
  magface_l_m: float = 0.45
  magface_u_m: float = 0.8
  magface_lambda_g: float = 35.0
  sample_rate: float = 1.0
  storage_dtype: str = "float32"
  matmul_precision: str | None = "highest"


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

  The biases of normalized BCE and UCE start at log(10·C) (CVI-SZU/UniTSFace head.py,
  ``nn.init.constant_``), padded rows at 0; AdaFace's statistics at 20 and 100
  (mk-minchul/AdaFace head.py); CurricularFace's t at 0 (HuangYG123/CurricularFace).
  """
  name = config.s2c_loss if config is not None else None
  if name in ("normalized_bce", "uce"):
    value = sample_to_class.initial_bce_bias(config.num_classes)
    if name == "uce":
      return {"bias": jnp.float32(value)}, {}
    real = jnp.arange(padded) < config.num_classes
    return {"bias": jnp.where(real, value, 0.0).astype(jnp.float32)}, {}
  if name == "adaface":
    return {}, {"norm_mean": jnp.float32(20.0), "norm_std": jnp.float32(100.0)}
  if name == "curricularface":
    return {}, {"t": jnp.float32(0.0)}
  return {}, {}


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


class _Columns(NamedTuple):
  """The local classes a device scores this step, against the global batch.

  Attributes:
    picked: [k] local row indices (all rows, or PartialFC's sample).
    target: [B, k] bool, column j is sample i's class.
    real: [k] bool, the row is a class (not padding).
  """
  picked: jax.Array
  target: jax.Array
  real: jax.Array


def _s2s_term(config: HeadConfig, state: HeadState, cos_m: jax.Array, cols: _Columns,
              valid: jax.Array, active: jax.Array):
  """The sample-to-sample loss [B], with b's (or the class biases') data-dependent first value.

  Args:
    config: what to compute.
    state: this device's head state before the step (b, class biases, ``initialized``).
    cos_m: [B, k] cosines between the global batch and the memory rows ``cols.picked``.
    cols: the columns scored.
    valid: [B, k] bool, memory rows that hold a feature and are real classes.
    active: whether the sample-to-sample term is in use this step.

  Returns:
    (loss [B], params with b / class biases as this step uses them, initialized after it).
  """
  params, initialized = state.params, state.buffers.initialized
  first_use = jnp.zeros((), jnp.bool_)
  ready = active
  if config.s2s_loss in ("uss", "s2s_bce"):
    # b takes its first value on the first active step whose batch has a valid negative:
    # an empty memory gives no value (head.py instead re-initialises while b <= 0).
    negative_lse = sample_to_sample.negative_logsumexp(
        cos_m, cols.target, valid, scale=config.s2s_scale, class_max=_class_max,
        class_sum=_class_sum)
    init = sample_to_sample.mean_finite(negative_lse)
    ready = active & jnp.any(jnp.isfinite(negative_lse))
    first_use = ready & ~initialized
  initialized = initialized | ready
  if config.s2s_loss == "uss":
    bias = sample_to_sample.threshold_bias_for_step(params.bias, init, first_use=first_use)
    pos, neg = sample_to_sample.uss_parts(
        cos_m, cols.target, valid, bias, scale=config.s2s_scale, margin=config.s2s_margin,
        form=config.uss_form, class_max=_class_max, class_sum=_class_sum)
    return pos + neg, params._replace(bias=bias), initialized
  if config.s2s_loss == "s2s_bce":
    # head.py Sample_to_Sample_Based_BCE_Loss adds the same first value to every class.
    class_bias = params.class_bias + jax.lax.stop_gradient(jnp.where(first_use, init, 0.0))
    pos, neg = class_axis.threshold_bce(
        cos_m, cols.target, valid, class_bias[cols.picked], scale=config.s2s_scale,
        margin=config.s2s_margin, class_sum=_class_sum)
    return pos + neg, params._replace(class_bias=class_bias), initialized
  if config.s2s_loss == "s2s_softmax":
    logits = config.s2s_scale * (cos_m - config.s2s_margin * cols.target)
    loss = class_axis.softmax_cross_entropy(logits, cols.target, valid, class_max=_class_max,
                                            class_sum=_class_sum)
    return loss, params, initialized
  if config.s2s_loss == "none":
    return jnp.zeros(cos_m.shape[:1], cos_m.dtype), params, initialized
  raise ValueError(f"unknown s2s_loss {config.s2s_loss!r}")


def _combined_logits(config: HeadConfig, cos_w: jax.Array, target: jax.Array) -> jax.Array:
  """The combined margin's logits in the configured form (see ``HeadConfig``)."""
  m1, m2, m3, s = (config.combined_m1, config.combined_m2, config.combined_m3,
                   config.s2c_scale)
  if config.combined_form == "formula":
    return margin_lib.combined_margin_logits(
        cos_w, target, scale=s, m1=m1, m2=m2, m3=m3,
        straight_through=config.arcface_straight_through)
  if config.combined_form != "arcface_torch":
    raise ValueError(f"unknown combined_form {config.combined_form!r}")
  # insightface arcface_torch losses.py CombinedMarginLoss: two branches, nothing else.
  if m3 > 0:
    return s * (cos_w - m3 * target)
  if m1 == 1.0 and m3 == 0.0:
    return margin_lib.combined_margin_logits(cos_w, target, scale=s, m1=1.0, m2=m2, m3=0.0,
                                             straight_through=True)
  raise ValueError(f"arcface_torch's combined margin runs m3 > 0 or (m1, m3) = (1, 0), got "
                   f"{(m1, m2, m3)}")


def _s2c_term(config: HeadConfig, params: HeadParams, stats: dict, norms: jax.Array,
              cos_w: jax.Array, cols: _Columns) -> tuple[jax.Array, dict]:
  """The sample-to-class loss [B] and the running statistics after this batch.

  Args:
    config: what to compute.
    params: this device's head parameters (the loss's bias).
    stats: the running statistics (replicated): AdaFace's already updated with this batch
      (``head_loss``), CurricularFace's before this step.
    norms: [B] feature norms of the raw embeddings of the global batch (replicated).
    cos_w: [B, k] cosines to the class rows ``cols.picked``.
    cols: the columns scored.

  Returns:
    (per-sample loss [B], statistics after this step). They are functions of the global
    batch only, so every device computes the same values.
  """
  name, s, m = config.s2c_loss, config.s2c_scale, config.s2c_margin
  mask = jnp.broadcast_to(cols.real, cos_w.shape)

  def cross_entropy(logits):
    return class_axis.softmax_cross_entropy(logits, cols.target, mask, class_max=_class_max,
                                            class_sum=_class_sum)

  if name == "cosface":
    return cross_entropy(s * (cos_w - m * cols.target)), stats
  if name == "arcface":
    return cross_entropy(sample_to_class.arcface_logits(
        cos_w, cols.target, scale=s, margin=m,
        straight_through=config.arcface_straight_through)), stats
  if name == "combined":
    return cross_entropy(_combined_logits(config, cos_w, cols.target)), stats
  if name in ("normalized_bce", "uce"):
    bias = params.s2c_bias["bias"]
    bias = bias[cols.picked] if bias.ndim else bias
    pos, neg = class_axis.threshold_bce(cos_w, cols.target, mask, bias, scale=s, margin=m,
                                        class_sum=_class_sum)
    return pos + neg, stats
  if name == "adaface":
    logits = margin_lib.adaface_logits(cos_w, cols.target, norms, stats["norm_mean"],
                                       stats["norm_std"], scale=s, margin=m, h=config.adaface_h)
    return cross_entropy(logits), stats
  if name == "curricularface":
    cos_y = _class_sum(jnp.sum(jnp.where(cols.target, cos_w, 0.0), axis=-1))
    t = margin_lib.curricular_t(stats["t"], cos_y, alpha=config.curricular_alpha)
    logits = margin_lib.curricular_logits(cos_w, cols.target, t, scale=s, margin=m,
                                          class_sum=_class_sum)
    return cross_entropy(logits), {"t": t}
  if name == "magface":
    kw = dict(l_a=config.magface_l_a, u_a=config.magface_u_a)
    logits = margin_lib.magface_logits(cos_w, cols.target, norms, scale=s,
                                       l_m=config.magface_l_m, u_m=config.magface_u_m, **kw)
    regularizer = margin_lib.magface_regularizer(norms, **kw)
    return cross_entropy(logits) + config.magface_lambda_g * regularizer, stats
  raise ValueError(f"unknown s2c_loss {name!r}")


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
  cols = _Columns(picked=picked, target=local_labels[:, None] == picked[None, :],
                  real=real[picked])
  shape = cols.target.shape

  # Rows not picked are not read, so they get no gradient.
  cos_w = losses.cosine_similarity(features, params.w[picked],
                                   precision=config.matmul_precision)
  s2c, s2c_stats = _s2c_term(config, params, buffers.s2c_stats, norms, cos_w, cols)

  # Sample-to-sample term against the memory as it was before this step's write.
  cos_m = losses.cosine_similarity(features, jax.lax.stop_gradient(buffers.memory[picked]),
                                   precision=config.matmul_precision)
  valid = jnp.broadcast_to(buffers.seen[picked] & cols.real, shape)
  s2s, params, initialized = _s2s_term(config, state, cos_m, cols, valid, s2s_active)

  # Memory write to the rows this device owns; last occurrence in the GLOBAL batch wins
  # because every device sees the same gathered batch in the same order.
  memory, seen = losses.write_memory(buffers.memory, buffers.seen, features, local_labels)
  terms = {"s2c": s2c, "s2s": s2s,
           "sampled_classes": jnp.where(cols.real, offset + picked, -1)}
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
  norms = jnp.zeros(embeddings.shape[:1], jnp.float32)
  if config.s2c_loss in ("adaface", "magface"):
    norms = jax.lax.with_sharding_constraint(
        margin_lib.feature_norm(embeddings.astype(jnp.promote_types(embeddings.dtype,
                                                                    jnp.float32))),
        jax.sharding.NamedSharding(mesh, P()))
  if config.s2c_loss == "adaface":
    # mk-minchul/AdaFace head.py updates the statistics first, then uses them.
    stats = state.buffers.s2c_stats
    mean, std = margin_lib.adaface_statistics(norms, stats["norm_mean"], stats["norm_std"],
                                              t_alpha=config.adaface_t_alpha)
    state = state._replace(buffers=state.buffers._replace(
        s2c_stats={"norm_mean": mean, "norm_std": std}))
  terms_specs = {"s2c": P(), "s2s": P(), "sampled_classes": rows}
  fn = jax.shard_map(
      functools.partial(_local_head, config=config, num_sampled_classes=k), mesh=mesh,
      in_specs=(specs, rows, rows, P(), P(), P()), out_specs=(terms_specs, specs))
  return fn(state, embeddings, labels, key, jnp.asarray(s2s_active, jnp.bool_), norms)
