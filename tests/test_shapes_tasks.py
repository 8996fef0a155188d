"""The task metrics of `shapes` on real clips (exact) and corrupted ones, and filmstrip pictures."""

import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.datasets.shapes import tasks as shapes_tasks
from flowception_jax.storage import video_io


def _clips(count, seed=1):
  source, info = datasets.make_source({'name': 'shapes', 'image_size': 16, 'min_frames': 4,
                                       'max_frames': 12, 'max_shapes': 1, 'seed': seed})
  clips = np.zeros((count, info.max_frames) + info.frame_shape, np.float32)
  lengths = np.zeros(count, np.int32)
  for i in range(count):
    video = source[i]['video']
    clips[i, :len(video)], lengths[i] = video, len(video)
  return clips, lengths


def test_continuation_scores_are_zero_on_the_clip_and_large_on_another():
  clips, lengths = _clips(48)
  exact = shapes_tasks.summarize(shapes_tasks.continuation_scores(clips, lengths, clips, lengths, 1))
  assert exact['tracked'] == 1.0
  for name in ('position_error', 'velocity_error', 'colour_error', 'length_error'):
    assert exact[name] == 0.0 and exact[f'{name}_count'] >= 40, name
  other = np.roll(clips, 1, axis=0), np.roll(lengths, 1)
  wrong = shapes_tasks.summarize(shapes_tasks.continuation_scores(*other, clips, lengths, 1))
  assert wrong['position_error'] > 3.0 and wrong['velocity_error'] > 1.5
  assert wrong['colour_error'] > 0.3 and wrong['length_error'] > 1.0
  # A continuation that stops moving after the given frames is caught by position and velocity.
  frozen = clips.copy()
  frozen[:, 2:] = np.where(np.arange(2, 12)[None, :, None, None, None] < lengths[:, None, None,
                                                                                  None, None],
                           clips[:, 1:2], 0.0)
  stuck = shapes_tasks.summarize(shapes_tasks.continuation_scores(frozen, lengths, clips, lengths,
                                                                  2))
  assert stuck['position_error'] > 1.0 and stuck['velocity_error'] > 0.5


def test_interpolation_scores_on_the_clip_and_on_shuffled_frames():
  clips, lengths = _clips(48)
  keys = np.stack([np.zeros(48, int), lengths // 2, lengths - 1], axis=-1)
  exact = shapes_tasks.summarize(shapes_tasks.interpolation_scores(clips, lengths, keys, keys))
  assert exact['motion_residual'] < 0.2 and exact['motion_residual_count'] >= 40
  assert exact['keys_in_place'] == 1.0 and exact['gap_error'] == 0.0
  np.testing.assert_allclose(exact['frames_between'], np.mean(lengths - 3))
  rng = np.random.default_rng(0)
  shuffled = clips.copy()
  for b, n in enumerate(lengths):
    shuffled[b, 1:n - 1] = clips[b, 1 + rng.permutation(n - 2)]
  bad = shapes_tasks.summarize(shapes_tasks.interpolation_scores(shuffled, lengths, keys, keys))
  assert bad['motion_residual'] > 1.0
  # One frame missing from the first gap; the last key no longer at the end of the video.
  scores = shapes_tasks.interpolation_scores(clips[:1], lengths[:1] + 1, keys[:1] - [0, 1, 1],
                                             keys[:1])
  assert scores['keys_in_place'][0] == 0.0
  np.testing.assert_allclose(scores['gap_error'][0], 0.5)


def test_summarize_reports_spread_over_defined_values():
  summary = shapes_tasks.summarize({'x': np.array([1.0, 3.0, np.nan])})
  assert summary == {'x': 2.0, 'x_se': pytest.approx(1.0), 'x_count': 2}


def test_filmstrip_rows_frames_and_marks():
  videos = np.random.default_rng(0).uniform(size=(2, 3, 4, 4, 3)).astype(np.float32)
  picture = video_io.filmstrip(videos, np.array([3, 1]), marked=np.array([[True, False, False],
                                                                           [False] * 3]),
                               scale=2)
  assert picture.shape == (2 * 9 - 1, 3 * 9 - 1, 3) and picture.dtype == np.uint8
  tile = lambda row, col: picture[row * 9:row * 9 + 8, col * 9:col * 9 + 8]
  expected = np.round(videos[0, 1] * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
  np.testing.assert_array_equal(tile(0, 1), expected)
  assert np.all(tile(1, 2) == 128)  # Past the video's length.
  np.testing.assert_array_equal(tile(0, 0)[0, 0], (230, 40, 40))  # The given frame is framed.
  np.testing.assert_array_equal(tile(0, 0)[2:6, 2:6], np.round(videos[0, 0] * 255).astype(
      np.uint8).repeat(2, 0).repeat(2, 1)[2:6, 2:6])
