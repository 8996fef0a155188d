"""Data shards: one global stream whatever the shard count; one bucket sequence in every shard."""

import ml_collections
import numpy as np

from flowception_jax import datasets
from flowception_jax.training import input_pipeline
from flowception_jax.training import input_shards

BUCKETS = (8, 16, 24, 30)


def _configs(buckets=BUCKETS):
  data_config = ml_collections.ConfigDict(
      {'name': 'coloring', 'max_frames': 30, 'buckets': buckets, 'num_threads': 0, 'prefetch': 4})
  flow_config = ml_collections.ConfigDict(
      {'kappa': 'linear', 'num_start_frames': 2, 'tau_distribution': 'uniform'})
  return data_config, flow_config


def _iterator(shard, batch_size, buckets=BUCKETS):
  data_config, flow_config = _configs(buckets)
  source, info = datasets.make_source(data_config)
  return iter(
      input_pipeline.make_train_dataset(source,
                                        data_config,
                                        flow_config,
                                        batch_size=batch_size,
                                        seed=3,
                                        max_frames=info.max_frames,
                                        shard=shard))


def test_global_batch_does_not_depend_on_the_shard_count():
  whole = _iterator((0, 1), batch_size=4, buckets=(30,))
  halves = [_iterator((i, 2), batch_size=2, buckets=(30,)) for i in range(2)]
  for _ in range(3):
    expected = next(whole)
    parts = [next(h) for h in halves]
    for key, value in expected.items():
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def test_shards_follow_one_bucket_sequence_and_their_queues_stay_short():
  shards = [_iterator((i, 2), batch_size=4) for i in range(2)]
  sizes, fill = [], []
  for _ in range(150):
    batches = [next(s) for s in shards]
    sizes.append({b['frames'].shape[1] for b in batches})
    fill.append(np.mean([b['frame_mask'].mean() for b in batches]))
    for batch in batches:
      real = batch['frame_mask']
      # Padding, including that of examples moved up to a larger bucket, stays at the end.
      assert np.all(np.cumsum(~real, axis=1)[real] == 0)
      np.testing.assert_array_equal(np.where(real, batch['positions'], -1), np.where(
          real, np.arange(real.shape[1]), -1))
      assert not np.any(batch['frames'][~real]) and not np.any(batch['rate_mask'][~real])
    assert max(sum(s.waiting().values()) for s in shards) <= 48  # 12 batches of 4.
  assert all(len(s) == 1 for s in sizes)
  assert {s.pop() for s in sizes} == set(BUCKETS)
  assert np.mean(fill) > 0.6


def test_schedule_shares_cover_the_data_with_a_margin():
  schedule = input_shards.BucketSchedule(BUCKETS, [0.1, 0.4, 0.3, 0.2], largest=30, seed=0,
                                         num_estimated=256)
  steps = np.array([schedule.bucket(s) for s in range(2000)])
  at_least = {b: np.mean(steps >= b) for b in BUCKETS}
  data_tails = {8: 1.0, 16: 0.9, 24: 0.5, 30: 0.2}
  for b in BUCKETS[1:]:
    assert data_tails[b] + 0.02 < at_least[b] < data_tails[b] + 0.25
  # Buckets above the longest clip's get no steps; one the estimate never saw still gets some.
  capped = input_shards.BucketSchedule(BUCKETS, [0.5, 0.5, 0.0, 0.0], largest=24, seed=0,
                                       num_estimated=256)
  steps = {capped.bucket(s) for s in range(500)}
  assert 30 not in steps and 24 in steps


def test_resume_continues_the_same_batches():
  first = _iterator((1, 2), batch_size=3)
  for _ in range(7):
    next(first)
  state = first.get_state()
  assert any(state['waiting'].values())  # The waiting examples are part of the state.
  expected = [next(first) for _ in range(5)]
  resumed = _iterator((1, 2), batch_size=3)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
