"""Clips cut from stored videos: the choice of frames, the resize, and a new clip at every draw."""

import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowception_jax.datasets import base
from flowception_jax.datasets import clips
from flowception_jax.training import input_pipeline


def test_clip_spec_draws_strided_windows_of_every_allowed_length():
  spec = clips.ClipSpec(min_frames=3, max_frames=6, stride=2)
  rng = np.random.default_rng(0)
  lengths, starts = set(), set()
  for _ in range(300):
    frames = spec.choose(20, rng)
    assert 3 <= len(frames) <= 6 and frames[0] >= 0 and frames[-1] < 20
    np.testing.assert_array_equal(np.diff(frames), 2)
    lengths.add(len(frames))
    starts.add(int(frames[0]))
  assert lengths == {3, 4, 5, 6} and starts == set(range(20 - 2 * 2))  # Shortest span: 5.
  short = spec.choose(4, rng)  # Two frames at stride 2: the clip takes what there is.
  assert len(short) == 2 and short[1] - short[0] == 2 and short[1] < 4
  with pytest.raises(ValueError, match='--config.data.min_frames'):
    clips.ClipSpec(min_frames=4, max_frames=3, stride=1)
  with pytest.raises(ValueError, match='--config.data.frame_stride'):
    clips.ClipSpec(min_frames=1, max_frames=3, stride=0)


def test_resize_crop_keeps_the_centred_square():
  image = np.zeros((30, 50, 3), np.uint8)
  image[:, 10:40] = 200  # The centred 30x30 square.
  out = clips.resize_crop(Image.fromarray(image), 15)
  assert out.shape == (15, 15, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - 200).max() <= 1
  same = clips.resize_crop(Image.fromarray(image[:, 10:40]), 30)
  np.testing.assert_array_equal(same, image[:, 10:40])  # No resampling at the stored size.


class CountingClips(base.RandomClipSource):
  """Videos of 30 frames; a clip's frames hold (video index, frame index) in channels 0 and 1."""

  def __init__(self, count=6):
    self.seed = 0
    self._count = count
    self._spec = clips.ClipSpec(min_frames=2, max_frames=6, stride=1)

  def __len__(self):
    return self._count

  def read(self, index, rng):
    frames = self._spec.choose(30, rng)
    video = np.zeros((len(frames), 2, 2, 2), np.float32)
    video[..., 0] = (index + 1) / 64
    video[..., 1] = ((frames + 1) / 64)[:, None, None]
    return {'video': video, 'label': np.int32(0)}


def _dataset(seed=0, num_threads=0):
  data_config = ml_collections.ConfigDict({'buckets': (6,), 'num_threads': num_threads,
                                           'prefetch': 4})
  flow_config = ml_collections.ConfigDict({'kappa': 'linear', 'num_start_frames': 2,
                                           'tau_distribution': 'uniform'})
  return input_pipeline.make_train_dataset(CountingClips(), data_config, flow_config, batch_size=3,
                                           seed=seed, max_frames=6)


def _clips_seen(batches):
  """(video index, first frame index, clip length) of every example in `batches`."""
  seen = []
  for batch in batches:
    for b in range(len(batch['length'])):
      first = batch['frames'][b, 0, 0, 0]  # Frame 0 of a clip is always visible.
      video, frame = np.rint((first + 1) / 2 * 64 - 1).astype(int)
      seen.append((int(video), int(frame), int(batch['length'][b])))
  return seen


def test_each_draw_of_a_video_cuts_a_new_clip_reproducibly_and_resumably():
  stream = list(itertools.islice(iter(_dataset()), 12))  # 36 draws of 6 videos.
  seen = _clips_seen(stream)
  per_video = {}
  for video, frame, length in seen:
    per_video.setdefault(video, set()).add((frame, length))
  assert sorted(per_video) == list(range(6))
  assert all(len(draws) > 2 for draws in per_video.values())  # Not fixed per record index.
  assert _clips_seen(itertools.islice(iter(_dataset()), 12)) == seen
  assert _clips_seen(itertools.islice(iter(_dataset(seed=1)), 12)) != seen

  iterator = iter(_dataset(num_threads=2))
  first = _clips_seen(itertools.islice(iterator, 4))
  state = iterator.get_state()
  restored = iter(_dataset(num_threads=2))
  restored.set_state(state)
  assert first + _clips_seen(itertools.islice(restored, 8)) == seen
