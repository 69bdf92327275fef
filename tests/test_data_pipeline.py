"""The grain pipeline: transform, epoch shuffle, host sharding, exact resume, bad records."""

import sys

import grain
import numpy as np
import pytest
import simplejpeg
from absl import flags

from unitsface_jax.data import DataError, pipeline, pixels, recordio, sources

if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags
  flags.FLAGS(sys.argv[:1])


class _Indexed:
  """A source whose labels are the example indices, so batches say which examples they hold."""

  def __init__(self, n):
    self._image = simplejpeg.encode_jpeg(np.full((112, 112, 3), 128, np.uint8))
    self.n = n
    self.num_classes = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": self._image, "label": i}


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(scope="module")
def orl(data_dir):
  return sources.RecordIOSource(data_dir / "orl_112")


def test_batch_is_decoded_normalised_rgb(orl):
  config = pipeline.PipelineConfig(batch_size=4, shuffle=False, random_flip=False)
  batch = next(iter(pipeline.make_pipeline(orl, config)))
  assert batch["image"].shape == (4, 112, 112, 3) and batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 0])
  for i in range(4):
    raw = simplejpeg.decode_jpeg(orl[i]["image"], colorspace="RGB").astype(np.float32)
    np.testing.assert_allclose(batch["image"][i], (raw / 255 - 0.5) / 0.5, atol=1e-6)


def test_uint8_output_normalises_to_the_float_output(orl):
  config = pipeline.PipelineConfig(batch_size=8, seed=4, normalize=False)
  raw = next(iter(pipeline.make_pipeline(orl, config)))
  assert raw["image"].dtype == np.uint8
  floats = next(iter(pipeline.make_pipeline(orl, pipeline.PipelineConfig(batch_size=8, seed=4))))
  np.testing.assert_array_equal(pixels.normalize(raw["image"]), floats["image"])
  np.testing.assert_array_equal(raw["label"], floats["label"])


def test_flip_is_horizontal_and_about_half(orl):
  config = pipeline.PipelineConfig(batch_size=50, shuffle=False, random_flip=True, seed=3)
  plain = pipeline.PipelineConfig(batch_size=50, shuffle=False, random_flip=False)
  a = next(iter(pipeline.make_pipeline(orl, config)))["image"]
  b = next(iter(pipeline.make_pipeline(orl, plain)))["image"]
  flipped = [not np.array_equal(x, y) for x, y in zip(a, b)]
  for x, y, f in zip(a, b, flipped):
    np.testing.assert_array_equal(x, y[:, ::-1] if f else y)
  assert 10 <= sum(flipped) <= 40


def test_deferred_flips_mirror_to_the_host_flipped_batch(orl):
  """defer_flip ships unflipped pixels and the coins; the training step's device-side
  mirror of them (jnp arrays) is the batch the pipeline would have flipped itself."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  host = pipeline.PipelineConfig(batch_size=16, seed=7, normalize=False)
  deferred = pipeline.PipelineConfig(batch_size=16, seed=7, normalize=False, defer_flip=True)
  a = _take(iter(pipeline.make_pipeline(orl, host)), 2)
  b = _take(iter(pipeline.make_pipeline(orl, deferred)), 2)
  for x, y in zip(a, b):
    assert y["flip"].dtype == bool and 0 < y["flip"].sum() < 16
    np.testing.assert_array_equal(x["label"], y["label"])
    mirrored = pixels.mirror_where(jnp.asarray(y["image"]), jnp.asarray(y["flip"]))
    np.testing.assert_array_equal(np.asarray(mirrored), x["image"])
  no_flip = pipeline.PipelineConfig(batch_size=16, seed=7, normalize=False, random_flip=False,
                                    defer_flip=True)
  assert not next(iter(pipeline.make_pipeline(orl, no_flip)))["flip"].any()


def test_each_epoch_is_a_new_permutation():
  n, batch = 64, 8
  config = pipeline.PipelineConfig(batch_size=batch, seed=7, num_epochs=3, random_flip=False)
  labels = [b["label"] for b in pipeline.make_pipeline(_Indexed(n), config)]
  assert len(labels) == 3 * n // batch
  epochs = [np.concatenate(labels[e * 8:(e + 1) * 8]) for e in range(3)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  again = [b["label"] for b in pipeline.make_pipeline(_Indexed(n), config)]
  _assert_same_batches([{"l": x} for x in labels], [{"l": x} for x in again])
  other = pipeline.PipelineConfig(batch_size=batch, seed=8, num_epochs=1, random_flip=False)
  first = np.concatenate([b["label"] for b in pipeline.make_pipeline(_Indexed(n), other)])
  assert not np.array_equal(first, epochs[0])


def test_two_hosts_disjoint_union_is_epoch():
  n, batch = 96, 8
  seen = []
  for host in range(2):
    config = pipeline.PipelineConfig(batch_size=batch, seed=1, num_epochs=1, random_flip=False)
    ds = pipeline.make_pipeline(_Indexed(n), config, process_index=host, process_count=2)
    seen.append(np.concatenate([b["label"] for b in ds]))
  assert len(seen[0]) == len(seen[1]) == n // 2
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_global_batch_is_the_same_for_any_host_count(orl):
  """Hosts' batches concatenated in process order are the one-host batch, flips included."""
  global_batch = 8

  def stream(hosts):
    per_host = []
    for host in range(hosts):
      config = pipeline.PipelineConfig(batch_size=global_batch // hosts, seed=5, num_epochs=2,
                                       normalize=False)
      per_host.append(list(pipeline.make_pipeline(orl, config, process_index=host,
                                                  process_count=hosts)))
    return [{k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}
            for batches in zip(*per_host)]

  one, two, four = stream(1), stream(2), stream(4)
  assert len(one) == len(two) == len(four) == 2 * (400 // global_batch)
  _assert_same_batches(one, two)
  _assert_same_batches(one, four)


def test_hosts_get_equal_batch_counts_when_uneven():
  n, batch, hosts = 203, 8, 3  # 67 or 68 examples per host before equalising
  counts = []
  for host in range(hosts):
    config = pipeline.PipelineConfig(batch_size=batch, num_epochs=2, random_flip=False)
    ds = pipeline.make_pipeline(_Indexed(n), config, process_index=host, process_count=hosts)
    counts.append(sum(1 for _ in ds))
  assert counts == [2 * pipeline.steps_per_epoch(n, batch, hosts)] * hosts == [16] * 3


# Two workers: grain starts two processes (slow, as every test that starts one).
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["grain_iterator", "pipeline_iterator"])
def test_resume_mid_epoch_reproduces_following_batches(orl, workers, kind):
  """State saved after batch k restores to batches k+1... of an uninterrupted run, with grain's
  own iterator state and with PipelineIterator's position."""
  config = pipeline.PipelineConfig(batch_size=16, seed=5, worker_count=workers)
  if kind == "grain_iterator":
    start = lambda: iter(pipeline.make_pipeline(orl, config))
  else:
    start = lambda: pipeline.PipelineIterator(orl, config)
  k = 7  # 400 // 16 = 25 batches an epoch: resume mid-epoch 0 and run into epoch 1
  it = start()
  _take(it, k)
  state = it.get_state()
  expected = _take(it, 25)
  restored = start()
  restored.set_state(state)
  _assert_same_batches(_take(restored, 25), expected)


@pytest.mark.slow  # two grain worker processes
def test_resume_through_orbax_checkpoint_manager(orl, tmp_path):
  """PipelineIterator as an orbax item (grain.checkpoint): saved with 2 workers, restored
  without workers, it continues with the uninterrupted run's batches."""
  ocp = pytest.importorskip("orbax.checkpoint")
  with_workers = pipeline.PipelineConfig(batch_size=16, seed=2, worker_count=2)
  it = pipeline.PipelineIterator(orl, with_workers)
  _take(it, 4)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 30)  # crosses into epoch 1 (25 batches an epoch)
  it.close()
  fresh = pipeline.PipelineIterator(orl, pipeline.PipelineConfig(batch_size=16, seed=2))
  manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  manager.close()
  assert fresh.position == 4
  _assert_same_batches(_take(fresh, 30), expected)


def test_pipeline_iterator_refuses_a_mismatched_state(orl):
  it = pipeline.PipelineIterator(orl, pipeline.PipelineConfig(batch_size=16, seed=2))
  _take(it, 1)
  other = pipeline.PipelineIterator(orl, pipeline.PipelineConfig(batch_size=16, seed=3))
  with pytest.raises(ValueError, match="seed"):
    other.set_state(it.get_state())


@pytest.fixture
def broken_set(tmp_path):
  """8 images of 2 classes; record 3 (key 3) holds bytes that are not an image."""
  good = simplejpeg.encode_jpeg(np.zeros((112, 112, 3), np.uint8))
  images = [good] * 8
  images[2] = b"\xff\xd8\xff" + b"not a jpeg" * 10
  recordio.write_insightface(tmp_path, [(i // 4, im) for i, im in enumerate(images)], 2)
  return sources.RecordIOSource(tmp_path)


def test_undecodable_image_raises_naming_record(broken_set):
  config = pipeline.PipelineConfig(batch_size=8, shuffle=False, num_epochs=1)
  offset = broken_set.reader.offset(3)
  with pytest.raises(DataError, match=rf"train\.rec, record 3, byte offset {offset}: "
                                      r"undecodable image"):
    next(iter(pipeline.make_pipeline(broken_set, config)))


def test_skip_bad_records_counts_and_keeps_batch_shape(broken_set, caplog):
  config = pipeline.PipelineConfig(batch_size=8, shuffle=False, num_epochs=1,
                                   skip_bad_records=True)
  batches = list(pipeline.make_pipeline(broken_set, config))
  assert len(batches) == 1
  assert batches[0]["bad_records"].sum() == 1 and batches[0]["bad_records"][2] == 1
  np.testing.assert_array_equal(batches[0]["label"], [0, 0, 0, 0, 1, 1, 1, 1])
  assert "skipping bad record" in caplog.text and "record 3" in caplog.text


def test_truncated_real_file_fails_loudly_in_pipeline(data_dir, tmp_path):
  """The truncated orl_112 copy: a DataError naming train.rec, never a late TypeError."""
  cut = tmp_path / "cut"
  cut.mkdir()
  original = (data_dir / "orl_112" / "train.rec").read_bytes()
  (cut / "train.rec").write_bytes(original[:111927])
  for f in ("train.idx", "property"):
    (cut / f).write_bytes((data_dir / "orl_112" / f).read_bytes())
  src = sources.RecordIOSource(cut)
  config = pipeline.PipelineConfig(batch_size=40, shuffle=False, num_epochs=1)
  with pytest.raises(DataError, match=r"train\.rec, record 21, byte offset 109308"):
    next(iter(pipeline.make_pipeline(src, config)))


def test_wrong_image_size_is_a_data_error(data_dir):
  folder = sources.ImageFolderSource(data_dir / "orl_faces")  # 92x112 PGMs, via Pillow
  config = pipeline.PipelineConfig(batch_size=2, shuffle=False)
  with pytest.raises(DataError, match=r"s1/1\.pgm.*is 112x92, the pipeline expects 112x112"):
    next(iter(pipeline.make_pipeline(folder, config)))
  ok = pipeline.PipelineConfig(batch_size=2, shuffle=False, image_size=(112, 92))
  batch = next(iter(pipeline.make_pipeline(folder, ok)))
  assert batch["image"].shape == (2, 112, 92, 3)


def test_jpeg_of_another_size_is_a_data_error(tmp_path):
  """A JPEG the batch buffer does not fit is decoded whole, then refused with its location."""
  small = simplejpeg.encode_jpeg(np.zeros((100, 96, 3), np.uint8))
  good = simplejpeg.encode_jpeg(np.zeros((112, 112, 3), np.uint8))
  recordio.write_insightface(tmp_path, [(0, good), (0, small), (1, good)], 2)
  config = pipeline.PipelineConfig(batch_size=3, shuffle=False, num_epochs=1)
  with pytest.raises(DataError, match=r"train\.rec, record 2, .*is 100x96, the pipeline "
                                      r"expects 112x112"):
    next(iter(pipeline.make_pipeline(sources.RecordIOSource(tmp_path), config)))


def test_hosts_split_the_global_batch_and_yield_equal_epochs(data_dir):
  source = sources.RecordIOSource(data_dir / "orl_112")
  config = pipeline.PipelineConfig(batch_size=16, seed=3, num_epochs=1)
  hosts = [pipeline.PipelineIterator(source, config, process_index=i, process_count=2)
           for i in range(2)]
  labels = [np.concatenate([b["label"] for b in it]) for it in hosts]
  assert len(labels[0]) == len(labels[1]) == 192  # 400 // 2 // 16 * 16
  assert not np.array_equal(labels[0], labels[1])  # each host reads its own share
