"""Checkpoints: state with shardings, the data iterator and the config survive a restart."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from unitsface_jax import checkpoint

# tests/multidevice/test_restore.py: the scenario, 3 restoring counts x 4 checks, the error.
RESTORE_TESTS = 1 + 3 * 4 + 1


def make_iterator():
  return iter(grain.MapDataset.range(50).shuffle(seed=3).batch(4).to_iter_dataset())


def test_save_restore_state_data_and_config(tmp_path):
  config = demo.get_config()
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7),
           "nested": {"seen": jnp.array([True, False])}}
  it = make_iterator()
  for _ in range(3):
    next(it)
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=5, keep=2)
  assert not ckpt.save(3, state, data_iterator=it, config=config)  # not a multiple of 5
  assert ckpt.save(3, state, data_iterator=it, config=config, force=True)
  ckpt.wait()
  expected_next = [next(it) for _ in range(2)]

  fresh = checkpoint.Checkpoints(tmp_path, every_steps=5, keep=2)
  assert fresh.latest_step() == 3
  it2 = make_iterator()
  target = checkpoint.abstract_like(jax.tree.map(jnp.zeros_like, state))
  restored = fresh.restore(3, target, data_iterator=it2)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["w"].sharding == state["w"].sharding
  for want in expected_next:
    np.testing.assert_array_equal(next(it2), want)
  assert fresh.restore_config()["model"]["name"] == "iresnet18"


def test_keeps_only_the_latest_k(tmp_path):
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=2, with_data=False)
  for step in (1, 2, 3):
    ckpt.save(step, {"x": jnp.float32(step)})
  ckpt.wait()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3]


@pytest.mark.slow
def test_a_checkpoint_written_by_commit_1e53a79_resumes_to_the_same_losses(data_dir, tmp_path):
  """The layout and the meaning of every saved array are stable: the step-12 checkpoint of
  an older version of the package (tests/data/checkpoint_v0/README.md) resumes, and steps
  13-16 give the losses, threshold and gradient norms that version logged without a break."""
  import json
  import shutil

  from unitsface_jax import train

  fixture = data_dir / "checkpoint_v0"
  shutil.copytree(fixture / "checkpoints", tmp_path / "checkpoints")
  config = demo.get_config("smoke")
  config.model.width = 4
  config.model.num_features = 32
  config.compilation_cache = False
  train.train_and_evaluate(config, tmp_path)

  want = [json.loads(line) for line in (fixture / "metrics_after_12.jsonl").read_text().splitlines()]
  got = {row["step"]: row for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                         .splitlines())}
  assert sorted(got) == [13, 14, 15, 16]  # resumed at 12, not from scratch
  for row in want:
    assert got[row["step"]]["data_fingerprint"] == row["data_fingerprint"]
    for name in ("loss", "s2c", "s2s", "threshold_t", "grad_norm"):
      np.testing.assert_allclose(got[row["step"]][name], row[name], rtol=2e-4,
                                 err_msg=f"step {row['step']} {name}")


@pytest.mark.slow
def test_restores_onto_other_device_counts_pass_on_8_devices(multidevice_pytest):
  """tests/multidevice/test_restore.py in its own process (8 simulated devices): a state
  saved on 4 devices restores row for row onto 3, 2 and 8 and trains on as the run that was
  never stopped."""
  multidevice_pytest("test_restore.py", RESTORE_TESTS, timeout=600)


def test_restore_matches_arrays_by_path_whatever_empty_containers(tmp_path):
  """A loss without state keeps empty dicts in the head state (head.HeadParams.s2c_bias,
  HeadBuffers.s2c_stats): a checkpoint written before they existed restores into a state
  that has them, and an array on disk that this run lacks is refused, named."""
  from unitsface_jax import head
  from unitsface_jax import parallel
  mesh = parallel.make_mesh()
  ckpt = checkpoint.Checkpoints(tmp_path, every_steps=1, keep=2, with_data=False)
  old = {"memory": jnp.ones((2, 3)), "seen": jnp.array([True, False]),
         "initialized": jnp.bool_(True)}
  ckpt.save(1, {"buffers": old})
  ckpt.save(2, {"buffers": {**old, "s2c_stats": {"t": jnp.float32(0.5)}}})
  ckpt.wait()
  fresh = {"buffers": head.HeadBuffers(memory=jnp.zeros((2, 3)), seen=jnp.zeros(2, bool),
                                       initialized=jnp.bool_(False))}
  restored = checkpoint.restore_state(ckpt, 1, fresh, mesh)
  assert restored["buffers"].s2c_stats == {}
  np.testing.assert_array_equal(restored["buffers"].seen, [True, False])
  with pytest.raises(ValueError, match=r"has an array buffers/s2c_stats/t this run does not"):
    checkpoint.restore_state(ckpt, 2, fresh, mesh)
  with_t = {"buffers": fresh["buffers"]._replace(s2c_stats={"t": jnp.float32(0.0)})}
  assert float(checkpoint.restore_state(ckpt, 2, with_t, mesh)["buffers"].s2c_stats["t"]) == 0.5
  ckpt.close()


def test_a_backbone_whose_config_disagrees_with_its_arrays_is_refused(data_dir, tmp_path):
  """The backbone of a run is rebuilt from its saved config and filled with its saved
  arrays: an array of another shape than the config's model has (here a config edited to
  16-d embeddings over arrays of 32) stops the read naming the array, not a model that mixes
  the two."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(data_dir / "checkpoint_v0" / "checkpoints", tmp_path / "checkpoints")
  metadata = tmp_path / "checkpoints" / "12" / "config" / "metadata"
  config = json.loads(metadata.read_text())
  name, model = checkpoint.backbone_from_workdir(tmp_path)
  assert (name, model.features.bias.shape) == ("iresnet18", (32,))
  config["model"]["num_features"] = 16
  metadata.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=(r"checkpoint 12 in .*: params/backbone/\S+ has shape "
                                       r"\(32,\), its config's model \(16,\)")):
    checkpoint.backbone_from_workdir(tmp_path)
