"""Backbones: architecture sizes, BatchNorm semantics, train/eval modes, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_weights
import tiny_backbone
from unitsface_jax import cpu_tuning, models
from unitsface_jax.models import BatchNorm, Frozen, layers, mobilefacenet, vit

# Published parameter counts (millions) and GMACs of insightface's IResNets.
EXPECTED_PARAMS_M = {"iresnet18": 24.03, "iresnet34": 34.14, "iresnet50": 43.59,
                     "iresnet100": 65.16, "iresnet200": 118.83}
EXPECTED_GMACS = {"iresnet50": 6.31, "iresnet100": 12.09}


def abstract(name, **kwargs):
  return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_M))
def test_iresnet_parameter_counts_match_insightface(name):
  assert round(models.count_params(abstract(name)) / 1e6, 2) == EXPECTED_PARAMS_M[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_GMACS))
def test_macs_per_image_within_one_percent(name):
  macs = models.macs_per_image(abstract(name)) / 1e9
  assert macs == pytest.approx(EXPECTED_GMACS[name], rel=0.01)


def test_unknown_model_and_dtype_are_refused():
  with pytest.raises(ValueError, match="unknown model 'resnet50'.*iresnet50"):
    models.create("resnet50", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype"):
    models.create("iresnet18", rngs=nnx.Rngs(0), dtype="float16")


@pytest.mark.parametrize("name", ["iresnet18", "lresnet50_eir"])
def test_width_scales_every_stage_and_the_embedding_layer(name):
  narrow, full = abstract(name, width=16), abstract(name)
  assert narrow.conv1.kernel.shape == (3, 3, 3, 16)
  assert narrow.layer4[0].conv2.kernel.shape[-1] == 128  # 8 x width
  out = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), width=16,
                                             num_features=128)(jnp.zeros((2, 112, 112, 3))))
  assert out.shape == (2, 128)
  # The trunk's convolutions scale with width^2: a quarter width is ~1/16 of the MACs.
  ratio = models.macs_per_image(narrow) / models.macs_per_image(full)
  assert 1 / 17 < ratio < 1 / 15, ratio
  with pytest.raises(ValueError, match="width must be a positive"):
    models.create(name, rngs=nnx.Rngs(0), width=0)


def test_wrong_input_shape_is_refused():
  model = models.create_abstract("iresnet18")  # refused before any weight is read
  with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\].*\(2, 3, 112, 112\)"):
    model(jnp.zeros((2, 3, 112, 112)))


@pytest.mark.parametrize("name,frozen_key", [("iresnet18", "features"),
                                             ("lresnet50_eir", "bn5")])
def test_frozen_embedding_scale_is_state_not_param(name, frozen_key):
  model = abstract(name)
  params = nnx.state(model, nnx.Param)
  frozen = nnx.state(model, Frozen)
  assert "scale" not in params[frozen_key]
  assert list(jax.tree.leaves(frozen)) and frozen[frozen_key]["scale"].shape == (512,)
  # Saved: the full state (what a checkpoint holds) has it.
  assert "scale" in nnx.state(model)[frozen_key]


def test_lresnet_init_matches_official_code():
  model = models.create("lresnet50_eir", rngs=nnx.Rngs(0))
  for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
    for block in stage:
      np.testing.assert_array_equal(block.bn2.scale[...], 0.0)  # zero_init_residual
      np.testing.assert_array_equal(block.prelu.slope[...], 0.25)
  # Every stride-2 conv is 2x2 without padding; the stem stays 3x3.
  assert model.layer2[0].conv2.kernel.shape == (2, 2, 128, 128)
  assert model.layer2[0].downsample[0].kernel.shape == (2, 2, 64, 128)
  assert model.layer2[1].conv2.kernel.shape == (3, 3, 128, 128)
  assert model.conv1.kernel.shape == (3, 3, 3, 64)
  # kaiming normal (a=1, fan_in): std = 1/sqrt(fan_in).
  k = np.asarray(model.layer3[1].conv1.kernel[...])
  assert k.std() == pytest.approx(1 / np.sqrt(9 * 256), rel=0.05)


def test_batchnorm_matches_pytorch_training_update():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  x = rng.normal(1.5, 2.0, (4, 5, 6, 8)).astype(np.float32)
  bn = BatchNorm(8)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.uniform(-1, 1, 8), jnp.float32)
  ref = torch.nn.BatchNorm2d(8, eps=1e-5, momentum=0.1)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.asarray(bn.scale[...])))
    ref.bias.copy_(torch.from_numpy(np.asarray(bn.bias[...])))
  ref.train()
  for _ in range(2):
    y = np.asarray(bn(jnp.asarray(x)))
    y_ref = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # The running variance uses the unbiased batch variance, as PyTorch does.
  np.testing.assert_allclose(bn.var[...], ref.running_var.numpy(), rtol=1e-5)
  bn.use_running_average = True
  ref.eval()
  y = np.asarray(bn(jnp.asarray(x)))
  y_ref = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_train_and_eval_modes_differ_and_only_train_updates_statistics():
  model = numpy_weights.filled("iresnet18", width=16)
  x = np.random.default_rng(1).uniform(-1, 1, (4, 112, 112, 3)).astype(np.float32)
  forward = nnx.jit(lambda m, x: m(x))  # one compiled program per mode, not op by op
  model.eval()
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  y_eval = forward(model, x)
  unchanged = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, before, unchanged)
  model.train()
  y_train = forward(model, x)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  assert not np.allclose(before["bn1"]["mean"], after["bn1"]["mean"])
  assert y_eval.dtype == y_train.dtype == jnp.float32 and y_eval.shape == (4, 512)
  assert not np.allclose(y_eval, y_train)


def test_bfloat16_activations_keep_float32_params_and_output():
  model = numpy_weights.filled("iresnet18", dtype="bfloat16", width=16)
  model.eval()
  model32 = numpy_weights.filled("iresnet18", width=16)  # the same weights
  model32.eval()
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
  x = np.random.default_rng(2).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
  forward = nnx.jit(lambda m, x: m(x))
  y16, y32 = forward(model, x), forward(model32, x)
  assert y16.dtype == jnp.float32
  cos = jnp.sum(y16 * y32, -1) / jnp.linalg.norm(y16, axis=-1) / jnp.linalg.norm(y32, axis=-1)
  assert float(cos.min()) > 0.99


def test_gradients_reach_params_but_not_frozen_scale():
  # The layers' property (``Frozen`` is not an ``nnx.Param``), on the tests' own backbone
  # (tests/tiny_backbone.py: a convolution, BatchNorm, the frozen-scale embedding BatchNorm);
  # test_frozen_embedding_scale_is_state_not_param checks that the package's backbones use it.
  model = models.create(tiny_backbone.NAME, rngs=nnx.Rngs(0), width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.mean(m(x) ** 2), nnx.state(m, nnx.BatchStat)

  x = jax.random.uniform(jax.random.key(3), (2, 112, 112, 3), minval=-1, maxval=1)
  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(params, rest, x)
  assert not np.allclose(stats["bn1"]["mean"][...], rest["bn1"]["mean"][...])
  assert "scale" not in grads["features"]
  assert float(jnp.abs(grads["conv1"]["kernel"][...]).max()) > 0


def test_batchnorm_groups_normalise_each_slice_separately():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.normal(0, 1, (8, 3, 3, 4)) + np.arange(8)[:, None, None, None],
                  jnp.float32)
  grouped = BatchNorm(4)
  grouped.num_groups = 2
  halves = [BatchNorm(4), BatchNorm(4)]
  y = grouped(x)
  np.testing.assert_allclose(y[:4], halves[0](x[:4]), atol=1e-5)
  np.testing.assert_allclose(y[4:], halves[1](x[4:]), atol=1e-5)
  np.testing.assert_allclose(grouped.mean[...], (halves[0].mean[...] + halves[1].mean[...]) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(grouped.var[...], (halves[0].var[...] + halves[1].var[...]) / 2,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="does not split into 3"):
    grouped.num_groups = 3
    grouped(x)


@pytest.mark.parametrize("kernel,stride,padding,size,path", [
    (1, 2, 0, 14, "1x1"),      # the IResNet downsample
    (3, 2, 1, 14, "3x3s2"),    # conv2 of a stage's first block
    (3, 2, 1, 7, None),        # odd input: XLA's gradients
    (2, 2, 0, 14, None),       # LResNet's 2x2 stride-2 convolution: XLA's gradients
    (3, 1, 1, 14, None),       # stride 1: XLA's gradients
])
def test_strided_conv_keeps_forward_and_gradients_of_xla(kernel, stride, padding, size, path):
  conv = layers.conv(5, 6, kernel, stride, padding, kernel_init=nnx.initializers.lecun_normal(),
                     dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, size, size, 5))
  assert cpu_tuning.strided_conv_case(conv, x) == path
  probe = jax.random.normal(jax.random.key(2), conv(x).shape)

  graphdef, params = nnx.split(conv)

  def ours(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x) * probe)

  def xla(kernel_value, x):
    y = jax.lax.conv_general_dilated(x, kernel_value, (stride, stride), [(padding,) * 2] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * probe)

  with cpu_tuning.strided_conv_gradients():  # what cpu_tuning.enable() turns on
    assert cpu_tuning.strided_conv_gradients_active()  # on the CPU backend
    jaxpr = str(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(params, x))
    value, (d_params, dx) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(params, x)
  assert ("custom_vjp_call" in jaxpr) == (path is not None)
  want_value, (d_kernel, want_dx) = jax.jit(jax.value_and_grad(xla, argnums=(0, 1)))(
      conv.kernel[...], x)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(d_params["kernel"][...], d_kernel, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_strided_conv_gradients_are_xla_own_unless_turned_on():
  conv = layers.conv(4, 4, 1, 2, 0, kernel_init=nnx.initializers.lecun_normal(),
                     dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 8, 8, 4))
  assert cpu_tuning.strided_conv_case(conv, x) == "1x1"

  def jaxpr():
    return str(jax.make_jaxpr(jax.grad(lambda v: conv(v).sum()))(x))

  assert not cpu_tuning.strided_conv_gradients_active()  # nothing turns it on but a call
  assert "custom_vjp_call" not in jaxpr()
  with cpu_tuning.strided_conv_gradients():
    assert "custom_vjp_call" in jaxpr()
  assert "custom_vjp_call" not in jaxpr()


# ------------------------------------------------------------- MobileFaceNet and ViT
# arcface_torch's README model table: ViT-T 1.5, ViT-S 5.7, ViT-B 11.4, ViT-L 25.3 GFLOPs
# (counted as multiply-accumulates); MobileFaceNet 0.45.
EXPECTED_NEW_GMACS = {"mbf": 0.44, "vit_t": 1.50, "vit_b": 11.44}


@pytest.mark.parametrize("name", sorted(EXPECTED_NEW_GMACS))
def test_new_backbone_macs(name):
  macs = models.macs_per_image(abstract(name)) / 1e9
  assert macs == pytest.approx(EXPECTED_NEW_GMACS[name], rel=0.01)


def test_mbf_layout_and_init_match_arcface_torch():
  model = abstract("mbf")
  # Stem 3x3 s2 to 128; the second ConvBlock is grouped (64 groups of 2 channels).
  assert model.layers[0].layers[0].kernel.shape == (3, 3, 3, 128)
  assert model.layers[1].layers[0].kernel.shape == (3, 3, 2, 128)
  # Residual stages of 4, 6 and 2 DepthWise blocks; expand 1x1 -> depthwise 3x3 -> project.
  assert [len(model.layers[i].layers) for i in (3, 5, 7)] == [4, 6, 2]
  block = model.layers[5].layers[0]
  assert [m.layers[0].kernel.shape for m in block.layers] == [(1, 1, 256, 256), (3, 3, 1, 256),
                                                             (1, 1, 256, 256)]
  assert model.features.layers[0].layers[0].kernel.shape == (7, 7, 1, 512)
  # kaiming normal (fan_out, relu): std = sqrt(2 / (out * kh * kw)); PReLU 0.25.
  conv_sep = mobilefacenet.ConvBlock(256, 512, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert np.asarray(conv_sep.layers[0].kernel[...]).std() == pytest.approx(np.sqrt(2 / 512),
                                                                           rel=0.05)
  np.testing.assert_array_equal(conv_sep.layers[2].slope[...], 0.25)


def test_vit_layout_and_init_match_arcface_torch():
  model = abstract("vit_t")
  assert model.patch_embed.proj.kernel.shape == (9, 9, 3, 256)
  assert model.pos_embed.shape == (1, 144, 256) and len(model.blocks) == 12
  assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.proj.bias is not None
  assert model.feature[0].kernel.shape == (144 * 256, 256) and model.feature[1].eps == 2e-5
  mlp = vit.Mlp(256, 1024, 0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert np.asarray(mlp.fc1.kernel[...]).std() == pytest.approx(0.02, rel=0.05)
  np.testing.assert_array_equal(mlp.fc1.bias[...], 0.0)
  # Stochastic depth rises linearly from 0 to the name's rate; the mask ratio is the name's.
  assert [b.drop_path.rate for b in model.blocks][::11] == [0.0, pytest.approx(0.1)]
  assert model.token_mask.ratio == 0.1
  assert abstract("vit_t_dp005_mask0").token_mask.ratio == 0.0


def test_vit_mlp_is_relu6():
  mlp = vit.Mlp(32, 128, 0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.linspace(-8, 8, 64 * 32).reshape(1, 64, 32)
  h = mlp.fc1(x)
  np.testing.assert_allclose(mlp(x), mlp.fc2(jnp.clip(h, 0, 6)), rtol=1e-6, atol=1e-6)


# The package's MobileFaceNet and ViT with fewer blocks (tests/tiny_backbone.py): the same
# layers, a fraction of the programs to compile.
@pytest.mark.parametrize("name", [tiny_backbone.MBF_NAME, tiny_backbone.VIT_NAME])
def test_new_backbones_train_eval_modes_and_noise_stream(name):
  model = models.create(name, rngs=nnx.Rngs(params=0, dropout=1), width=8)  # its own streams
  x = np.random.default_rng(1).uniform(-1, 1, (4, 112, 112, 3)).astype(np.float32)
  forward = nnx.jit(lambda m, x: m(x))
  model.eval()
  y_eval = forward(model, x)
  np.testing.assert_array_equal(y_eval, forward(model, x))  # no noise in eval mode
  assert y_eval.shape == (4, 512) and y_eval.dtype == jnp.float32
  model.train()
  graphdef, state = nnx.split(model)

  def train_out(key):
    m = nnx.merge(graphdef, state, copy=True)
    nnx.reseed(m, dropout=key)
    return np.asarray(forward(m, x))

  a, b, a2 = train_out(jax.random.key(5)), train_out(jax.random.key(6)), train_out(
      jax.random.key(5))
  np.testing.assert_array_equal(a, a2)  # the noise comes from the dropout stream alone
  if name == tiny_backbone.VIT_NAME:  # drop path, token masking: another key, another output
    assert not np.allclose(a, b)
  else:  # MobileFaceNet has no noise at dropout 0: train mode differs only by BN
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, y_eval)


def test_vit_token_masking_keeps_a_random_subset_and_refills_the_rest():
  mask = vit.TokenMask(0.25, rngs=nnx.Rngs(0))
  x = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
  kept, restore = mask.mask(x)
  assert kept.shape == (2, 6, 3)  # int(8 x 0.75) tokens per sample
  token = jnp.full((1, 1, 3), -1.0)
  back = np.asarray(mask.restore(kept, restore, token))
  for n in range(2):
    refilled = np.all(back[n] == -1.0, axis=1)
    assert refilled.sum() == 2
    np.testing.assert_array_equal(back[n][~refilled], np.asarray(x)[n][~refilled])


def test_vit_bfloat16_close_to_float32():
  x = np.random.default_rng(2).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
  forward = nnx.jit(lambda m, x: m(x))
  outs = []
  for dtype in ("bfloat16", "float32"):
    model = numpy_weights.filled("vit_t", dtype=dtype, width=8)  # the same weights
    model.eval()
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        np.dtype(np.float32)}
    outs.append(forward(model, x))
  y16, y32 = outs
  assert y16.dtype == jnp.float32
  cos = jnp.sum(y16 * y32, -1) / jnp.linalg.norm(y16, axis=-1) / jnp.linalg.norm(y32, axis=-1)
  assert float(cos.min()) > 0.99


def test_new_backbones_width():
  assert abstract("mbf", width=16).conv_sep.layers[0].kernel.shape == (1, 1, 64, 128)
  assert abstract("vit_b", width=16).pos_embed.shape == (1, 144, 128)
  assert models.width_error("vit_t", 3) is not None and models.width_error("vit_t", 2) is None
  with pytest.raises(ValueError, match="divisible by the 8 heads"):
    models.create("vit_t", rngs=nnx.Rngs(0), width=3)


# (kernel, stride, padding, input size, input channels, output channels, groups): the 3x3
# depthwise convolutions of MobileFaceNet at strides 1 and 2, its 2-channel groups, and the
# whole-window case (GDC: a 7x7 depthwise over a 7x7 input; with a padded input; with groups
# of 2 in and 4 out).
GROUPED_CASES = [(3, 1, 1, 9, 6, 6, 6), (3, 2, 1, 9, 6, 6, 6), (3, 1, 1, 8, 8, 8, 4),
                 (7, 1, 0, 7, 6, 6, 6), (3, 1, 1, 1, 4, 4, 4), (5, 2, 0, 5, 4, 8, 2)]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=str)
def test_grouped_convolutions_as_taps_equal_the_convolution(case):
  """On the CPU backend grouped convolutions are sums of taps (the whole-window ones one
  product summed over the window): the forward result and both gradients of
  ``conv_general_dilated``'s, to float32 rounding."""
  k, s, p, size, cin, cout, groups = case
  rng = np.random.default_rng(0)  # NumPy's draws: no initialiser to compile for each shape
  conv = layers.Conv(cin, cout, kernel_size=(k, k), strides=(s, s), padding=((p, p), (p, p)),
                     feature_group_count=groups, use_bias=False, rngs=nnx.Rngs(0),
                     kernel_init=lambda _, shape, dtype: rng.normal(size=shape).astype(dtype))
  x = rng.normal(size=(2, size, size, cin)).astype(np.float32)
  graphdef, state = nnx.split(conv)

  def loss(state, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

  def both(taps):
    with layers.grouped_conv_as_taps(taps):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)

  (got, got_grads), (want, want_grads) = both(True), both(False)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_target_platform_traces_the_tpu_formulation_on_a_cpu_host():
  """MobileFaceNet's depthwise convolutions are sums of taps on the CPU backend only; traced
  for a TPU (the plan compiles TPU programs on a CPU host) they are grouped convolutions."""
  model = numpy_weights.filled("mbf", width=8, num_features=16)
  model.eval()
  x = jnp.zeros((1, 112, 112, 3), jnp.float32)

  def grouped(jaxpr_text):
    return sum(int(n) > 1 for n in re.findall(r"feature_group_count=(\d+)", jaxpr_text))

  # Two functions: JAX's trace cache does not know the target (a program is traced for one).
  on_cpu = str(jax.make_jaxpr(lambda v: model(v))(x))
  with models.target_platform("tpu"):
    for_tpu = str(jax.make_jaxpr(lambda v: model(v))(x))
  assert grouped(on_cpu) == 0 and grouped(for_tpu) > 5, (grouped(on_cpu), grouped(for_tpu))


def test_an_abstract_backbone_filled_with_weights_runs_as_their_model():
  """``create_abstract`` builds no weights (every weight and statistic is abstract, its RNG
  streams are not); filled from a model's state dict it computes that model's embeddings.
  The ViT, whose blocks hold RNG streams of their own; the parity tests in test_export.py load
  every family this way."""
  name = "vit_t"
  from unitsface_jax import export  # pylint: disable=g-import-not-at-top
  model = models.create(name, rngs=nnx.Rngs(3), width=8, num_features=16)
  abstract = models.create_abstract(name, width=8, num_features=16)
  weights = nnx.state(abstract, nnx.Any(nnx.Param, models.MODEL_STATE))
  assert len(models.unfilled(abstract)) == len(jax.tree.leaves(weights)) > 0
  assert export.torch_keys(abstract) == list(export.torch_state_dict(model))
  export.load_torch_state_dict(abstract, export.torch_state_dict(model))
  assert models.unfilled(abstract) == []
  model.eval()
  abstract.eval()
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 112, 112, 3)), jnp.float32)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(forward(abstract, x), forward(model, x))


def test_a_registered_backbone_is_created_by_name_and_a_taken_name_is_refused():
  tiny_backbone.register()
  assert tiny_backbone.NAME in models.list_models()
  model = models.create(tiny_backbone.NAME, rngs=nnx.Rngs(0), num_features=8, width=2)
  assert isinstance(model, tiny_backbone.TinyBackbone) and model.fc.out_features == 8
  with pytest.raises(ValueError, match="'iresnet18' is already registered"):
    models.register("iresnet18", tiny_backbone.TinyBackbone)
  models.register(tiny_backbone.NAME, tiny_backbone.TinyBackbone)  # the same again: kept
