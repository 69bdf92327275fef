"""Weights across frameworks: PyTorch parity, key names, weight files, ONNX, the export CLI."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitsface_jax import export, models

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
      elif isinstance(m, torch.nn.PReLU):
        m.weight.uniform_(0.0, 0.5)
      elif isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, 1.0 / np.sqrt(m.weight[0].numel()))
  return net.eval()


def numpy_state(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def images(n, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, 112, 112, 3)).astype(np.float32)


@pytest.mark.parametrize("name,width", [("iresnet18", 64), ("iresnet50", 64),
                                        ("lresnet50_eir", 64), ("iresnet18", 16),
                                        ("lresnet50_eir", 24)])
def test_parity_with_pytorch_twin_and_bitwise_round_trip(name, width):
  net = random_torch_net(name, width=width)
  state = numpy_state(net)
  model = export.load_torch_state_dict(models.create(name, rngs=nnx.Rngs(0), width=width),
                                       state)
  model.eval()
  x = images(3)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  out = np.asarray(model(jnp.asarray(x)))
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
  assert export.infer_width(back) == width


def test_insightface_key_names():
  keys = export.torch_state_dict(models.create("iresnet50", rngs=nnx.Rngs(0))).keys()
  for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
              "layer4.2.bn3.bias", "bn2.weight", "fc.weight", "fc.bias", "features.weight",
              "features.running_mean"):
    assert key in keys, key
  official = export.torch_state_dict(models.create("lresnet50_eir", rngs=nnx.Rngs(0))).keys()
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
    keys = torch_modules.get_model(name).state_dict().keys()
  assert export.infer_model_name(dict.fromkeys(keys)) == name
  assert export.infer_model_name(dict.fromkeys(f"module.{k}" for k in keys)) == name


def test_load_errors_name_the_keys():
  model = models.create("iresnet18", rngs=nnx.Rngs(0))
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
  model = models.create("iresnet18", rngs=nnx.Rngs(4), width=16)
  path = tmp_path / f"w{suffix}"
  export.save_params(path, model, "iresnet18")
  name, loaded = export.load_params(path)
  assert name == "iresnet18" and loaded.conv1.kernel.shape == (3, 3, 3, 16)
  a, b = export.torch_state_dict(model), export.torch_state_dict(loaded)
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_unknown_weight_format_is_refused(tmp_path):
  with pytest.raises(ValueError, match="w.bin.*unknown weight format"):
    export.save_params(tmp_path / "w.bin", models.create("iresnet18", rngs=nnx.Rngs(0)),
                       "iresnet18")


def test_onnx_matches_flax_at_batch_1_and_7_from_one_file(tmp_path):
  ort = pytest.importorskip("onnxruntime")
  from unitsface_jax.export.onnx_export import export_onnx
  net = random_torch_net("iresnet18", seed=2)
  model = export.load_torch_state_dict(models.create("iresnet18", rngs=nnx.Rngs(0)),
                                       numpy_state(net))
  model.eval()
  path = tmp_path / "r18.onnx"
  export_onnx("iresnet18", export.torch_state_dict(model), path)
  sess = ort.InferenceSession(str(path))
  (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
  assert inp.name == "data" and inp.shape[1:] == [3, 112, 112] and isinstance(inp.shape[0], str)
  assert out.shape[1:] == [512]  # the one output: the embedding
  for n in (1, 7):
    x = images(n, seed=n)
    got = sess.run(None, {"data": x.transpose(0, 3, 1, 2)})[0]
    want = np.asarray(model(jnp.asarray(x)))
    assert got.shape == (n, 512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_cli_writes_onnx_and_torch(tmp_path):
  model = models.create("iresnet18", rngs=nnx.Rngs(5), width=16)  # the width travels too
  src = tmp_path / "w.npz"
  export.save_params(src, model, "iresnet18")
  for fmt, out in (("torch", "w.pth"), ("onnx", "w.onnx")):
    proc = subprocess.run([sys.executable, "-m", "unitsface_jax.export", f"--params={src}",
                           f"--format={fmt}", f"--out={tmp_path / out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / out).stat().st_size > 1_000_000
  loaded = torch.load(tmp_path / "w.pth", weights_only=True)
  np.testing.assert_array_equal(loaded["fc.weight"].numpy(), np.asarray(model.fc.kernel[...]).T)
  proc = subprocess.run([sys.executable, "-m", "unitsface_jax.export",
                         f"--params={tmp_path / 'missing.npz'}", "--format=torch",
                         f"--out={tmp_path / 'x.pth'}"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and "missing.npz" in proc.stderr
