"""The production settings, trained: each short run checks what the setting changes.

Runs are in process (but the 2-device one) on the tests' own backbone (tests/tiny_backbone.py:
a convolution, BatchNorm, dropout, 32-d embeddings) over the first 16 demo images (2 identities): batch 8, 2 steps an epoch, 4 steps
(CosFace alone in epoch 0, + USS in epoch 1), checkpoints every 2 steps, dropout 0.4 as in the
default recipe. Runs of one configuration compile the same programs, which the session's
compilation cache (tests/conftest.py) then loads: a cached executable is the same program, so
results stay bitwise comparable.
"""

import json
import logging
import pathlib
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

import test_train
import tiny_backbone
from configs import demo as demo_config
from unitsface_jax import checkpoint, head, optim, parallel, pytrees, train
from unitsface_jax.data import DataError, demo, pixels, prepare, sources
from unitsface_jax.evaluation import extract, verification

# Every test here trains (in this process or a child): collected first, like the other trainings.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]

if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags
  flags.FLAGS(sys.argv[:1])

# Overrides of configs/demo.py:smoke, shared by the in-process runs and the child process.
TINY = {**tiny_backbone.CONFIG, "model.dropout": 0.4,
        "data.max_examples": 16, "data.num_workers": 0, "data.read_threads": 2,
        "num_epochs": 2, "checkpoint_every_steps": 2, "compilation_cache": False}
STEPS_PER_EPOCH = 2


def tiny_config(settings=None):
  config = demo_config.get_config("smoke")
  config.update_from_flattened_dict({**TINY, **(settings or {})})
  return config


def train_run(workdir, settings=None):
  return train.train_and_evaluate(tiny_config(settings), workdir)


def logged(workdir):
  """Step -> everything metrics.jsonl holds for it (training metrics and evaluations)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out.setdefault(m["step"], {}).update(m)
  return out


def saved(workdir, step=None):
  """Every array of a checkpoint's state (default: the latest), keyed by its path."""
  ckpt = checkpoint.Checkpoints(workdir, every_steps=1, keep=1, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    tree = ckpt.restore_arrays(step)
  finally:
    ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(pytrees.path_names(p)): np.asarray(v) for p, v in flat}


def restored(config, workdir, step):
  """(graphdef, rng_state, state) of ``config``'s run at checkpoint ``step``, on one device."""
  mesh = parallel.make_mesh(1)
  tx = optim.sgd(config, STEPS_PER_EPOCH)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(config.seed))
  ckpt = checkpoint.Checkpoints(workdir, every_steps=1, keep=1, read_only=True)
  try:
    return graphdef, rng_state, checkpoint.restore_state(ckpt, step, state, mesh)
  finally:
    ckpt.close()


def batches(config, count):
  """The first ``count`` batches the training loop reads with ``config``."""
  data = train.make_data_iterator(config, train.make_source(config))
  try:
    return [next(data) for _ in range(count)]
  finally:
    data.close()


def model_input(batch):
  """The batch's images as the train step feeds them to the backbone."""
  return pixels.normalize(pixels.mirror_where(jnp.asarray(batch["image"]),
                                              jnp.asarray(batch["flip"])))


def assert_same_batches(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    assert a.keys() == b.keys() == {"image", "label", "flip"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_bitwise_equal(want, got):
  assert want.keys() == got.keys()
  different = [k for k in want
               if want[k].dtype != got[k].dtype or want[k].tobytes() != got[k].tobytes()]
  assert not different, different[:10]


@pytest.fixture(scope="module")
def uninterrupted(shared_dir):
  """4 steps of the tiny recipe, dropout 0.4, RecordIO read by 2 threads in this process
  (trained once in the session; read-only)."""
  return shared_dir("tiny_uninterrupted", train_run)


def write_pairs(path):
  """A verification .bin of the 320 demo training images: 160 pairs of one identity's images
  and 160 of two identities' (more pairs than the demo's 80, so that a changed embedding
  shows in the accuracy)."""
  source = sources.RecordIOSource(demo.demo_path())
  by_class = {}
  for i in range(len(source)):
    example = source[i]
    by_class.setdefault(example["label"], []).append(example["image"])
  images, issame = [], []
  for c, own in sorted(by_class.items()):
    other = by_class[(c + 1) % len(by_class)]
    for j in range(0, len(own), 2):
      images += [own[j], own[j + 1], own[j], other[j + 1]]
      issame += [True, False]
  with open(path, "wb") as f:
    pickle.dump((images, issame), f, protocol=4)
  return path


@pytest.fixture(scope="module")
def evaluated(shared_dir):
  """The uninterrupted run without dropout, evaluating verification pairs every 2 steps
  (trained once in the session; read-only): (its workdir, its config)."""
  def settings(root):
    return {"model.dropout": 0.0, "eval.every_steps": 2,
            "eval.bins": (str(root / "pairs.bin"),)}

  def build(root):
    write_pairs(root / "pairs.bin")
    train_run(root / "run", settings(root))

  root = shared_dir("tiny_evaluated", build)
  return root / "run", tiny_config(settings(root))


def test_dropout_run_resumes_bitwise_and_differs_from_no_dropout(uninterrupted, evaluated,
                                                                 tmp_path):
  train_run(tmp_path, {"num_epochs": 1})  # steps 1-2, saved at 2
  train_run(tmp_path)  # resumes at 2: dropout masks are fold_in(seed, step), not saved
  want = saved(uninterrupted)
  assert int(want["step"]) == 4
  assert_bitwise_equal(want, saved(tmp_path))
  # The run without dropout (evaluation does not change training) differs from its first step.
  evaluated, _ = evaluated
  other = saved(evaluated)
  assert logged(uninterrupted)[1]["loss"] != logged(evaluated)[1]["loss"]
  for name in ("params/backbone/fc/kernel/value", "params/head/w"):
    assert not np.allclose(want[name], other[name], rtol=1e-3, atol=0), name


# A training-mode forward pass, compiled (op by op it takes seconds); nnx.jit writes the
# updated statistics back into the model.
_forward = nnx.jit(lambda model, images: model(images))


def _batch_stats(graphdef, rng_state, state, images=None):
  """Every BatchNorm running statistic of ``state``'s backbone, after a training-mode forward
  pass on ``images`` if given."""
  model = nnx.merge(graphdef, state.params["backbone"], state.model_state, rng_state,
                    copy=True)
  if images is not None:
    _forward(model, images)
  return {path: np.asarray(v[...], np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


def test_per_device_batch_norm_statistics_on_two_devices(tmp_path):
  # One step of batch 8 on 2 devices (a child process: this one has 1 device); no dropout, so
  # the forward passes below are the step's.
  settings = {"data.max_examples": 8, "num_epochs": 1, "model.bn_stats": "per_device",
              "model.dropout": 0.0}
  config = tiny_config(settings)
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, **settings}.items()]
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "train_run.py"), "2",
       "--config=configs/demo.py:smoke", f"--workdir={tmp_path}", *overrides],
      cwd=ROOT, env=test_train._env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  graphdef, rng_state, state = restored(config, tmp_path, 1)
  assert int(state.step) == 1
  got = _batch_stats(graphdef, rng_state, state)
  # The initial backbone run on each device's slice alone (its own batch statistics), and on
  # the whole batch. A running statistic is linear in the batch statistic, so per-device
  # statistics average to the mean of the two slices' running statistics.
  _, _, initial = train.init_state(config, parallel.make_mesh(1), optim.sgd(config, 1),
                                   jax.random.key(config.seed))
  images = model_input(batches(config, 1)[0])
  slices = [_batch_stats(graphdef, rng_state, initial, images[i:i + 4]) for i in (0, 4)]
  whole = _batch_stats(graphdef, rng_state, initial, images)
  assert got.keys() == whole.keys() and len(got) == 4  # mean and var of its 2 BatchNorms
  for path in got:
    np.testing.assert_allclose(got[path], (slices[0][path] + slices[1][path]) / 2, rtol=1e-4,
                               atol=1e-5, err_msg=str(path))
  # The embedding BatchNorm normalises 4 samples a device: its variance differs from the
  # global batch's by far more than the tolerance above (~1e-4 of variances near 0.9).
  var = ("features", "var")
  assert np.mean(np.abs(got[var] - whole[var])) > 5e-4, (got[var], whole[var])


def _head_w_and_momentum(state):
  """Copies of W and of W's momentum (the only [C, D] leaf of the optimiser state)."""
  w = state.params["head"].w
  momenta = [x for x in jax.tree.leaves(state.opt_state) if x.shape == w.shape]
  assert len(momenta) == 1
  return np.asarray(w, np.float64), np.asarray(momenta[0], np.float64)


def test_partial_fc_updates_the_sampled_classes_only():
  """sample_rate 0.5 of 40 classes, batch 8: k = 20 rows of W get a gradient each step, every
  positive among them; the other 20 move by coupled weight decay and momentum alone."""
  config = tiny_config({"loss.sample_rate": 0.5})
  k = head.num_sampled(train.head_config(config), 1, config.batch_size)
  assert k == 20
  lr, mu, wd = config.optimizer.lr, config.optimizer.momentum, config.optimizer.weight_decay
  mesh = parallel.make_mesh(1)
  tx = optim.sgd(config, STEPS_PER_EPOCH)
  graphdef, rng_state, state = train.init_state(config, mesh, tx, jax.random.key(config.seed))
  step = train.make_train_step(config, mesh, graphdef, rng_state, tx, STEPS_PER_EPOCH)
  sampled = []
  for batch in batches(config, 3):
    w0, m0 = _head_w_and_momentum(state)
    state, metrics = step(state, train.Batch(batch["image"], batch["label"], batch["flip"]))
    assert np.isfinite(float(metrics["loss"]))
    w1, m1 = _head_w_and_momentum(state)
    # SGD with coupled decay: m1 = g + wd * w0 + mu * m0 and w1 = w0 - lr * m1, so the
    # gradient g of a row that took no part in the loss is 0 up to float32 rounding.
    g = m1 - wd * w0 - mu * m0
    rounding = 1e-6 * (np.abs(m1) + wd * np.abs(w0) + mu * np.abs(m0)) + 1e-12
    moved = np.flatnonzero(np.any(np.abs(g) > rounding, axis=1))
    assert len(moved) == k, moved
    assert set(batch["label"].tolist()) <= set(moved.tolist())
    np.testing.assert_allclose(w1, w0 - lr * m1, rtol=1e-6, atol=1e-9)
    sampled.append(moved)
  assert not all(np.array_equal(sampled[0], s) for s in sampled[1:])  # a new sample each step


def _cosines(embeddings, w):
  f = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  return f @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def _margin_softmax_loss(cos, labels, target_logit, scale=64.0):
  """Mean over the batch of CE(s·cos with the target's logit replaced), in float64."""
  rows = np.arange(len(labels))
  logits = scale * cos
  logits[rows, labels] = scale * target_logit(cos[rows, labels])
  top = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return float(np.mean(lse - logits[rows, labels]))


def test_arcface_with_s2s_bce_trains_and_logs_the_arcface_loss(tmp_path):
  settings = {"loss.s2c": "arcface", "loss.s2c_margin": 0.5, "loss.s2s": "s2s_bce",
              "model.dropout": 0.0, "num_epochs": 4}
  config = tiny_config(settings)
  train_run(tmp_path, settings)
  m = logged(tmp_path)
  assert sorted(m) == list(range(1, 9))
  for step, line in m.items():
    assert np.isfinite([line["loss"], line["s2c"], line["s2s"]]).all()
    if step > STEPS_PER_EPOCH:  # s2s BCE from epoch 1
      assert line["s2s"] > 0 and line["loss"] == pytest.approx(line["s2c"] + line["s2s"],
                                                               rel=1e-5)
  assert m[8]["s2c"] < 0.5 * m[1]["s2c"]
  # Step 7's logged s2c from its cosines: the state saved at step 6 and the seventh batch.
  graphdef, rng_state, state = restored(config, tmp_path, 6)
  batch = batches(config, 7)[-1]
  model = nnx.merge(graphdef, state.params["backbone"], state.model_state, rng_state)
  embeddings = np.asarray(_forward(model, model_input(batch)), np.float64)  # training mode
  w = np.asarray(state.params["head"].w, np.float64)[:config.data.num_classes]
  cos = _cosines(embeddings, w)
  arcface = _margin_softmax_loss(cos, batch["label"],
                                 lambda c: np.cos(np.arccos(np.clip(c, -1, 1)) + 0.5))
  cosface = _margin_softmax_loss(cos, batch["label"], lambda c: c - 0.5)
  assert m[7]["s2c"] == pytest.approx(arcface, rel=1e-4)
  assert abs(m[7]["s2c"] - cosface) > 100 * 1e-4 * arcface
  # s2s BCE trains a bias per class (set on first use for every class), USS the scalar b.
  assert np.all(np.asarray(state.params["head"].class_bias) != 0)
  assert float(state.params["head"].bias) == 0


def test_bf16_head_storage_trains_and_resumes_bitwise(tmp_path):
  settings = {"loss.head_dtype": "bfloat16"}
  train_run(tmp_path / "whole", settings)
  train_run(tmp_path / "parts", {**settings, "num_epochs": 1})
  train_run(tmp_path / "parts", settings)
  want = saved(tmp_path / "whole")
  for name in ("params/head/w", "head_buffers/memory"):
    assert want[name].dtype == jnp.bfloat16, name
  assert np.isfinite(want["params/head/w"].astype(np.float32)).all()
  assert want["head_buffers/seen"].sum() == 2  # the 16 images are 2 identities
  assert_bitwise_equal(want, saved(tmp_path / "parts"))


def test_workers_read_the_batches_that_threads_read():
  threads = tiny_config()  # num_workers 0, read_threads 2
  workers = tiny_config({"data.num_workers": 2})
  want, got = batches(threads, 4), batches(workers, 4)  # two epochs
  assert_same_batches(want, got)
  flips = np.concatenate([b["flip"] for b in want])
  assert flips.any() and not flips.all()
  assert not np.array_equal(np.sort(want[0]["label"]), np.sort(want[2]["label"]))


def _corrupt_first_image(directory):
  """Overwrites the JPEG headers of example 0's record in place; returns (rec path, key)."""
  source = sources.RecordIOSource(directory)
  where = source.locate(0)
  image = source[0]["image"]
  rec = pathlib.Path(where["path"])
  raw = bytearray(rec.read_bytes())
  at = raw.index(image[:64], where["offset"])
  raw[at + 2:at + 66] = bytes(64)  # after the start-of-image marker: tables and frame header
  rec.write_bytes(bytes(raw))
  return rec, where["record"]


def test_skip_bad_records_trains_past_a_corrupt_record(tmp_path, caplog):
  data = tmp_path / "data"
  shutil.copytree(demo.demo_path(), data)
  rec, key = _corrupt_first_image(data)
  with pytest.raises(DataError) as e:
    train_run(tmp_path / "strict", {"data.path": str(data)})
  assert e.value.path == str(rec) and e.value.record == key
  with caplog.at_level(logging.WARNING):
    train_run(tmp_path / "skip", {"data.path": str(data), "data.skip_bad_records": True})
  assert sorted(logged(tmp_path / "skip")) == [1, 2, 3, 4]
  skipped = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
  assert skipped and all(f"record {key}," in s for s in skipped)


def test_tfds_source_trains_as_the_recordio_it_was_made_from(uninterrupted, tmp_path):
  made = prepare.prepare(demo.demo_path(), tmp_path / "tfds")
  settings = {"data.source": "tfds", "data.path": made["dir"]}
  assert_same_batches(batches(tiny_config(), 4), batches(tiny_config(settings), 4))
  train_run(tmp_path / "run", settings)
  assert_bitwise_equal(saved(uninterrupted), saved(tmp_path / "run"))


def test_logged_accuracy_is_the_restored_backbones(evaluated):
  workdir, config = evaluated
  m = logged(workdir)
  sets = verification.load_sets(list(config.eval.bins))
  for step in (2, 4):
    _, model = checkpoint.backbone_from_workdir(workdir, step)
    accuracy = verification.accuracies(extract.nnx_apply_fn(model), sets,
                                       batch_size=config.eval.batch_size)["pairs"]
    assert m[step]["eval/pairs/accuracy"] == accuracy, step
