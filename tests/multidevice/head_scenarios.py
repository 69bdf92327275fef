"""Scenarios and single-device references for the sharded-head tests (no assertions here).

Imported by ``test_head_sharded.py``; also run as a script by ``tests/test_head.py`` to run
the fixed scenario in one process of four devices or in two ``jax.distributed`` processes of
two (the device count must be set before JAX starts, so each needs its own process):

  python tests/multidevice/head_scenarios.py distributed PORT I N OUT
      process I of N (jax.distributed on 127.0.0.1:PORT); process 0 saves the results to
      OUT (.npz) and the topology it saw to OUT with suffix .json.
  python tests/multidevice/head_scenarios.py single OUT
      the same in this one process.
"""

import json
import os
import pathlib
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unitsface_jax import head  # noqa: E402
from unitsface_jax import losses  # noqa: E402
from unitsface_jax import parallel  # noqa: E402

# 13 classes: no device count of 2, 4 or 8 divides them, so every sharded run pads W and M.
NUM_CLASSES, DIM, BATCH = 13, 8, 16
STEPS = 2  # step 0 initialises the threshold b and writes M; step 1 reads what it wrote

CONFIGS = {
    "cosface_uss": head.HeadConfig(NUM_CLASSES, DIM),
    "arcface_uss_paper": head.HeadConfig(NUM_CLASSES, DIM, s2c_loss="arcface", s2c_margin=0.5,
                                         uss_form="paper"),
    "cosface_s2s_softmax": head.HeadConfig(NUM_CLASSES, DIM, s2s_loss="s2s_softmax"),
    "cosface_s2s_bce": head.HeadConfig(NUM_CLASSES, DIM, s2s_loss="s2s_bce"),
    "bf16_storage": head.HeadConfig(NUM_CLASSES, DIM, storage_dtype="bfloat16"),
}


def scenario(seed=0):
  """W, M, seen, embeddings for two steps, and labels with repeats (host NumPy)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
  memory = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
  seen = rng.uniform(size=NUM_CLASSES) < 0.6
  memory[~seen] = 0.0
  emb = rng.normal(size=(STEPS, BATCH, DIM)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (STEPS, BATCH)).astype(np.int32)
  labels[0, 3] = labels[0, 10] = labels[0, 15]  # repeats, across device boundaries
  labels[1, :4] = labels[1, 0]
  return w, memory, seen, emb, labels


def place_state(mesh, config, w, memory, seen, bias=0.0, initialized=False):
  """A head state holding the given (unpadded) arrays, padded and sharded; the loss's own
  bias and statistics at their initial values."""
  n = mesh.shape[parallel.DEVICE_AXIS]
  padded = parallel.padded_classes(config.num_classes, n)
  pad = padded - config.num_classes
  dtype = jnp.dtype(config.storage_dtype)
  s2c_bias, s2c_stats = head.s2c_initial_state(config, padded)
  state = head.HeadState(
      head.HeadParams(w=np.pad(w, ((0, pad), (0, 0))).astype(dtype),
                      bias=np.float32(bias), class_bias=np.zeros(w.shape[0] + pad, np.float32),
                      s2c_bias=s2c_bias),
      head.HeadBuffers(memory=np.pad(memory, ((0, pad), (0, 0))).astype(dtype),
                       seen=np.pad(seen, (0, pad)), initialized=np.bool_(initialized),
                       s2c_stats=s2c_stats))
  return jax.device_put(state, head.head_shardings(mesh, config))


def sharded_step_fn(config, mesh):
  """jit(value_and_grad) of the objective mean(s2c) + mean(s2s) through ``head_loss``."""

  def objective(params, emb, buffers, labels, key):
    terms, new_state = head.head_loss(head.HeadState(params, buffers), emb, labels,
                                      config=config, mesh=mesh, key=key)
    return jnp.mean(terms["s2c"]) + jnp.mean(terms["s2s"]), (terms, new_state)

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def reference_s2c(config, w, emb, labels, s2c_bias, stats):
  """The sample-to-class loss [B] from the single-device functions, and the statistics
  after this batch (updated before use, as the references do)."""
  cos_w = losses.cosine_similarity(emb, w)
  name, s, m = config.s2c_loss, config.s2c_scale, config.s2c_margin
  if name == "cosface":
    return losses.cosface(cos_w, labels, scale=s, margin=m), stats
  if name == "arcface":
    return losses.arcface(cos_w, labels, scale=s, margin=m,
                          straight_through=config.arcface_straight_through), stats
  if name == "combined" and config.combined_form == "arcface_torch":
    # insightface's CombinedMarginLoss: CosFace with m3, or ArcFace with a gradient-free m2.
    if config.combined_m3 > 0:
      return losses.cosface(cos_w, labels, scale=s, margin=config.combined_m3), stats
    return losses.arcface(cos_w, labels, scale=s, margin=config.combined_m2,
                          straight_through=True), stats
  if name == "combined":
    return losses.combined_margin(cos_w, labels, scale=s, m1=config.combined_m1,
                                  m2=config.combined_m2, m3=config.combined_m3,
                                  straight_through=config.arcface_straight_through), stats
  if name == "normalized_bce":
    return losses.normalized_bce(cos_w, labels, s2c_bias["bias"], scale=s, margin=m), stats
  if name == "uce":
    return losses.uce(cos_w, labels, s2c_bias["bias"], scale=s, margin=m), stats
  norms = losses.feature_norm(emb)
  if name == "adaface":
    mean, std = losses.adaface_statistics(norms, stats["norm_mean"], stats["norm_std"],
                                          t_alpha=config.adaface_t_alpha)
    return losses.adaface(cos_w, labels, norms, mean, std, scale=s, margin=m,
                          h=config.adaface_h), {"norm_mean": mean, "norm_std": std}
  if name == "curricularface":
    t = losses.curricular_t(stats["t"], cos_w[jnp.arange(labels.shape[0]), labels],
                            alpha=config.curricular_alpha)
    return losses.curricularface(cos_w, labels, t, scale=s, margin=m), {"t": t}
  if name == "magface":
    return losses.magface(cos_w, labels, norms, scale=s, l_a=config.magface_l_a,
                          u_a=config.magface_u_a, l_m=config.magface_l_m,
                          u_m=config.magface_u_m, lambda_g=config.magface_lambda_g), stats
  raise ValueError(name)


def reference_step(config, w, memory, seen, bias, initialized, emb, labels, s2c_bias=None,
                   stats=None):
  """The same step from the single-device loss functions on full [B, C] cosines."""
  s2c_bias = {} if s2c_bias is None else s2c_bias
  stats = {} if stats is None else stats

  def objective(w, emb, bias, s2c_bias):
    s2c, new_stats = reference_s2c(config, w, emb, labels, s2c_bias, stats)
    cos_m = losses.cosine_similarity(emb, memory)
    kw = dict(scale=config.s2s_scale, margin=config.s2s_margin, valid=seen)
    has_negative = np.any(seen[None, :] & (np.arange(NUM_CLASSES)[None] != labels[:, None]))
    first = (not initialized) and has_negative
    init = losses.init_threshold_bias(cos_m, labels, scale=config.s2s_scale, valid=seen)
    if config.s2s_loss == "uss":
      b = losses.threshold_bias_for_step(bias, init, first_use=jnp.bool_(first))
      s2s = losses.uss(cos_m, labels, b, form=config.uss_form, **kw)
    elif config.s2s_loss == "s2s_bce":
      b = bias + jax.lax.stop_gradient(init if first else 0.0)  # bias: [C] class biases
      s2s = losses.s2s_bce(cos_m, labels, b, **kw)
    elif config.s2s_loss == "none":
      b, s2s = bias, jnp.zeros_like(s2c)
    else:
      b = bias
      s2s = losses.s2s_softmax(cos_m, labels, **kw)
    return jnp.mean(s2c) + jnp.mean(s2s), (s2c, s2s, b, first or initialized, new_stats)

  (value, (s2c, s2s, b, init_flag, new_stats)), grads = jax.value_and_grad(
      objective, argnums=(0, 1, 2, 3), has_aux=True)(w, emb, bias, s2c_bias)
  new_memory, new_seen = losses.write_memory(memory, seen, emb, labels)
  return dict(value=value, s2c=s2c, s2s=s2s, bias=b, initialized=init_flag,
              grad_w=grads[0], grad_emb=grads[1], grad_bias=grads[2],
              memory=new_memory, seen=new_seen, s2c_stats=new_stats,
              grad_s2c_bias=grads[3])


def reference_run(config, w, memory, seen, emb, labels):
  """``STEPS`` reference steps, each starting from the state the previous one left.

  W and M are rounded to the storage dtype as the head stores them, so ``memory`` is the
  bank the head should hold after each step. Per-step results as host NumPy.
  """
  store = jnp.dtype(config.storage_dtype)

  def stored(x):
    return np.asarray(jnp.asarray(x, store), np.float32)

  w_ref = stored(w)
  bias = np.zeros(NUM_CLASSES, np.float32) if config.s2s_loss == "s2s_bce" else 0.0
  memory, initialized = stored(memory), False
  s2c_bias, stats = head.s2c_initial_state(config, NUM_CLASSES)
  out = []
  for t in range(STEPS):
    r = reference_step(config, w_ref, memory, seen, bias, initialized, emb[t], labels[t],
                       s2c_bias, stats)
    r = jax.tree.map(np.asarray, r)
    r["memory"] = stored(r["memory"])
    out.append(r)
    memory, seen = r["memory"], r["seen"]
    bias = r["bias"].astype(np.float32)
    initialized = bool(r["initialized"])
    stats = r["s2c_stats"]
  return out


def run_sharded(config, mesh, w, memory, seen, emb, labels, steps=STEPS):
  """Head steps on ``mesh``, each from the state the previous one left; host NumPy."""
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, w, memory, seen)
  batch = parallel.batch_sharding(mesh)
  out = []
  for t in range(steps):
    e = jax.device_put(emb[t], batch)
    y = jax.device_put(labels[t], batch)
    (value, (terms, new_state)), (g_params, g_emb) = step(
        state.params, e, state.buffers, y, jax.random.key(t))
    out.append(dict(value=value, s2c=terms["s2c"], s2s=terms["s2s"],
                    bias=new_state.params.bias, initialized=new_state.buffers.initialized,
                    grad_w=g_params.w, grad_emb=g_emb, grad_bias=g_params.bias,
                    grad_class_bias=g_params.class_bias, class_bias=new_state.params.class_bias,
                    memory=new_state.buffers.memory, seen=new_state.buffers.seen,
                    s2c_stats=new_state.buffers.s2c_stats, grad_s2c_bias=g_params.s2c_bias))
    state = new_state
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)


def compiled_array_shapes(num_classes, batch, n):
  """Every array shape of rank ≥ 2 in the compiled per-device step on ``n`` devices."""
  config = head.HeadConfig(num_classes, DIM)
  mesh = parallel.make_mesh(n)
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, np.ones((num_classes, DIM), np.float32),
                      np.ones((num_classes, DIM), np.float32), np.ones(num_classes, bool))
  batch_sh = parallel.batch_sharding(mesh)
  hlo = step.lower(state.params, jax.device_put(np.ones((batch, DIM), np.float32), batch_sh),
                   state.buffers, jax.device_put(np.zeros(batch, np.int32), batch_sh),
                   jax.random.key(0)).compile().as_text()
  return {tuple(int(d) for d in shape.split(","))
          for shape in re.findall(r"\[([0-9]+(?:,[0-9]+)+)\]", hlo)}


# PartialFC: r = 0.1 of 64 classes on 4 devices, every positive on device 0 (8 of its 16 rows,
# more than the ⌈r·16⌉ = 2 random picks would keep), threshold b = 20 already initialised.
PFC_CLASSES, PFC_BATCH, PFC_DEVICES, PFC_BIAS = 64, 8, 4, 20.0
PFC_CONFIG = head.HeadConfig(PFC_CLASSES, DIM, sample_rate=0.1, s2s_loss="uss")
PFC_LABELS = np.array([0, 3, 5, 6, 9, 11, 14, 15], np.int32)


def partial_fc_scenario():
  """W, M, embeddings for the PartialFC scenario (host NumPy; every class seen)."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(PFC_CLASSES, DIM)).astype(np.float32)
  memory = rng.normal(size=(PFC_CLASSES, DIM)).astype(np.float32)
  emb = rng.normal(size=(PFC_BATCH, DIM)).astype(np.float32)
  return w, memory, emb


def partial_fc_steps(seeds, config=PFC_CONFIG):
  """One sampled head step per key seed, all from the same state; host NumPy per seed."""
  w, memory, emb = partial_fc_scenario()
  mesh = parallel.make_mesh(PFC_DEVICES)
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, w, memory, np.ones(PFC_CLASSES, bool), bias=PFC_BIAS,
                      initialized=True)
  batch_sh = parallel.batch_sharding(mesh)
  out = {}
  for seed in seeds:
    (_, (terms, _)), (g_params, g_emb) = step(
        state.params, jax.device_put(emb, batch_sh), state.buffers,
        jax.device_put(PFC_LABELS, batch_sh), jax.random.key(seed))
    out[seed] = jax.tree.map(np.asarray, dict(
        sampled=terms["sampled_classes"], s2c=terms["s2c"], s2s=terms["s2s"],
        grad_w=g_params.w, grad_emb=g_emb, grad_s2c_bias=g_params.s2c_bias))
  return out


def partial_fc_restricted_reference(kept, config=PFC_CONFIG):
  """The single-device losses on the sampled classes ``kept`` only (labels re-indexed)."""
  w, memory, emb = partial_fc_scenario()
  cls = np.sort(kept)
  y = np.searchsorted(cls, PFC_LABELS)
  s2c_bias, stats = head.s2c_initial_state(config, PFC_CLASSES)

  def restricted(w_s, emb, s2c_bias):
    restricted_bias = jax.tree.map(lambda b: b[cls] if b.ndim else b, s2c_bias)
    s2c, _ = reference_s2c(config, w_s[cls], emb, y, restricted_bias, stats)
    s2s = losses.uss(losses.cosine_similarity(emb, memory[cls]), y, PFC_BIAS)
    return jnp.mean(s2c) + jnp.mean(s2s), (s2c, s2s)

  (_, (s2c, s2s)), (grad_w, grad_emb, grad_s2c_bias) = jax.value_and_grad(
      restricted, argnums=(0, 1, 2), has_aux=True)(w, emb, s2c_bias)
  return jax.tree.map(np.asarray, dict(s2c=s2c, s2s=s2s, grad_w=grad_w, grad_emb=grad_emb,
                                       grad_s2c_bias=grad_s2c_bias))


def run_fixed_scenario(mesh):
  """Two cosface_uss steps on ``mesh`` from this process's rows of the global batch.

  Returns the global results (losses, gradients, new b, memory and seen per step) as host
  NumPy, keyed ``<name>_<step>``.
  """
  w, memory, seen, emb, labels = scenario(seed=2)
  config = CONFIGS["cosface_uss"]
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, w, memory, seen)
  per_process = BATCH // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  results = {}
  for t in range(STEPS):
    e, y = parallel.global_batch((emb[t][rows], labels[t][rows]), mesh)
    (value, (terms, new_state)), (g_params, g_emb) = step(
        state.params, e, state.buffers, y, jax.random.key(t))
    gathered = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))(
        dict(value=value, s2c=terms["s2c"], s2s=terms["s2s"], bias=new_state.params.bias,
             grad_w=g_params.w, grad_emb=g_emb, grad_bias=g_params.bias,
             memory=new_state.buffers.memory, seen=new_state.buffers.seen))
    for key, val in gathered.items():
      results[f"{key}_{t}"] = np.asarray(val.addressable_data(0))
    state = new_state
  return results


def save_fixed_scenario(out):
  """``run_fixed_scenario`` on every device; process 0 saves results and topology."""
  mesh = parallel.make_mesh()
  results = run_fixed_scenario(mesh)
  if jax.process_index() == 0:
    out = pathlib.Path(out)
    np.savez(out, **results)
    out.with_suffix(".json").write_text(json.dumps(dict(
        process_count=jax.process_count(), local_device_count=jax.local_device_count(),
        mesh_devices=int(mesh.devices.size))))


def main(argv):
  mode = argv[1]
  if mode == "distributed":
    port, index, count, out = argv[2], int(argv[3]), int(argv[4]), argv[5]
    parallel.initialize_distributed(f"127.0.0.1:{port}", count, index)
    parallel.initialize_distributed(f"127.0.0.1:{port}", count, index)  # guarded: a no-op
    save_fixed_scenario(out)
    jax.distributed.shutdown()
  elif mode == "single":
    save_fixed_scenario(argv[2])
  else:
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
  main(sys.argv)
