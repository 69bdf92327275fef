"""The pipeline's chunk shuffle (``config.data.shuffle = "chunks"``): its epoch order, the
requests it makes for a RecordIO file in GCS larger than the block cache, and exact resume."""

import sys

import numpy as np
import pytest
from absl import flags

from unitsface_jax.data import demo, pipeline, recordio, sources

if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads absl flags
  flags.FLAGS(sys.argv[:1])


def _host_epoch(n, batch_size, epoch, *, chunk, window, seed=5, host=0, hosts=1):
  """Source indices of one host's epoch ``epoch`` in stream order."""
  per_epoch = pipeline.examples_per_epoch(n, batch_size, hosts)
  index = pipeline._SourceIndex(n, per_epoch, seed, True, host, hosts, batch_size,
                                chunk, window)
  return index(np.arange(epoch * per_epoch, (epoch + 1) * per_epoch))


def test_a_chunk_epoch_is_windows_of_whole_chunks_shuffled_and_new_each_epoch():
  n, chunk, window, batch = 1000, 10, 4, 20  # 100 chunks: 25 windows of 40 records
  first = _host_epoch(n, batch, 0, chunk=chunk, window=window)
  assert sorted(first.tolist()) == list(range(n))  # nothing dropped: 1000 = 50 batches
  np.testing.assert_array_equal(first, _host_epoch(n, batch, 0, chunk=chunk, window=window))
  second = _host_epoch(n, batch, 1, chunk=chunk, window=window)
  assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first, second)
  for w in range(n // (chunk * window)):
    records = first[w * chunk * window:(w + 1) * chunk * window]
    chunks, counts = np.unique(records // chunk, return_counts=True)
    assert chunks.size == window and np.all(counts == chunk)  # W whole chunks
    # ... shuffled together: not the chunks one after another.
    assert np.count_nonzero(np.diff(records // chunk)) > 2 * window
  # The chunks come in a new order each epoch, not in file order.
  assert not np.array_equal(first[::chunk * window] // chunk, second[::chunk * window] // chunk)
  assert np.count_nonzero(np.diff(first // chunk) < 0) > 0


def test_a_short_last_chunk_and_a_dropped_remainder_keep_every_record_once():
  n, batch = 1003, 16  # the last chunk holds 3 records; 1003 - 62 * 16 = 11 dropped
  got = _host_epoch(n, batch, 2, chunk=10, window=3)
  assert got.size == 992 and np.unique(got).size == got.size and got.max() < n


def test_two_hosts_read_disjoint_chunks_whose_union_is_the_epoch():
  n, chunk, window, batch = 1600, 25, 4, 16  # 64 chunks, 16 windows; 800 records a host
  hosts = [_host_epoch(n, batch, 3, chunk=chunk, window=window, host=h, hosts=2)
           for h in range(2)]
  assert hosts[0].size == hosts[1].size == 800
  assert not set(hosts[0].tolist()) & set(hosts[1].tolist())
  assert sorted(np.concatenate(hosts).tolist()) == list(range(n))
  # Each host reads its own windows: no chunk is read by both (the shares here split the
  # epoch's order at a window boundary).
  assert not set((hosts[0] // chunk).tolist()) & set((hosts[1] // chunk).tolist())
  # One host alone reads the same epoch order: the two shares one after the other.
  one = _host_epoch(n, batch, 3, chunk=chunk, window=window)
  np.testing.assert_array_equal(one, np.concatenate(hosts))


def test_the_records_shuffle_is_unchanged_by_the_chunk_settings():
  n, batch = 500, 10
  records = pipeline._SourceIndex(n, 500, 7, True, 0, 1, batch)
  positions = np.arange(500, 1000)
  np.testing.assert_array_equal(
      records(positions), np.random.default_rng([7, 1]).permutation(n))


def test_a_chunk_run_resumes_exactly_from_its_saved_state():
  config = pipeline.PipelineConfig(batch_size=8, seed=2, normalize=False, chunk_records=16,
                                   shuffle_window=3, read_threads=2)
  # Labels are the example indices; 25 batches an epoch: the resume point is in epoch 2.
  source = sources.SyntheticSource(200, num_classes=200, pool_size=2)
  it = pipeline.PipelineIterator(source, config)
  for _ in range(30):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]
  it.close()
  resumed = pipeline.PipelineIterator(source, config)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(6)]
  resumed.close()
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # A state saved in one shuffle mode does not restore in the other.
  records = pipeline.PipelineIterator(source, pipeline.PipelineConfig(batch_size=8, seed=2))
  with pytest.raises(ValueError, match="chunk_records"):
    records.set_state(state)


# ------------------------------------------------------------------------------------------
# Requests against the GCS server.
# ------------------------------------------------------------------------------------------

_REC = r"^/download/.*/o/demo%2Ftrain\.rec\?"  # the media reads of the .rec (conftest.py)


def _uncached_source(url):
  """The demo set from the bucket as a file larger than the block cache is read."""
  source = sources.RecordIOSource(url)
  source.reader = recordio.RecordIOReader(f"{url}/train.rec", f"{url}/train.idx",
                                          cache_bytes=0)
  return source


def test_a_chunk_epoch_from_gcs_makes_one_request_per_chunk(gcs, demo_on_gcs):
  """320 records, batches of 32 read by two threads: the exact shuffle fetches each record,
  the chunk shuffle (chunks of 128 records, windows of 2) each chunk once."""
  local = sources.RecordIOSource(demo.demo_path())
  counts = {}
  for name, chunk in (("records", 0), ("chunks", 128)):
    config = pipeline.PipelineConfig(batch_size=32, seed=3, num_epochs=1, normalize=False,
                                     read_threads=2, chunk_records=chunk, shuffle_window=2)
    want = list(pipeline.make_pipeline(local, config))
    remote = _uncached_source(demo_on_gcs)
    before = gcs.requests("GET", _REC)
    got = list(pipeline.make_pipeline(remote, config))
    counts[name] = gcs.requests("GET", _REC) - before
    assert len(got) == 10
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  assert counts["records"] == 320, counts  # one a record
  # 3 chunks (128, 128, 64 records), each fetched once (the reader keeps two windows of
  # chunks): under one request per 64 records.
  assert counts["chunks"] == 3 and counts["chunks"] <= 320 / 64, counts


@pytest.mark.parametrize("field, value, message", [
    ("shuffle", "window", "config.data.shuffle = 'window': must be 'records' or 'chunks'"),
    ("chunk_records", 0, "config.data.chunk_records = 0: must be a positive integer"),
    ("shuffle_window", -1, "config.data.shuffle_window = -1: must be a positive integer"),
])
def test_bad_shuffle_settings_name_the_field(field, value, message):
  from configs import demo  # pylint: disable=g-import-not-at-top
  from unitsface_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.data.shuffle = "chunks"
  config.data.source = "synthetic"  # chunks of a synthetic source are harmless
  config_checks.validate(config)
  config.data[field] = value
  with pytest.raises(config_checks.ConfigError, match=f"^{message.replace('.', '[.]')}$"):
    config_checks.validate(config)
