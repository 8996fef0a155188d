"""Tests of the Grain training pipeline: batch contents, bucketing, determinism and resumption."""

import itertools

import ml_collections
import numpy as np
import pytest

from flowception_jax.training import input_pipeline

BUCKETS = (4, 8, 12)
MAX_FRAMES = 11
H, W = 2, 3
KEYS = {
    'frames': np.float32, 'frame_times': np.float32, 'positions': np.int32, 'frame_mask': np.bool_,
    'flow_mask': np.bool_, 'rate_mask': np.bool_, 'insert_targets': np.int32,
    'context_mask': np.bool_, 'segment_ids': np.int32, 'label': np.int32, 'length': np.int32,
}


def _encode(value):
  """Pixel value in [0, 1] for a small integer; never 0.5, which the pipeline maps to padding 0."""
  return (value + 1) / 64.0


def _decode(frames):
  """Inverse of `_encode` for pipeline frames in [-1, 1]."""
  return np.rint((frames + 1) / 2 * 64.0 - 1).astype(np.int64)


class TinySource:
  """Videos of 1..MAX_FRAMES frames; channel 0 encodes the frame index, channel 1 the length."""

  def __init__(self, size=24):
    self._lengths = [1 + (7 * i) % MAX_FRAMES for i in range(size)]

  def __len__(self):
    return len(self._lengths)

  def __getitem__(self, index):
    n = self._lengths[index]
    video = np.empty((n, H, W, 2), np.float32)
    video[..., 0] = _encode(np.arange(n))[:, None, None]
    video[..., 1] = _encode(n)
    return {'video': video, 'label': np.int32(0)}


def _configs(num_threads=0, kappa='linear', buckets=BUCKETS):
  data_config = ml_collections.ConfigDict(
      {'buckets': buckets, 'num_threads': num_threads, 'prefetch': 4})
  flow_config = ml_collections.ConfigDict(
      {'kappa': kappa, 'num_start_frames': 2, 'tau_distribution': 'uniform'})
  return data_config, flow_config


def _dataset(seed=0, batch_size=3, **kwargs):
  data_config, flow_config = _configs(**kwargs)
  return input_pipeline.make_train_dataset(TinySource(),
                                           data_config,
                                           flow_config,
                                           batch_size=batch_size,
                                           seed=seed,
                                           max_frames=MAX_FRAMES)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('kappa', ['linear', 'cubic'])
def test_batch_contents(kappa):
  batch_size = 3
  batches = _take(iter(_dataset(batch_size=batch_size, kappa=kappa)), 12)
  sizes = set()
  for batch in batches:
    assert set(batch) == set(KEYS)
    for key, dtype in KEYS.items():
      assert batch[key].dtype == dtype, key
    size = batch['frames'].shape[1]
    sizes.add(size)
    assert size in BUCKETS
    assert batch['frames'].shape == (batch_size, size, H, W, 2)
    for key in ('frame_times', 'positions', 'frame_mask', 'flow_mask', 'rate_mask',
                'insert_targets', 'context_mask'):
      assert batch[key].shape == (batch_size, size), key
    assert batch['label'].shape == batch['length'].shape == (batch_size,)
    for b in range(batch_size):
      mask = batch['frame_mask'][b]
      count = int(mask.sum())
      length = int(batch['length'][b])
      # Left-aligned, in the smallest bucket that holds the visible frames.
      np.testing.assert_array_equal(mask, np.arange(size) < count)
      assert 1 <= count <= min(size, length)
      assert input_pipeline.bucket_for(count, BUCKETS) == size
      np.testing.assert_array_equal(batch['positions'][b], np.arange(size))
      # Padding is zero everywhere.
      assert not batch['frames'][b, count:].any()
      assert not batch['frame_times'][b, count:].any()
      assert not batch['insert_targets'][b, count:].any()
      assert not (batch['flow_mask'][b] | batch['rate_mask'][b])[count:].any()
      # Visible frames are distinct source frames in their original order, frame 0 first.
      frames = batch['frames'][b, :count]
      assert np.all(np.abs(frames) <= 1)
      index = _decode(frames[..., 0])
      assert np.all(index == index[:, :1, :1])
      index = index[:, 0, 0]
      assert index[0] == 0 and np.all(np.diff(index) > 0) and index[-1] < length
      assert np.all(_decode(frames[..., 1]) == length)
      # Targets count the missing frames of each gap, and all of them together.
      targets = batch['insert_targets'][b, :count]
      np.testing.assert_array_equal(targets, np.diff(np.append(index, length)) - 1)
      assert count + targets.sum() == length
      # Flow mask: exactly the visible frames that are not yet clean.
      times = batch['frame_times'][b]
      assert np.all((times >= 0) & (times <= 1))
      np.testing.assert_array_equal(batch['flow_mask'][b], mask & (times < 1))
      assert batch['flow_mask'][b].any()
      np.testing.assert_array_equal(batch['rate_mask'][b], mask)
      assert not batch['context_mask'][b].any()
      if count == length:  # Every frame present: nothing left to insert.
        assert not targets.any()
    assert not batch['label'].any()
  assert len(sizes) > 1  # The stream actually mixes buckets.


def test_check_buckets():
  assert input_pipeline.check_buckets([8, 4], 8) == (4, 8)
  with pytest.raises(ValueError, match=r'--config\.data\.buckets'):
    input_pipeline.check_buckets([4, 8], 9)
  with pytest.raises(ValueError, match=r'--config\.data\.buckets'):
    _dataset(buckets=(4, 8))
  with pytest.raises(ValueError):
    input_pipeline.check_buckets([], 4)
  assert input_pipeline.bucket_for(5, (12, 4, 8)) == 8
  with pytest.raises(ValueError):
    input_pipeline.bucket_for(13, (4, 8, 12))


def test_same_seed_same_stream():
  first = _take(iter(_dataset(seed=3)), 6)
  _assert_batches_equal(first, _take(iter(_dataset(seed=3)), 6))
  other = _take(iter(_dataset(seed=4)), 6)
  assert any(a['frames'].shape != b['frames'].shape or not np.array_equal(a['frames'], b['frames'])
             for a, b in zip(first, other))


@pytest.mark.parametrize('num_threads', [0, 2])
def test_resume_is_exact(num_threads):
  iterator = iter(_dataset(seed=1, num_threads=num_threads))
  _take(iterator, 5)
  state = iterator.get_state()
  assert any(state['pending'].values())  # Examples waiting in a bucket are part of the state.
  expected = _take(iterator, 6)
  restored = iter(_dataset(seed=1, num_threads=num_threads))
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 6))
  # The uninterrupted stream agrees as well.
  _assert_batches_equal(expected, list(itertools.islice(
      iter(_dataset(seed=1, num_threads=num_threads)), 5, 11)))


def test_global_time_location_reaches_the_pipeline():
  """A logit-normal global time centred late shows more of each clip than one centred early."""
  video = {'video': np.zeros((8, H, W, 2), np.float32), 'label': np.int32(0)}

  def visible(tau_loc):
    transform = input_pipeline.ExtendedTimeTransform(kappa='linear', num_start_frames=1,
                                                     tau_distribution='logit_normal', buckets=(8,),
                                                     tau_loc=tau_loc, tau_scale=0.5)
    rng = np.random.default_rng(0)
    return np.mean([transform.random_map(video, rng)['frame_mask'].sum() for _ in range(200)])

  assert visible(-2.0) + 2 < visible(0.0) < visible(2.0)
