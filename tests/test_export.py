"""Weights across frameworks: PyTorch parity, key names, weight files, ONNX, the export CLI."""

import shutil

import command_lines
import numpy_weights
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx

from unitsface_jax import checkpoint, export, models

torch = pytest.importorskip("torch")
torch_modules = pytest.importorskip("unitsface_jax.export.torch_modules")


def random_torch_net(name, seed=0, width=64):
  """A PyTorch twin with random weights and non-trivial BN statistics, in eval mode."""
  torch.manual_seed(seed)
  net = torch_modules.get_model(name, width=width)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        if m.weight.requires_grad:
          m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
      elif isinstance(m, torch.nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
      elif isinstance(m, torch.nn.PReLU):
        m.weight.uniform_(0.0, 0.5)
      elif isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, 1.0 / np.sqrt(m.weight[0].numel()))
    if isinstance(net, torch_modules.VisionTransformer):
      net.pos_embed.normal_(0.0, 0.1)
      net.mask_token.normal_(0.0, 0.1)
  return net.eval()


def numpy_state(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


# A backbone's forward pass as one compiled program: op by op (eager), every operation of a
# MobileFaceNet is compiled on its own, for each batch size (16 s against 2 s).
forward = nnx.jit(lambda model, x: model(x))


def images(n, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, 112, 112, 3)).astype(np.float32)


@pytest.mark.parametrize("name,width", [("iresnet18", 64), ("iresnet50", 64),
                                        ("lresnet50_eir", 64), ("iresnet18", 16),
                                        ("lresnet50_eir", 24), ("mbf", 64), ("mbf_large", 16),
                                        ("vit_t", 64), ("vit_b", 8)])
def test_parity_with_pytorch_twin_and_bitwise_round_trip(name, width):
  net = random_torch_net(name, width=width)
  state = numpy_state(net)
  model = export.load_torch_state_dict(models.create_abstract(name, width=width), state)
  model.eval()
  x = images(3)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  out = np.asarray(forward(model, jnp.asarray(x)))
  err = np.abs(out - ref).max(axis=1)
  assert np.all(err <= 1e-4 * np.linalg.norm(ref, axis=1)), (err, np.linalg.norm(ref, axis=1))
  back = export.torch_state_dict(model)
  expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  assert back.keys() == expected.keys()
  for key in expected:
    assert back[key].dtype == expected[key].dtype and back[key].shape == expected[key].shape
    assert back[key].tobytes() == expected[key].tobytes(), key
  # The exported dict loads strictly into the PyTorch twin (num_batches_tracked is filled in).
  twin = torch_modules.get_model(name, width=width)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert export.infer_width(back, name) == width


def test_insightface_key_names():
  keys = export.torch_keys(models.create_abstract("iresnet50"))
  for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
              "layer4.2.bn3.bias", "bn2.weight", "fc.weight", "fc.bias", "features.weight",
              "features.running_mean"):
    assert key in keys, key
  official = export.torch_keys(models.create_abstract("lresnet50_eir"))
  for key in ("layer1.0.bn0.weight", "layer1.0.bn2.weight", "layer3.13.conv2.weight",
              "layer2.0.downsample.0.weight", "bn4.weight", "fc5.weight", "bn5.running_var"):
    assert key in official, key


@pytest.mark.parametrize("name", models.list_models())
def test_parameter_count_equals_pytorch_twin(name):
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    twin = torch_modules.get_model(name)
  assert models.count_params(abstract) == sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize("name", models.list_models())
def test_architecture_inferred_from_keys(name):
  with torch.device("meta"):
    state = torch_modules.get_model(name).state_dict()
  # The ViT variants differ only in training noise: their weights read as the first name.
  want = next((n for n, arch in models.VIT_ARCHS.items()
               if arch[:2] == models.VIT_ARCHS[name][:2]), name) if name in models.VIT_ARCHS \
      else name
  assert export.infer_model_name(state) == want
  assert export.infer_model_name({f"module.{k}": v for k, v in state.items()}) == want
  assert export.infer_width(state) == 64


def test_load_errors_name_the_keys():
  model = numpy_weights.filled("iresnet18")
  state = export.torch_state_dict(model)
  broken = dict(state)
  del broken["layer2.1.conv1.weight"]
  broken["layer9.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing key\(s\) \['layer2.1.conv1.weight'\].*"
                     r"unexpected key\(s\) \['layer9.weight'\]"):
    export.load_torch_state_dict(model, broken)
  bad_shape = dict(state, **{"fc.weight": np.zeros((512, 10), np.float32)})
  before = np.asarray(model.conv1.kernel[...]).copy()
  with pytest.raises(ValueError, match=r"shape mismatch for 'fc.weight'.*\(512, 10\)"):
    export.load_torch_state_dict(model, bad_shape)
  # Nothing was assigned before the mismatch was found.
  np.testing.assert_array_equal(model.conv1.kernel[...], before)


def test_official_checkpoint_with_loss_modules_and_torch_tensors_loads(tmp_path):
  net = random_torch_net("lresnet50_eir", seed=1)
  state = dict(net.state_dict())
  state["sample_to_class_loss.weight"] = torch.zeros(10, 512)
  state["sample_to_sample_loss.feat_mem"] = torch.zeros(10, 512)
  path = tmp_path / "official.pth"
  torch.save(state, path)
  name, model = export.load_params(path)
  assert name == "lresnet50_eir"
  np.testing.assert_array_equal(model.fc5.kernel[...],
                                net.fc5.weight.detach().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_weight_files_round_trip(tmp_path, suffix):
  # A narrow trunk: the width is not stored, it is read back from conv1.weight.
  model = numpy_weights.filled("iresnet18", seed=4, width=16)
  path = tmp_path / f"w{suffix}"
  export.save_params(path, model, "iresnet18")
  name, loaded = export.load_params(path)
  assert name == "iresnet18" and loaded.conv1.kernel.shape == (3, 3, 3, 16)
  a, b = export.torch_state_dict(model), export.torch_state_dict(loaded)
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_new_backbones_weight_files_round_trip(tmp_path, suffix, name):
  model = numpy_weights.filled(name, seed=4, width=16)
  path = tmp_path / f"w{suffix}"
  export.save_params(path, model, name)
  # A .pth holds no name; a narrow ViT's keys match no published one, so it is named here.
  given = name if suffix == ".pth" and name == "vit_t" else None
  got, loaded = export.load_params(path, given)
  assert got == name
  a, b = export.torch_state_dict(model), export.torch_state_dict(loaded)
  assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_unknown_weight_format_is_refused(tmp_path):
  with pytest.raises(ValueError, match="w.bin.*unknown weight format"):
    export.save_params(tmp_path / "w.bin", numpy_weights.filled("iresnet18"), "iresnet18")


# Narrow trunks (a width the exporter does not assume; the parity tests above cover full width)
# with the 512-d embedding.
@pytest.mark.parametrize("name,width", [("iresnet18", 16), ("mbf", 16), ("vit_t", 16)])
def test_onnx_matches_flax_at_batch_1_and_7_from_one_file(tmp_path, name, width):
  ort = pytest.importorskip("onnxruntime")
  from unitsface_jax.export.onnx_export import export_onnx
  net = random_torch_net(name, seed=2, width=width)
  model = export.load_torch_state_dict(models.create_abstract(name, width=width),
                                       numpy_state(net))
  model.eval()
  path = tmp_path / f"{name}.onnx"
  export_onnx(name, export.torch_state_dict(model), path)
  sess = ort.InferenceSession(str(path))
  (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
  assert inp.name == "data" and inp.shape[1:] == [3, 112, 112] and isinstance(inp.shape[0], str)
  assert out.shape[1:] == [512]  # the one output: the embedding
  for n in (1, 7):
    x = images(n, seed=n)
    got = sess.run(None, {"data": x.transpose(0, 3, 1, 2)})[0]
    want = np.asarray(forward(model, jnp.asarray(x)))
    assert got.shape == (n, 512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------ the export command line

EXPORT = "unitsface_jax.export.__main__"


def _export(*args):
  return command_lines.run_main(EXPORT, *args)


def _input_error(capsys, *args):
  """The export command line stops on a bad input: exit status 2, one line on stderr."""
  status, err = command_lines.run_main_stderr(capsys, EXPORT, *args)
  assert status == 2 and err.startswith("error: ") and "\n" not in err, (status, err)
  return err


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
  """A run with checkpoints 12 (tests/data/checkpoint_v0: IResNet-18 at width 4 with a 32-d
  embedding) and 20 (every float array of 12 plus 0.5), so --step has two to choose from."""
  workdir = tmp_path_factory.mktemp("run")
  shutil.copytree(data_dir / "checkpoint_v0" / "checkpoints", workdir / "checkpoints")
  ckpt = checkpoint.Checkpoints(workdir, every_steps=1, keep=5, with_data=False)
  try:
    later = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         ckpt.restore_arrays(12))
    ckpt.save(20, later, config=ml_collections.ConfigDict(ckpt.restore_config(12)), force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return workdir


def _saved(workdir, step, *path):
  ckpt = checkpoint.Checkpoints(workdir, every_steps=1, keep=5, read_only=True)
  try:
    tree = ckpt.restore_arrays(step)
  finally:
    ckpt.close()
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


_SUFFIX = {"npz": ".npz", "safetensors": ".safetensors", "torch": ".pth", "onnx": ".onnx"}


def _read_weights(fmt, path):
  """The tensors of an exported file, read by the format's own library."""
  if fmt == "npz":
    with np.load(path) as z:
      return {k: z[k] for k in z.files if k != "__model__"}
  if fmt == "safetensors":
    from safetensors.numpy import load_file
    return load_file(path)
  return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def test_export_cli_step_reads_that_checkpoint_and_default_the_latest(run_dir, tmp_path):
  assert _export(f"--workdir={run_dir}", "--step=12", "--format=npz",
                 f"--out={tmp_path / 'at12.npz'}") == 0
  assert _export(f"--workdir={run_dir}", "--format=npz", f"--out={tmp_path / 'latest.npz'}") == 0
  at12, latest = np.load(tmp_path / "at12.npz"), np.load(tmp_path / "latest.npz")
  # conv1.weight (OIHW) is the saved HWIO stem kernel; features.* the embedding BN statistics.
  for weights, step in ((at12, 12), (latest, 20)):
    kernel = _saved(run_dir, step, "params", "backbone", "conv1", "kernel", "value")
    np.testing.assert_array_equal(weights["conv1.weight"], kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(weights["features.running_var"],
                                  _saved(run_dir, step, "model_state", "features", "var", "value"))
    assert str(weights["__model__"]) == "iresnet18" and weights["fc.weight"].shape[0] == 32
  # --params converts a weight file: the step-12 .npz as .safetensors holds the same tensors.
  assert _export(f"--params={tmp_path / 'at12.npz'}", "--format=safetensors",
                 f"--out={tmp_path / 'at12.safetensors'}") == 0
  converted = _read_weights("safetensors", tmp_path / "at12.safetensors")
  assert converted.keys() == set(at12.files) - {"__model__"}
  assert all(converted[k].tobytes() == at12[k].tobytes() for k in converted)


@pytest.mark.parametrize("fmt", sorted(_SUFFIX))
def test_export_cli_writes_each_format_of_the_chosen_step(run_dir, tmp_path, fmt):
  out = tmp_path / f"w{_SUFFIX[fmt]}"
  assert _export(f"--workdir={run_dir}", "--step=12", f"--format={fmt}", f"--out={out}") == 0
  name, model = checkpoint.backbone_from_workdir(run_dir, 12)
  if fmt == "onnx":
    ort = pytest.importorskip("onnxruntime")
    x = images(3, seed=1)
    got = ort.InferenceSession(str(out)).run(None, {"data": x.transpose(0, 3, 1, 2)})[0]
    want = np.asarray(forward(model, jnp.asarray(x)))
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return
  want = export.torch_state_dict(model)
  got = _read_weights(fmt, out)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
  # The file is a backbone the package reads back: same architecture, same embedding.
  loaded_name, loaded = export.load_params(out)
  loaded.eval()
  assert loaded_name == name
  x = jnp.asarray(images(2, seed=2))
  np.testing.assert_array_equal(np.asarray(forward(loaded, x)), np.asarray(forward(model, x)))


def test_export_cli_errors_name_the_input_and_exit_2(run_dir, tmp_path, capsys):
  out = f"--out={tmp_path / 'a.npz'}"
  missing = tmp_path / "no_run"
  assert str(missing) in _input_error(capsys, f"--workdir={missing}", "--format=npz", out)
  err = _input_error(capsys, f"--workdir={run_dir}", "--step=13", "--format=npz", out)
  assert str(run_dir / "checkpoints" / "13") in err
  err = _input_error(capsys, f"--params={tmp_path / 'none.pth'}", "--format=npz", out)
  assert str(tmp_path / "none.pth") in err
  err = _input_error(capsys, f"--workdir={run_dir}", "--format=torch", out)
  assert "--format=torch" in err and str(tmp_path / "a.npz") in err
  assert not (tmp_path / "a.npz").exists()
  with pytest.raises(flags.IllegalFlagValueError, match="params, workdir"):
    _export(f"--workdir={run_dir}", f"--params={tmp_path / 'w.npz'}", "--format=npz",
            f"--out={tmp_path / 'a.npz'}")
