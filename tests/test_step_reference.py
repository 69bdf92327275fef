"""The whole train step against the same step written independently in PyTorch.

``train.make_train_step`` (backbone forward/backward with BatchNorm in train mode, the
class-sharded CosFace + USS head, the objective, clip -> coupled decay -> momentum SGD, the
PReLU clamp, b's first value, the memory write) runs three consecutive steps on one device.
Before each of them a PyTorch step, built from the backbone's twin (``export.torch_modules``)
and head maths written here from CVI-SZU/UniTSFace (head.py, backbone.py, train.py), is given
the package's state (weights, BN statistics, W, b, M, seen, momentum) and the same batch.
After the step both must agree on every backbone tensor (by ``export.torch_state_dict`` key),
W, b, M, ``seen``, ``initialized`` and every SGD momentum buffer.

Why each step starts from the package's state rather than the reference's own: a PReLU
input within float32 rounding of 0 takes one branch in one framework and the other branch
in the other, and the gradient jumps (one such input moved a slope's gradient by 1% here).
Two free-running trajectories meet such inputs more often with every step as their weights
drift apart by rounding. From one shared state, rounding is the only difference, and since
the whole state is compared after every step, nothing the package carries from one step to
the next escapes the comparison.

The reference computes in float64 (the twin cast with ``.double()``), so that only the
package's float32 rounding meets such a branch, not a second framework's as well: on an Intel
Xeon (AVX-512) the float32 twin's oneDNN convolutions put one layer2.0 PReLU input of step 2
at +1.5e-7 where exact arithmetic gives -3.2e-7 (layer scale 8.5, under one float32 ulp), and
every gradient below that layer moved by up to 1e-3 of the momentum scale; XLA's float32
step stays within rounding of the float64 twin.

Where the package departs from the official code by design, the reference follows the
package and says so: memory rows never written take no part in the USS terms (the official
``feat_mem`` is uninitialised memory until epoch 0 has written every class), so b needs a
valid negative before it can take its first value.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo
from unitsface_jax import export, optim, parallel, train
from unitsface_jax.data import demo as demo_data
from unitsface_jax.data import pixels, sources

torch = pytest.importorskip("torch")
torch_modules = pytest.importorskip("unitsface_jax.export.torch_modules")

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
# The raw gradient norm of these batches is in the hundreds (s = 64): clipping is active.
CLIP_NORM = 1.0
S2C_SCALE, S2C_MARGIN, S2S_SCALE, S2S_MARGIN = 64.0, 0.4, 64.0, 0.1
PRELU_MIN = 0.01
WIDTH, FEATURES, NUM_CLASSES, IMAGES_PER_CLASS = 4, 32, 40, 8
STEPS_PER_EPOCH = 8
# Labels of the three batches: repeats in every batch (the memory keeps the last occurrence);
# batch 2 mixes classes written by batch 1 with unwritten ones; batch 3 repeats classes.
BATCH_LABELS = ([3, 7, 3, 12, 20, 7, 3, 25],
                [7, 3, 30, 12, 12, 33, 20, 3],
                [25, 30, 7, 3, 33, 33, 12, 9])
# One PReLU slope starts just above the clamp, on a channel whose first update lowers it:
# without the clamp it would end the first step below 0.01 (checked below).
NEAR_CLAMP_LAYER, NEAR_CLAMP_CHANNEL, NEAR_CLAMP_SLOPE = "layer1.0.prelu", 3, 0.0101
# The package's float32 against the float64 reference:
# |package - reference| <= RTOL·|reference| + ATOL_FRACTION·scale, where
# scale is the largest entry of its kind (all backbone tensors; all momentum buffers; W; M).
# The floor is for entries that are zero in exact arithmetic and rounding noise (the
# gradient of a BatchNorm bias that another BatchNorm cancels: 1e-9 against 1e-9), and for
# small gradient entries summed from large terms of both signs. Rounding needs up to 2e-6 of
# the scale here (with one thread or two, XLA's or YNNPACK's convolutions, a float64 twin).
RTOL, ATOL_FRACTION = 1e-4, 1e-5


def step_config():
  config = demo.get_config("smoke")
  config.model.width = WIDTH
  config.model.num_features = FEATURES
  config.model.dropout = 0.0
  config.loss.s2c, config.loss.s2c_scale, config.loss.s2c_margin = "cosface", S2C_SCALE, S2C_MARGIN
  config.loss.s2s, config.loss.s2s_scale, config.loss.s2s_margin = "uss", S2S_SCALE, S2S_MARGIN
  config.loss.uss_start_epoch = 0  # the USS term counts from the first step
  config.loss.w_s2c = config.loss.w_s2s = 1.0
  config.loss.sample_rate = 1.0
  config.optimizer.lr = LR
  config.optimizer.momentum = MOMENTUM
  config.optimizer.weight_decay = WEIGHT_DECAY
  config.optimizer.clip_norm = CLIP_NORM
  config.optimizer.grad_accum_steps = 1
  config.compilation_cache = False
  return config


def demo_batches():
  """Real faces of the bundled demo set (uint8 NHWC) with ``BATCH_LABELS``, each image used
  once."""
  source = sources.RecordIOSource(demo_data.demo_path())
  used = {}
  batches = []
  for labels in BATCH_LABELS:
    images = []
    for label in labels:
      index = label * IMAGES_PER_CLASS + used.get(label, 0)
      used[label] = used.get(label, 0) + 1
      example = source[index]
      assert example["label"] == label
      images.append(pixels.decode_image(example["image"]))
    batches.append((np.stack(images), np.array(labels, np.int32)))
  return batches


def device_pixels(images):
  """The float32 input the train step computes from uint8 pixels on the device.

  The reference is given these very values: XLA's x·(2/255) − 1 may round differently from
  NumPy's in the last bit, which can move a PReLU input across 0 (module docstring). That
  the transform is the official (x/255 − 0.5)/0.5 is checked here, to float32 rounding.
  """
  got = np.asarray(jax.jit(pixels.normalize)(images))
  want = (images.astype(np.float64) / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -22)  # two float32 ulps at 1
  return got


class TorchStep:
  """One UniTSFace training step in PyTorch, all in float64: the backbone twin in train
  mode, the head.

  CosFace: CE(s·(cos(f, W) − m·onehot)), batch mean (head.py ``Normalized_Softmax_Loss``).
  USS, code form: softplus(−clip(s(c_y − m) − b, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b,
  −s, s)) on c = cos(f, M), batch mean (``Unified_Threshold_Integrated_Sample_to_Sample_Loss``),
  over memory rows already written only. While b <= 0 it takes mean_i logsumexp_{j≠y}(s c_ij)
  in the forward pass, and then gets this step's gradient. The memory stores the raw feature
  of each sample after the loss, in batch order, so the last occurrence of a label wins
  (backbone.py ``forward``). SGD with coupled weight decay on every trainable tensor including
  b, after ``clip_grad_norm_``; then PReLU slopes clamped to >= 0.01 (train.py,
  ``restrict_weights``).
  """

  def __init__(self):
    self.net = torch_modules.get_model("iresnet18", width=WIDTH, num_features=FEATURES,
                                       dropout=0.0).train().double()
    self.named = {k: p for k, p in self.net.named_parameters() if p.requires_grad}
    self.w = torch.nn.Parameter(torch.zeros((NUM_CLASSES, FEATURES), dtype=torch.float64))
    self.b = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    self.params = list(self.named.values()) + [self.w, self.b]
    self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM,
                                     weight_decay=WEIGHT_DECAY)

  def load(self, snapshot):
    """Takes the state of a :func:`package_snapshot`."""
    self.net.load_state_dict({k: torch.from_numpy(v) for k, v in snapshot["backbone"].items()},
                             strict=True)
    f64 = lambda a: torch.from_numpy(np.array(a, np.float64))  # noqa: E731
    with torch.no_grad():
      self.w.copy_(f64(snapshot["w"]))
      self.b.copy_(f64(snapshot["b"]))
    self.memory = f64(snapshot["memory"])
    self.seen = torch.from_numpy(np.array(snapshot["seen"]))
    self.initialized = snapshot["initialized"]
    buffers = {self.named[k]: f64(v) for k, v in snapshot["momentum"].items()}
    buffers.update({self.w: f64(snapshot["momentum_w"]), self.b: f64(snapshot["momentum_b"])})
    for p, buffer in buffers.items():
      self.optimizer.state[p] = {"momentum_buffer": buffer}

  @staticmethod
  def _normalize(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-5)

  def step(self, images, labels):
    """``images``: float32 NHWC in [-1, 1] (computed on in float64). Returns the loss terms,
    the raw gradient norm and the PReLU slopes before the clamp."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float64))
    y = torch.from_numpy(labels.astype(np.int64))
    self.optimizer.zero_grad()
    features = self.net(x)
    f = self._normalize(features.double())
    onehot = torch.nn.functional.one_hot(y, NUM_CLASSES).bool()

    cos_w = f @ self._normalize(self.w).T
    s2c = torch.nn.functional.cross_entropy(S2C_SCALE * (cos_w - S2C_MARGIN * onehot), y)

    cos_m = f @ self._normalize(self.memory).T
    valid = self.seen[None, :].expand_as(onehot)
    negatives = ~onehot & valid
    has_negative = negatives.any(dim=1)
    if self.b.item() <= 0 and has_negative.any():
      lse = torch.logsumexp(torch.where(negatives, S2S_SCALE * cos_m, -torch.inf), dim=1)
      with torch.no_grad():
        self.b.fill_(lse[has_negative].mean())
    self.initialized = self.initialized or bool(has_negative.any())
    softplus = lambda z: torch.log(1 + torch.exp(z))  # noqa: E731
    clip = lambda z: z.clamp(min=-S2S_SCALE, max=S2S_SCALE)  # noqa: E731
    cos_y = (cos_m * onehot).sum(dim=1)
    has_positive = (onehot & valid).any(dim=1)
    pos = torch.where(has_positive,
                      softplus(-clip(S2S_SCALE * (cos_y - S2S_MARGIN) - self.b)), 0.0)
    neg = torch.where(negatives, softplus(clip(S2S_SCALE * cos_m - self.b)), 0.0).sum(dim=1)
    s2s = (pos + neg).mean()

    loss = s2c + s2s
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm=CLIP_NORM))
    self.optimizer.step()
    with torch.no_grad():
      unclamped = {k: p.detach().numpy().copy() for k, p in self.named.items()
                   if k.endswith("prelu.weight")}
      for m in self.net.modules():
        if isinstance(m, torch.nn.PReLU):
          m.weight.clamp_(min=PRELU_MIN)
      for i in range(len(y)):
        self.memory[y[i]] = features[i].detach().double()
        self.seen[y[i]] = True
    return {"loss": loss.item(), "s2c": s2c.item(), "s2s": s2s.item(),
            "grad_norm": grad_norm, "unclamped_slopes": unclamped}

  def snapshot(self):
    numpy = lambda t: t.detach().numpy().copy()  # noqa: E731
    buffer = lambda p: numpy(self.optimizer.state[p]["momentum_buffer"])  # noqa: E731
    return {
        "backbone": {k: numpy(v) for k, v in self.net.state_dict().items()
                     if not k.endswith("num_batches_tracked")},
        "momentum": {k: buffer(p) for k, p in self.named.items()},
        "w": numpy(self.w), "b": numpy(self.b),
        "momentum_w": buffer(self.w), "momentum_b": buffer(self.b),
        "memory": numpy(self.memory), "seen": numpy(self.seen),
        "initialized": self.initialized}


def package_snapshot(state, graphdef, rng_state, param_keys):
  """The package's train state under the reference's names (NumPy copies: the step donates
  its input state)."""
  def as_torch(tree):
    return export.torch_state_dict(
        nnx.merge(graphdef, tree, state.model_state, rng_state, copy=True))
  trace = optax.tree_utils.tree_get(state.opt_state, "trace")
  momentum = as_torch(trace["backbone"])
  head, buffers = state.params["head"], state.head_buffers
  return {
      "backbone": as_torch(state.params["backbone"]),
      "momentum": {k: momentum[k] for k in param_keys},
      "w": np.array(head.w), "b": np.array(head.bias),
      "momentum_w": np.array(trace["head"].w), "momentum_b": np.array(trace["head"].bias),
      "memory": np.array(buffers.memory), "seen": np.array(buffers.seen),
      "initialized": bool(buffers.initialized)}


def assert_close(got, want, what, scale=None):
  """``got`` within RTOL of ``want``, with the floor ATOL_FRACTION·``scale`` (default: the
  largest entry of ``want``)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = np.max(np.abs(want)) if scale is None else scale
  allowed = RTOL * np.abs(want) + ATOL_FRACTION * scale
  err = np.abs(got - want)
  worst = np.unravel_index(np.argmax(err - allowed), err.shape)
  assert np.all(err <= allowed), (
      f"{what}: |package - reference| = {err[worst]:.3g} at {worst} (package "
      f"{got[worst]:.8g}, reference {want[worst]:.8g}, allowed {allowed[worst]:.3g})")


def largest(tensors):
  return max(np.max(np.abs(t)) for t in tensors)


@pytest.mark.slow
def test_three_steps_match_an_independent_pytorch_step():
  config = step_config()
  mesh = parallel.make_mesh(1)
  tx = optim.sgd(config, STEPS_PER_EPOCH)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(0))
  slope = state.params["backbone"]["layer1"][0]["prelu"]["slope"]
  slope[...] = slope[...].at[NEAR_CLAMP_CHANNEL].set(NEAR_CLAMP_SLOPE)
  step = train.make_train_step(config, mesh, graphdef, rng_state, tx, STEPS_PER_EPOCH)

  reference = TorchStep()
  param_keys = list(reference.named)
  got = package_snapshot(state, graphdef, rng_state, param_keys)
  # The frozen BN scale is state, not a parameter, in both: the package optimises exactly the
  # tensors the twin trains.
  assert "features.weight" in got["backbone"] and "features.weight" not in param_keys
  assert len(jax.tree.leaves(state.params["backbone"])) == len(param_keys)

  grad_norms = []
  for i, (images, labels) in enumerate(demo_batches()):
    where = f"step {i + 1}"
    reference.load(got)
    ref = reference.step(device_pixels(images), labels)
    state, metrics = step(state, train.Batch(images, labels))
    got, want = package_snapshot(state, graphdef, rng_state, param_keys), reference.snapshot()

    # The multistep schedule has no decay in these steps: the reference's lr throughout.
    assert float(metrics["lr"]) == pytest.approx(LR), where
    for name in ("loss", "s2c", "s2s", "grad_norm"):
      assert_close(metrics[name], ref[name], f"{where} {name}")
    grad_norms.append(ref["grad_norm"])

    assert got["backbone"].keys() == want["backbone"].keys()
    scale = largest(want["backbone"].values())
    for key in want["backbone"]:
      assert_close(got["backbone"][key], want["backbone"][key], f"{where} {key}", scale)
    scale = largest([*want["momentum"].values(), want["momentum_w"], want["momentum_b"]])
    for key in param_keys:
      assert_close(got["momentum"][key], want["momentum"][key], f"{where} momentum {key}",
                   scale)
    for name in ("momentum_w", "momentum_b"):
      assert_close(got[name], want[name], f"{where} {name}", scale)
    for name in ("w", "b", "memory"):
      assert_close(got[name], want[name], f"{where} {name}")
    np.testing.assert_array_equal(got["seen"], want["seen"], err_msg=where)
    assert got["initialized"] == want["initialized"], where

    if i == 0:
      # Nothing in memory before the first step: the USS term is empty and b is not set.
      assert not got["initialized"] and float(got["b"]) == 0.0
      # The clamp acted: without it the slope would be below 0.01 by far more than the
      # tolerance.
      key = f"{NEAR_CLAMP_LAYER}.weight"
      assert ref["unclamped_slopes"][key][NEAR_CLAMP_CHANNEL] < PRELU_MIN - 1e-4
      assert got["backbone"][key][NEAR_CLAMP_CHANNEL] == pytest.approx(PRELU_MIN)
    if i == 1:
      assert got["initialized"] and float(got["b"]) > 0.0
  assert max(grad_norms) > CLIP_NORM, grad_norms
