"""The camera set: clips are views of real photos along known paths, and its metrics see that."""

import ml_collections
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.datasets import camera
from flowception_jax.datasets import motion

SIZE = 24


@pytest.fixture(scope='module')
def source():
  config = ml_collections.ConfigDict(dict(name='camera', seed=0, num_records=1000,
                                          image_size=SIZE, min_frames=4, max_frames=10))
  return datasets.make_source(config)


def _clips(source, count, start=0):
  return [source[i] for i in range(start, start + count)]


def _batch(videos):
  """Zero-padded videos [B, N, H, W, C] and lengths [B] from a list of [L, H, W, C]."""
  lengths = np.array([len(v) for v in videos])
  padded = np.zeros((len(videos), lengths.max()) + videos[0].shape[1:], np.float32)
  for i, video in enumerate(videos):
    padded[i, :len(video)] = video
  return padded, lengths


def test_records_follow_the_documented_form(source):
  src, info = source
  assert info == datasets.SourceInfo(frame_shape=(SIZE, SIZE, 3), max_frames=10, num_classes=0)
  lengths, photos = set(), set()
  for i in range(40):
    record = src[i]
    video = record['video']
    assert video.dtype == np.float32 and video.shape[1:] == info.frame_shape
    assert 4 <= len(video) <= 10 and 0 <= video.min() and video.max() <= 1
    assert record['camera'].shape == (len(video), 4) and record['label'] == 0
    lengths.add(len(video))
    photos.add(int(record['photo']))
  assert len(lengths) > 3 and len(photos) > 3  # Lengths follow the paths; photos vary.
  np.testing.assert_array_equal(src[7]['video'], src[7]['video'])
  other, _ = datasets.make_source(ml_collections.ConfigDict(dict(
      name='camera', seed=1, num_records=1000, image_size=SIZE, min_frames=4, max_frames=10)))
  assert not np.array_equal(other[7]['video'][0], src[7]['video'][0])


def test_paths_stay_inside_the_photo_and_zoom_range_moving_smoothly(source):
  src, _ = source
  for i in range(30):
    record = src[i]
    path = record['camera'].astype(np.float64)
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * 0.5
    rotation = np.stack([np.cos(path[:, 3]), -np.sin(path[:, 3]), np.sin(path[:, 3]),
                         np.cos(path[:, 3])], -1).reshape(-1, 2, 2)
    points = path[:, None, :2] + np.einsum('lij,kj->lki', rotation, corners) / path[:, 2, None, None]
    h, w = src.photos[record['photo']].shape[:2]
    assert (points >= 0).all() and (points <= np.array([w, h]) / min(h, w) + 1e-9).all()
    assert (path[:, 2] >= camera.ZOOM[0]).all() and (path[:, 2] <= camera.ZOOM[1]).all()
    speed = np.linalg.norm(np.diff(path[:, :2], axis=0), axis=-1) * SIZE * path[:-1, 2]
    assert (speed < 2 * camera.SPEED[1]).all()  # Output pixels per frame.
    np.testing.assert_allclose(np.diff(path[:, 3], 2), 0, atol=1e-6)  # Steady roll.


def test_frames_are_the_photo_seen_through_the_recorded_path(source):
  src, _ = source
  record = src[3]
  again = camera.render(src.photos[record['photo']], record['camera'].astype(np.float64), SIZE)
  np.testing.assert_allclose(again, record['video'], atol=1e-4)  # The path is stored as float32.


def test_alignment_recovers_the_exact_motion_of_real_clips(source):
  src, _ = source
  records = _clips(src, 8)
  previous = np.concatenate([r['video'][:-1] for r in records])
  following = np.concatenate([r['video'][1:] for r in records])
  matrix, shift, rmse = motion.align(previous, following)
  exact = [camera.relative_motion(r['camera'].astype(np.float64), SIZE) for r in records]
  true_matrix = np.concatenate([m for m, _ in exact])
  true_shift = np.concatenate([s for _, s in exact])
  assert np.abs(true_shift).max() > 0.3  # The clips do move.
  shift_error = np.abs(shift - true_shift).max(axis=-1)  # Pixels.
  assert np.median(shift_error) < 0.05 and shift_error.max() < 0.4
  np.testing.assert_allclose(matrix, true_matrix, atol=0.04)
  assert rmse.max() < camera.MOTION_TOL


def test_metrics_are_near_perfect_on_real_clips_and_worse_on_corrupted_ones(source):
  src, _ = source
  videos, lengths = _batch([r['video'] for r in _clips(src, 12, start=100)])
  real = datasets.task_metrics('camera', videos, lengths)
  assert real['motion_explained'] >= 0.95 and real['motion_rmse'] < 0.03
  assert real['motion_jerk_px'] < 0.5 and 0.3 < real['mean_speed_px'] < 3.0
  assert real['mean_length'] == pytest.approx(lengths.mean())

  rng = np.random.default_rng(0)
  noisy = np.clip(videos + rng.normal(0, 0.1, videos.shape), 0, 1).astype(np.float32)
  shuffled = videos.copy()
  for b, n in enumerate(lengths):
    shuffled[b, :n] = videos[b, rng.permutation(n)]
  other = np.roll(videos, 1, axis=0)  # Every other frame from another clip.
  swapped = videos.copy()
  swapped[:, 1::2] = other[:, 1::2]
  frozen = np.repeat(videos[:, :1], videos.shape[1], axis=1)
  for name, corrupted, alive in [('noise', noisy, lengths),
                                 ('swapped', swapped, np.minimum(lengths, np.roll(lengths, 1)))]:
    scores = camera.metrics(corrupted, alive)
    assert scores['motion_explained'] < 0.5, (name, scores)
    assert scores['motion_rmse'] > 2 * real['motion_rmse'], (name, scores)
  # Shuffled views of one photo are still views of it, but the camera jumps back and forth.
  jumpy = camera.metrics(shuffled, lengths)
  assert jumpy['motion_jerk_px'] > 4 * real['motion_jerk_px'], jumpy
  still = camera.metrics(frozen, lengths)  # Perfectly explained, but the camera does not move.
  assert still['mean_speed_px'] < 0.05 < real['mean_speed_px'] / 4


def test_test_split_holds_other_photos():
  assert not set(camera.PHOTOS['train']) & set(camera.PHOTOS['test'])
  test_source, _ = datasets.make_source(ml_collections.ConfigDict(dict(
      name='camera', split='test', seed=0, num_records=10, image_size=SIZE, min_frames=4,
      max_frames=8)))
  assert len(test_source.photos) == len(camera.PHOTOS['test'])
  assert test_source[0]['video'].shape[1:] == (SIZE, SIZE, 3)
  with pytest.raises(ValueError, match='--config.data.split'):
    camera.load_photos('val', SIZE)


def test_alignment_never_explains_a_pair_by_looking_outside_the_frame():
  ramp = np.broadcast_to(np.linspace(0, 1, 16)[None, :, None], (16, 16, 3))
  # A brighter ramp is the ramp shifted by 12 of 16 pixels: a "motion" that compares a quarter
  # of the frame, which does not count.
  previous = np.stack([ramp, np.full((16, 16, 3), 0.5)])
  following = np.stack([ramp + 0.8, np.full((16, 16, 3), 0.6)])  # Flat frames: no gradient.
  matrix, shift, rmse = motion.align(previous, following)
  assert np.isfinite(matrix).all() and np.isfinite(shift).all()
  np.testing.assert_allclose(rmse, [0.8, 0.1], atol=1e-6)
