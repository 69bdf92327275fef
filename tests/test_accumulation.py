"""Gradient accumulation: k micro-batches make one SGD step on their mean gradient, and the
learning-rate schedule counts those steps, not micro-batches.

The reference is built here from the parts, not from the train step: the loss is the
backbone plus ``head.head_loss`` differentiated with ``jax.grad`` one micro-batch at a time,
and torch.optim.SGD's update (global-norm clip, coupled weight decay, momentum, then the
PReLU clamp) is applied by hand in float64 NumPy. The scenario stays CosFace-only (the USS
term starts in a later epoch), so the memory bank written by one micro-batch does not enter
the next one's loss; BatchNorm in training mode normalises with the micro-batch's own
statistics, so the running statistics each micro-batch updates do not either. Each
update's reference starts from the parameters the train step had before it (and carries its
own momentum): at this scenario's gradient norm of ~400 and lr 0.05 one update moves the
weights far, and a rounding difference compounded over updates grows to percents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_backbone
from configs import demo
from unitsface_jax import head
from unitsface_jax import models
from unitsface_jax import optim
from unitsface_jax import parallel
from unitsface_jax import train
from unitsface_jax.data import demo as demo_data
from unitsface_jax.data import pixels
from unitsface_jax.data import sources

# These tests compile and train the step: collected first.
pytestmark = pytest.mark.slow

K = 2  # micro-batches per update
UPDATES = 3
STEPS_PER_EPOCH = 2 * K  # train steps (micro-batches): two updates an epoch
LR = 0.05
DECAY = 0.1  # at epoch 1, i.e. from the third update on


def _config():
  config = demo.get_config("smoke")
  config.update_from_flattened_dict(tiny_backbone.CONFIG)  # BatchNorm, PReLU: the step's parts
  config.optimizer.grad_accum_steps = K
  config.optimizer.lr = LR
  config.schedule.decay_epochs = (1,)
  config.schedule.decay_factor = DECAY
  config.loss.uss_start_epoch = 100
  return config


def _micro_batches():
  """UPDATES·K batches of the demo's identities 0-7: batch j holds image j of each, so all
  of them have the same labels and differ in their pixels."""
  source = sources.RecordIOSource(demo_data.demo_path())
  by_label = {}
  for i in range(len(source)):
    example = source[i]
    if example["label"] < 8:
      by_label.setdefault(example["label"], []).append(pixels.decode_image(example["image"]))
  labels = np.arange(8, dtype=np.int32)
  return [(np.stack([by_label[c][j] for c in labels]), labels) for j in range(UPDATES * K)]


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _reference_gradient_fn(config, mesh, graphdef, rng_state):
  """(params, model_state, head_buffers, images, labels) -> (gradient, model_state,
  head_buffers): the CosFace loss of one micro-batch differentiated by ``jax.grad``."""
  head_config = train.head_config(config)

  def loss(params, model_state, buffers, images, labels):
    model = nnx.merge(graphdef, params["backbone"], model_state, rng_state, copy=True)
    embeddings = model(pixels.normalize(images))
    terms, new_head = head.head_loss(head.HeadState(params["head"], buffers), embeddings,
                                     labels, config=head_config, mesh=mesh, s2s_active=False)
    return jnp.mean(terms["s2c"]), (nnx.state(model, models.MODEL_STATE), new_head.buffers)

  return jax.jit(jax.grad(loss, has_aux=True))


def _sgd_update(params, gradient, momentum, lr, config):
  """torch.optim.SGD after clip_grad_norm_, then the PReLU clamp, on flat float64 dicts."""
  norm = np.sqrt(sum(np.sum(g ** 2) for g in gradient.values()))
  clip = min(1.0, config.optimizer.clip_norm / norm)
  new_params, new_momentum = {}, {}
  for name, p in params.items():
    d = clip * gradient[name] + config.optimizer.weight_decay * p
    buf = d if momentum is None else config.optimizer.momentum * momentum[name] + d
    new = p - lr * buf
    new_params[name] = np.maximum(new, 0.01) if "'slope'" in name else new
    new_momentum[name] = buf
  return new_params, new_momentum


def _assert_close(got, want, what, atol):
  """Equal up to float32 rounding (the train step's program and the reference's add in
  different orders): within 1e-4 of each array's largest entry, or ``atol``."""
  for name in want:
    floor = max(1e-4 * float(np.max(np.abs(want[name]))), atol)
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=floor,
                               err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def accumulated():
  """The train step's states and metrics after every micro-batch; per update, the reference
  update from the parameters the train step had before it, with the reference's own
  momentum, and the reference's BN statistics and memory bank after its micro-batches."""
  config = _config()
  batches = _micro_batches()
  mesh = parallel.make_mesh(1)
  # Set from the first update's gradient below; the threshold takes no part in the state's
  # layout, so the state built here serves the optimiser configured then.
  config.optimizer.clip_norm = 1.0
  graphdef, rng_state, state = train.init_state(
      config, mesh, optim.sgd(config, STEPS_PER_EPOCH), jax.random.key(0))
  initial = jax.device_get(state)  # the train step donates its state
  grad_fn = _reference_gradient_fn(config, mesh, graphdef, rng_state)
  tree = jax.tree.structure(initial.params)
  model_state, buffers = initial.model_state, initial.head_buffers

  def mean_gradient(params, u):
    nonlocal model_state, buffers
    params = jax.tree.unflatten(tree, [jnp.asarray(v, jnp.float32) for v in params.values()])
    gradients = []
    for images, labels in batches[u * K:(u + 1) * K]:
      g, (model_state, buffers) = grad_fn(params, model_state, buffers, images, labels)
      gradients.append(_flat(g))
    return {n: np.mean([g[n] for g in gradients], 0) for n in gradients[0]}

  means = [mean_gradient(_flat(initial.params), 0)]
  # Above the first mean gradient's norm and below K times it: that update is not clipped,
  # and one on the sum of the K gradients would be.
  norm = np.sqrt(sum(np.sum(g ** 2) for g in means[0].values()))
  config.optimizer.clip_norm = float(1.5 * norm)
  step = train.make_train_step(config, mesh, graphdef, rng_state,
                               optim.sgd(config, STEPS_PER_EPOCH), STEPS_PER_EPOCH)
  states, metrics = [], []
  for images, labels in batches:
    state, m = step(state, train.Batch(images, labels))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))

  # Each update from the parameters before it (an error stays in its own update instead of
  # compounding: a mean gradient norm of ~400 at lr 0.05 moves the weights far each update).
  reference = {"before": [], "after": [], "lr": [], "model_state": [], "memory": []}
  momentum = None
  for u in range(UPDATES):
    before = _flat(initial.params if u == 0 else states[u * K - 1].params)
    if u:
      means.append(mean_gradient(before, u))
    lr = LR * (DECAY if u * K >= STEPS_PER_EPOCH else 1.0)
    after, momentum = _sgd_update(before, means[u], momentum, lr, config)
    reference["before"].append(before)
    reference["after"].append(after)
    reference["lr"].append(lr)
    reference["model_state"].append(_flat(model_state))
    reference["memory"].append({"memory": np.asarray(buffers.memory, np.float64)})
  return {"states": states, "metrics": metrics, "reference": reference, "norm": norm,
          "clip": config.optimizer.clip_norm}


def test_parameters_change_only_on_every_kth_micro_batch(accumulated):
  states = accumulated["states"]
  before = accumulated["reference"]["before"][0]
  for s, state in enumerate(states):
    params = _flat(state.params)
    if (s + 1) % K:  # inside an accumulation: exactly as after the last update
      for name, value in params.items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"micro-batch {s}: {name}")
    else:
      assert any(not np.array_equal(value, before[name]) for name, value in params.items())
      before = params


def test_each_update_is_one_sgd_step_on_the_mean_gradient_of_its_micro_batches(accumulated):
  norm, clip = accumulated["norm"], accumulated["clip"]
  assert norm < clip < K * norm  # the scenario: a summed gradient would be clipped
  reference = accumulated["reference"]
  for u in range(UPDATES):
    start = reference["before"][u]
    got = {n: v - start[n] for n, v in _flat(accumulated["states"][(u + 1) * K - 1].params).items()}
    want = {n: v - start[n] for n, v in reference["after"][u].items()}
    # Rounding scales with the gradient as a whole, not with each array: the changes of
    # arrays whose gradient is zero in exact arithmetic (the bias of a BatchNorm that another
    # BatchNorm follows) are rounding noise, within 1e-4 of the update's largest change.
    largest = max(float(np.max(np.abs(w))) for w in want.values())
    _assert_close(got, want, f"update {u}", atol=1e-4 * largest)


def test_schedule_counts_updates_not_micro_batches(accumulated):
  """Multistep decay at epoch 1 = micro-batch 4 = update 2: the updates use lr, lr, lr/10
  (the test above checks the changes they made) and the logged lr follows the update."""
  assert accumulated["reference"]["lr"] == [LR, LR, LR * DECAY]
  logged = [float(m["lr"]) for m in accumulated["metrics"]]
  np.testing.assert_allclose(logged, [LR] * 4 + [LR * DECAY] * 2, rtol=1e-6)


def test_batchnorm_statistics_and_memory_bank_follow_every_micro_batch(accumulated):
  reference = accumulated["reference"]
  for u in range(UPDATES):
    state = accumulated["states"][(u + 1) * K - 1]
    # Running means of normalised activations are zero in exact arithmetic: ~1e-8 noise.
    _assert_close(_flat(state.model_state), reference["model_state"][u], f"update {u}",
                  atol=1e-6)
    _assert_close({"memory": np.asarray(state.head_buffers.memory, np.float64)},
                  reference["memory"][u], f"update {u}", atol=1e-6)


def test_micro_batches_with_the_same_labels_have_different_fingerprints(accumulated):
  fingerprints = [int(m["data_fingerprint"]) for m in accumulated["metrics"]]
  assert len(set(fingerprints)) == len(fingerprints), fingerprints
