"""Multi-device checks of the sharded head, run by tests/test_head.py in a subprocess.

Run as ``python tests/head_check.py MODE`` with ``XLA_FLAGS`` giving the simulated device
count (it must be set before JAX starts, which is why these checks live in their own
process). Exits non-zero with the failing assertion on any mismatch.

Modes:
  equality N1,N2,...   the head on each device count vs. the single-device loss functions;
                       then: no compiled per-device array has a dimension of C.
  partialfc            sampling keeps every positive; the loss equals the full loss restricted
                       to the sampled classes; unsampled rows of W get no gradient.
  distributed PORT I N OUT   process I of N (jax.distributed on 127.0.0.1:PORT): run the
                       fixed two-step scenario and (process 0) save its results to OUT.
  single OUT           the same scenario in this one process, saved to OUT.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unitsface_jax import head  # noqa: E402
from unitsface_jax import losses  # noqa: E402
from unitsface_jax import parallel  # noqa: E402

NUM_CLASSES, DIM, BATCH = 13, 8, 16


def scenario(seed=0):
  """W, M, seen, embeddings for two steps, and labels with repeats (host NumPy)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
  memory = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
  seen = rng.uniform(size=NUM_CLASSES) < 0.6
  memory[~seen] = 0.0
  emb = rng.normal(size=(2, BATCH, DIM)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (2, BATCH)).astype(np.int32)
  labels[0, 3] = labels[0, 10] = labels[0, 15]  # repeats, across device boundaries
  labels[1, :4] = labels[1, 0]
  return w, memory, seen, emb, labels


def place_state(mesh, config, w, memory, seen, bias=0.0, initialized=False):
  """A head state holding the given (unpadded) arrays, padded and sharded."""
  n = mesh.shape[parallel.DEVICE_AXIS]
  pad = parallel.padded_classes(config.num_classes, n) - config.num_classes
  dtype = jnp.dtype(config.storage_dtype)
  state = head.HeadState(
      head.HeadParams(w=np.pad(w, ((0, pad), (0, 0))).astype(dtype),
                      bias=np.float32(bias), class_bias=np.zeros(w.shape[0] + pad, np.float32)),
      head.HeadBuffers(memory=np.pad(memory, ((0, pad), (0, 0))).astype(dtype),
                       seen=np.pad(seen, (0, pad)), initialized=np.bool_(initialized)))
  return jax.device_put(state, head.head_shardings(mesh))


def sharded_step_fn(config, mesh):
  """jit(value_and_grad) of the objective mean(s2c) + mean(s2s) through ``head_loss``."""

  def objective(params, emb, buffers, labels, key):
    terms, new_state = head.head_loss(head.HeadState(params, buffers), emb, labels,
                                      config=config, mesh=mesh, key=key)
    return jnp.mean(terms["s2c"]) + jnp.mean(terms["s2s"]), (terms, new_state)

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def reference_step(config, w, memory, seen, bias, initialized, emb, labels):
  """The same step from the single-device loss functions on full [B, C] cosines."""

  def objective(w, emb, bias):
    cos_w = losses.cosine_similarity(emb, w)
    if config.s2c_loss == "cosface":
      s2c = losses.cosface(cos_w, labels, scale=config.s2c_scale, margin=config.s2c_margin)
    else:
      s2c = losses.arcface(cos_w, labels, scale=config.s2c_scale, margin=config.s2c_margin,
                           straight_through=config.arcface_straight_through)
    cos_m = losses.cosine_similarity(emb, memory)
    kw = dict(scale=config.s2s_scale, margin=config.s2s_margin, valid=seen)
    has_negative = np.any(seen[None, :] & (np.arange(NUM_CLASSES)[None] != labels[:, None]))
    first = (not initialized) and has_negative
    init = losses.init_threshold_bias(cos_m, labels, scale=config.s2s_scale, valid=seen)
    if config.s2s_loss == "uss":
      b = losses.threshold_bias_for_step(bias, jnp.bool_(not first), init)
      s2s = losses.uss(cos_m, labels, b, form=config.uss_form, **kw)
    elif config.s2s_loss == "s2s_bce":
      b = bias + jax.lax.stop_gradient(init if first else 0.0)  # bias: [C] class biases
      s2s = losses.s2s_bce(cos_m, labels, b, **kw)
    else:
      b = bias
      s2s = losses.s2s_softmax(cos_m, labels, **kw)
    return jnp.mean(s2c) + jnp.mean(s2s), (s2c, s2s, b, first or initialized)

  (value, (s2c, s2s, b, init_flag)), grads = jax.value_and_grad(
      objective, argnums=(0, 1, 2), has_aux=True)(w, emb, bias)
  new_memory, new_seen = losses.write_memory(memory, seen, emb, labels)
  return dict(value=value, s2c=s2c, s2s=s2s, bias=b, initialized=init_flag,
              grad_w=grads[0], grad_emb=grads[1], grad_bias=grads[2],
              memory=new_memory, seen=new_seen)


def close(actual, desired, name, rtol=1e-5):
  """Relative error ≤ rtol with an absolute floor of rtol·max|desired| (sums of terms)."""
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  floor = rtol * max(float(np.max(np.abs(desired))), 1e-30) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=floor, err_msg=name)


def run_sharded(config, mesh, w, memory, seen, emb, labels, steps=2):
  """Two head steps on ``mesh``; per-step results as host NumPy."""
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
                    memory=new_state.buffers.memory, seen=new_state.buffers.seen))
    state = new_state
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)


CONFIGS = {
    "cosface_uss": head.HeadConfig(NUM_CLASSES, DIM),
    "arcface_uss_paper": head.HeadConfig(NUM_CLASSES, DIM, s2c_loss="arcface", s2c_margin=0.5,
                                         uss_form="paper"),
    "cosface_s2s_softmax": head.HeadConfig(NUM_CLASSES, DIM, s2s_loss="s2s_softmax"),
    "cosface_s2s_bce": head.HeadConfig(NUM_CLASSES, DIM, s2s_loss="s2s_bce"),
    "bf16_storage": head.HeadConfig(NUM_CLASSES, DIM, storage_dtype="bfloat16"),
}


def check_equality(device_counts):
  w, memory, seen, emb, labels = scenario()
  for name, config in CONFIGS.items():
    counts = device_counts
    store = jnp.dtype(config.storage_dtype)
    w_ref = np.asarray(jnp.asarray(w, store), np.float32)
    m_ref = np.asarray(jnp.asarray(memory, store), np.float32)
    ref = []
    r_b = np.zeros(NUM_CLASSES, np.float32) if config.s2s_loss == "s2s_bce" else 0.0
    r_m, r_seen, r_init = m_ref, seen, False
    for t in range(2):
      r = reference_step(config, w_ref, r_m, r_seen, r_b, r_init, emb[t], labels[t])
      ref.append(r)
      r_m, r_seen = np.asarray(r["memory"]), np.asarray(r["seen"])
      r_m = np.asarray(jnp.asarray(r_m, store), np.float32)
      r_b = np.asarray(r["bias"], np.float32)
      r_init = bool(r["initialized"])
    for n in counts:
      mesh = parallel.make_mesh(n)
      got = run_sharded(config, mesh, w, memory, seen, emb, labels)
      for t in range(2):
        g, r = got[t], ref[t]
        tag = f"{name} n={n} step={t}"
        close(g["value"], r["value"], f"{tag} objective")
        close(g["s2c"], r["s2c"], f"{tag} s2c")
        close(g["s2s"], r["s2s"], f"{tag} s2s")
        close(g["grad_emb"], r["grad_emb"], f"{tag} d/d embeddings")
        if store == jnp.float32:
          close(g["grad_w"][:NUM_CLASSES], r["grad_w"], f"{tag} d/dW")
        else:  # the gradient of a bf16 W is rounded to bf16 (one rounding: half an ulp)
          close(g["grad_w"][:NUM_CLASSES], r["grad_w"], f"{tag} d/dW", rtol=2.0**-8)
        assert np.all(g["grad_w"][NUM_CLASSES:] == 0), f"{tag} padded rows got gradient"
        if config.s2s_loss == "uss":
          close(g["bias"], r["bias"], f"{tag} new b")
          close(g["grad_bias"], r["grad_bias"], f"{tag} d/db")
        if config.s2s_loss == "s2s_bce":
          close(g["class_bias"][:NUM_CLASSES], r["bias"], f"{tag} new class bias")
          close(g["grad_class_bias"][:NUM_CLASSES], r["grad_bias"], f"{tag} d/d class bias")
        assert bool(g["initialized"]) == bool(r["initialized"]), tag
        np.testing.assert_array_equal(
            g["memory"][:NUM_CLASSES].astype(np.float32),
            np.asarray(jnp.asarray(r["memory"], store), np.float32), err_msg=f"{tag} memory")
        np.testing.assert_array_equal(g["seen"][:NUM_CLASSES], r["seen"], f"{tag} seen")
        assert not g["seen"][NUM_CLASSES:].any(), f"{tag} padded rows written"
      print(f"ok {name} n={n}", flush=True)


def check_no_full_logits():
  """No array in the compiled per-device step has a class dimension of C (only C/n)."""
  num_classes, batch, n = 40, 16, 4
  config = head.HeadConfig(num_classes, DIM)
  mesh = parallel.make_mesh(n)
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, np.ones((num_classes, DIM), np.float32),
                      np.ones((num_classes, DIM), np.float32), np.ones(num_classes, bool))
  batch_sh = parallel.batch_sharding(mesh)
  hlo = step.lower(state.params, jax.device_put(np.ones((batch, DIM), np.float32), batch_sh),
                   state.buffers, jax.device_put(np.zeros(batch, np.int32), batch_sh),
                   jax.random.key(0)).compile().as_text()
  shapes = {tuple(int(d) for d in shape.split(","))
            for shape in re.findall(r"\[([0-9]+(?:,[0-9]+)+)\]", hlo)}
  assert (batch, num_classes // n) in shapes, sorted(shapes)  # local logits are there...
  # ...and no matrix spans all classes (a [C] vector may: the zero gradient of the unused
  # s2s BCE class bias comes out replicated).
  assert not [sh for sh in shapes if num_classes in sh], sorted(shapes)
  print("ok no [B, C] arrays", flush=True)


def check_partialfc():
  """r < 1 on 4 devices: forced positives, restricted-loss equality, no gradient elsewhere."""
  num_classes, batch, n = 64, 8, 4
  config = head.HeadConfig(num_classes, DIM, sample_rate=0.1, s2s_loss="uss")
  local = head.num_local_classes(config, n)
  k = head.num_sampled(config, n, batch)
  assert (local, k) == (16, 8), (local, k)
  rng = np.random.default_rng(1)
  w = rng.normal(size=(num_classes, DIM)).astype(np.float32)
  memory = rng.normal(size=(num_classes, DIM)).astype(np.float32)
  seen = np.ones(num_classes, bool)
  emb = rng.normal(size=(batch, DIM)).astype(np.float32)
  # All 8 positives on device 0: more than ⌈r·16⌉ = 2 random picks would keep.
  labels = np.array([0, 3, 5, 6, 9, 11, 14, 15], np.int32)
  mesh = parallel.make_mesh(n)
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, w, memory, seen, bias=20.0, initialized=True)
  batch_sh = parallel.batch_sharding(mesh)
  negatives_seen = []
  for seed in range(3):
    (value, (terms, _)), (g_params, g_emb) = step(
        state.params, jax.device_put(emb, batch_sh), state.buffers,
        jax.device_put(labels, batch_sh), jax.random.key(seed))
    sampled = np.asarray(terms["sampled_classes"])
    assert sampled.shape == (n * k,), sampled.shape
    kept = sampled[sampled >= 0]
    assert set(labels) <= set(kept.tolist()), (labels, kept)
    assert len(set(kept.tolist())) == len(kept)
    for d in range(1, n):  # other devices sample k random negatives of their 16 rows
      block = sampled[d * k:(d + 1) * k]
      assert np.all((block >= d * local) & (block < (d + 1) * local)), block

    def restricted(w_s, emb):
      # The single-device losses on the sampled columns only (labels re-indexed).
      cls = np.sort(kept)
      y = np.searchsorted(cls, labels)
      s2c = losses.cosface(losses.cosine_similarity(emb, w_s[cls]), y)
      s2s = losses.uss(losses.cosine_similarity(emb, memory[cls]), y, 20.0)
      return jnp.mean(s2c) + jnp.mean(s2s), (s2c, s2s)

    (ref_value, (s2c, s2s)), (ref_gw, ref_ge) = jax.value_and_grad(
        restricted, argnums=(0, 1), has_aux=True)(w, emb)
    close(terms["s2c"], s2c, "partialfc s2c")
    close(terms["s2s"], s2s, "partialfc s2s")
    close(g_emb, ref_ge, "partialfc d/d embeddings")
    gw = np.asarray(g_params.w)
    close(gw, ref_gw, "partialfc d/dW")
    unsampled = np.setdiff1d(np.arange(num_classes), kept)
    assert np.all(gw[unsampled] == 0), "an unsampled row got gradient"
    full = np.abs(gw).sum(1) > 0
    assert full[labels].all(), "a positive row got no gradient"
    negatives_seen.append(tuple(sampled[k:]))
  # Different keys pick different negatives (the sampling is random, not fixed).
  assert len(set(negatives_seen)) > 1, negatives_seen
  print("ok partialfc", flush=True)


def run_scenario_and_save(out):
  """The fixed scenario of the multi-process check; process 0 saves global results."""
  mesh = parallel.make_mesh()
  assert mesh.shape[parallel.DEVICE_AXIS] == 4, mesh
  w, memory, seen, emb, labels = scenario(seed=2)
  config = CONFIGS["cosface_uss"]
  step = sharded_step_fn(config, mesh)
  state = place_state(mesh, config, w, memory, seen)
  per_process = BATCH // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  results = {}
  for t in range(2):
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
  if jax.process_index() == 0:
    np.savez(out, **results)
  print(f"ok process {jax.process_index()}", flush=True)


def main(argv):
  mode = argv[1]
  if mode == "equality":
    check_equality([int(n) for n in argv[2].split(",")])
    check_no_full_logits()
  elif mode == "partialfc":
    check_partialfc()
  elif mode == "distributed":
    port, index, count, out = argv[2], int(argv[3]), int(argv[4]), argv[5]
    parallel.initialize_distributed(f"127.0.0.1:{port}", count, index)
    parallel.initialize_distributed(f"127.0.0.1:{port}", count, index)  # guarded: a no-op
    assert jax.process_count() == count and jax.local_device_count() == 2
    run_scenario_and_save(out)
    jax.distributed.shutdown()
  elif mode == "single":
    run_scenario_and_save(argv[2])
  else:
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
  main(sys.argv)
