"""Context-frame training: pattern draws, start frames with passive frames, and the batches built."""

import ml_collections
import numpy as np
import pytest

from flowception_jax.core import context as context_lib
from flowception_jax.core import flowception
from flowception_jax.training import config as config_lib
from flowception_jax.training import input_pipeline


def _only(pattern, max_keyframes=4):
  probabilities = [float(name == pattern) for name in context_lib.PATTERNS]
  return context_lib.ContextPatterns(tuple(probabilities), max_keyframes)


@pytest.mark.parametrize('pattern', context_lib.PATTERNS)
def test_each_pattern_gives_its_frames(pattern):
  rng = np.random.default_rng(0)
  patterns = _only(pattern, max_keyframes=3)
  seen_passive, seen_active, prefix_sizes = False, False, set()
  for _ in range(300):
    n = int(rng.integers(1, 12))
    context, passive = patterns.draw(rng, n)
    assert context.shape == passive.shape == (n,) and context.dtype == passive.dtype == bool
    assert not np.any(passive & ~context)
    assert not context.all()  # A frame is always left to generate.
    index = np.flatnonzero(context)
    if pattern == 'none' or n == 1 or (pattern == 'keyframes' and n < 3):
      assert not context.any()
    elif pattern == 'first':
      np.testing.assert_array_equal(index, [0])
      assert not passive.any()
    elif pattern == 'prefix':
      np.testing.assert_array_equal(index, np.arange(len(index)))
      assert not passive.any()
      prefix_sizes.add(len(index))
    elif pattern == 'keyframes':
      assert index[0] == 0 and index[-1] == n - 1 and 2 <= len(index) <= 3
      np.testing.assert_array_equal(np.flatnonzero(passive), [n - 1])
    else:
      seen_passive |= passive.any()
      seen_active |= (context & ~passive).any()
  if pattern == 'prefix':
    assert prefix_sizes == set(range(1, 11))
  if pattern == 'random':
    assert seen_passive and seen_active


def test_pattern_frequencies_follow_the_probabilities():
  patterns = context_lib.ContextPatterns((0.3, 0.7, 0.0, 0.0, 0.0))
  rng = np.random.default_rng(1)
  given = np.mean([patterns.draw(rng, 5)[0].any() for _ in range(4000)])
  assert abs(given - 0.7) < 5 * np.sqrt(0.21 / 4000)


def test_config_defaults_and_bad_probabilities():
  patterns = context_lib.from_config(config_lib.base_config().context)
  assert all(p > 0 for p in patterns.probabilities)  # The defaults train every task.
  with pytest.raises(ValueError, match=r'--config\.context\.p_none'):
    context_lib.ContextPatterns((0.5, 0.6, 0.0, 0.0, 0.0))
  with pytest.raises(ValueError, match=r'--config\.context\.max_keyframes'):
    context_lib.ContextPatterns(max_keyframes=1)


@pytest.mark.parametrize('pattern', ['first', 'keyframes', 'random'])
def test_start_frames_with_context_and_exact_targets(pattern):
  """Noise start frames join the context, as at sampling time. Nothing can insert after a passive
  frame, so the frame after it starts visible too; then the frames that may insert own every
  missing frame (section 3 targets, passive frames present)."""
  kappa = flowception.get_kappa('linear')
  rng = np.random.default_rng(2)
  patterns = _only(pattern)
  for _ in range(300):
    n = int(rng.integers(3, 14))
    context, passive = patterns.draw(rng, n)
    ext = flowception.sample_extended_time(rng, n, kappa=kappa, num_start_frames=2,
                                           context=context, passive=passive)
    starts = ext.delays == 0
    after_passive = np.append(False, passive[:-1]) & ~context
    chosen = min(2, int(np.sum(~context)))
    assert np.all(starts[context]) and np.all(starts[after_passive])
    assert starts[0]
    assert chosen <= np.sum(starts & ~context) <= chosen + after_passive.sum()
    assert np.all(ext.tau[context] >= 1) and np.any(ext.in_flow & ~context)
    targets = flowception.insertion_targets(ext.visible)
    assert not targets[passive].any()
    may_insert = ext.visible & ~passive
    assert ext.visible.sum() + targets[may_insert].sum() == n


class _IndexSource:
  """Clips of 3..10 frames whose pixels encode (frame index, clip length)."""

  def __len__(self):
    return 40

  def __getitem__(self, index):
    n = 3 + index % 8
    video = np.empty((n, 2, 2, 2), np.float32)
    video[..., 0] = ((np.arange(n) + 1) / 32.0)[:, None, None]
    video[..., 1] = (n + 1) / 32.0
    return {'video': video, 'label': np.int32(0)}


def test_batches_with_context():
  context_config = ml_collections.ConfigDict(config_lib.base_config().context.to_dict())
  dataset = input_pipeline.make_train_dataset(
      _IndexSource(), ml_collections.ConfigDict({'buckets': (5, 10), 'num_threads': 0,
                                                 'prefetch': 2}),
      ml_collections.ConfigDict({'kappa': 'linear', 'num_start_frames': 2,
                                 'tau_distribution': 'uniform'}),
      batch_size=4, seed=0, max_frames=10, context_config=context_config)
  kinds = set()
  iterator = iter(dataset)
  for _ in range(60):
    batch = next(iterator)
    for b in range(4):
      mask, ctx = batch['frame_mask'][b], batch['context_mask'][b]
      count, length = int(mask.sum()), int(batch['length'][b])
      index = np.rint((batch['frames'][b, :count, 0, 0, 0] + 1) / 2 * 32 - 1).astype(int)
      assert not (ctx & ~mask).any()
      # Context frames are clean, at t = 1, and out of the velocity loss.
      assert np.all(batch['frame_times'][b][ctx] == 1.0)
      assert not (batch['flow_mask'][b] & ctx).any() and batch['flow_mask'][b].any()
      # Only passive context frames leave the rate loss; together with the frames that may insert
      # the targets count every frame of the clip.
      rate = batch['rate_mask'][b]
      assert not (rate & ~mask).any() and not (mask & ~rate & ~ctx).any()
      targets = batch['insert_targets'][b, :count]
      np.testing.assert_array_equal(targets, np.diff(np.append(index, length)) - 1)
      assert count + targets[rate[:count]].sum() == length
      given = index[ctx[:count]]
      passive = index[(ctx & ~rate)[:count]]
      if given.size and np.array_equal(given, [0]):
        kinds.add('first')
      elif passive.size and passive[-1] == length - 1 and given[0] == 0:
        kinds.add('keyframes')
      elif given.size > 1 and np.array_equal(given, np.arange(given.size)) and not passive.size:
        kinds.add('prefix')
      elif not given.size:
        kinds.add('none')
  assert kinds == {'none', 'first', 'prefix', 'keyframes'}
