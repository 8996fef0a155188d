"""Procedural sources: determinism, value ranges, and the rules each clip is built to follow."""

import collections
import pickle

import ml_collections
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.datasets import coloring


def _data_config(name, **fields):
  return ml_collections.ConfigDict(dict(name=name, seed=0, num_records=1000) | fields)


def _coloring(**fields):
  return datasets.make_source(_data_config('coloring', max_frames=30, **fields))


def _shapes(**fields):
  defaults = dict(image_size=16, min_frames=6, max_frames=12, max_shapes=1)
  return datasets.make_source(_data_config('shapes', **(defaults | fields)))


@pytest.mark.parametrize('make', [_coloring, _shapes])
def test_records_are_deterministic_per_index_and_seed(make):
  source, _ = make()
  copy = pickle.loads(pickle.dumps(source))
  for i in (0, 7, 999):
    np.testing.assert_array_equal(source[i]['video'], make()[0][i]['video'])
    np.testing.assert_array_equal(source[i]['video'], copy[i]['video'])
  first, second = source[3]['video'], source[4]['video']
  assert first.shape != second.shape or not np.array_equal(first, second)
  other, _ = make(seed=1)
  assert not np.array_equal(other[3]['video'][:1], first[:1])


@pytest.mark.parametrize('make', [_coloring, _shapes])
def test_records_have_declared_shape_and_range(make):
  source, info = make()
  assert len(source) == 1000
  for i in range(20):
    record = source[i]
    video = record['video']
    assert video.dtype == np.float32
    assert video.shape[1:] == info.frame_shape
    assert 1 <= video.shape[0] <= info.max_frames
    assert video.min() >= 0.0 and video.max() <= 1.0
    assert record['label'].dtype == np.int32 and record['label'] == 0
  assert info.num_classes == 0
  with pytest.raises(IndexError):
    source[1000]


def test_coloring_ring_is_the_clockwise_boundary():
  ring = np.array(coloring.RING)
  assert len(set(coloring.RING)) == 8
  assert coloring.CENTRE not in coloring.RING
  steps = np.abs(np.diff(np.concatenate([ring, ring[:1]]), axis=0)).sum(axis=1)
  np.testing.assert_array_equal(steps, 1)  # Neighbours along the ring, closing the loop.
  assert coloring.RING[:3] == ((0, 0), (0, 1), (0, 2))  # Top row left to right.


def test_rotate_ring_moves_colours_clockwise_and_keeps_the_centre():
  frame = np.random.default_rng(0).uniform(size=(3, 3, 3))
  for stride in coloring.STRIDES:
    rotated = coloring.rotate_ring(frame, stride)
    np.testing.assert_array_equal(rotated[1, 1], frame[1, 1])
    for k, (r, c) in enumerate(coloring.RING):
      dest = coloring.RING[(k + stride) % 8]
      np.testing.assert_array_equal(rotated[dest], frame[r, c])
  np.testing.assert_array_equal(coloring.rotate_ring(frame, 8), frame)
  np.testing.assert_array_equal(
      coloring.rotate_ring(coloring.rotate_ring(frame, 1), 2), coloring.rotate_ring(frame, 3))
  batch = np.stack([frame, frame[::-1]])[None]  # Leading axes broadcast.
  np.testing.assert_array_equal(coloring.rotate_ring(batch, 2)[0, 1],
                                coloring.rotate_ring(frame[::-1], 2))


def test_coloring_clips_follow_exactly_one_stride():
  source, _ = _coloring()
  for i in range(50):
    video = source[i]['video']
    fitting = [s for s in coloring.STRIDES
               if np.allclose(coloring.rotate_ring(video[:-1], s), video[1:], atol=1e-6)]
    assert len(fitting) == 1, (i, fitting)


def test_coloring_lengths_are_uniform_over_the_set():
  source, _ = _coloring()
  counts = collections.Counter(source[i]['video'].shape[0] for i in range(400))
  assert set(counts) == set(coloring.LENGTHS)
  for length in coloring.LENGTHS:
    assert abs(counts[length] / 400 - 0.25) < 0.08, counts


def test_coloring_frames_are_evenly_spaced_on_a_line_with_the_centre_at_one_end():
  source, _ = _coloring()
  for i in range(20):
    for frame in source[i]['video'][::7]:
      colours = frame.reshape(9, 3).astype(np.float64)
      centred = colours - colours.mean(axis=0)
      _, singular, vh = np.linalg.svd(centred)
      assert singular[1] < 1e-5 * singular[0]  # Collinear.
      position = centred @ vh[0]
      gaps = np.diff(np.sort(position))
      np.testing.assert_allclose(gaps, gaps[0], rtol=1e-4)  # Evenly spaced, all distinct.
      assert np.abs(position[4]) == pytest.approx(np.abs(position).max())  # Centre is an end.


def test_coloring_requires_room_for_the_longest_clip():
  with pytest.raises(ValueError, match='--config.data.max_frames'):
    datasets.make_source(_data_config('coloring', max_frames=16))


def _foreground(video):
  """Pixels [N, H, W] that differ from the clip's background (its median colour)."""
  background = np.median(video.reshape(-1, 3), axis=0)
  return np.abs(video - background).max(axis=-1) > 0.1


def test_shapes_lengths_cover_the_configured_range():
  source, _ = _shapes(min_frames=5, max_frames=9, max_shapes=2)
  lengths = collections.Counter(source[i]['video'].shape[0] for i in range(150))
  assert set(lengths) == set(range(5, 10))


def test_shapes_primary_crosses_the_frame():
  source, _ = _shapes()
  for i in range(40):
    visible = _foreground(source[i]['video']).sum(axis=(1, 2))
    full = visible.max()
    assert full > 0
    assert visible[len(visible) // 2] > 0, (i, visible)
    assert visible[0] < full and visible[-1] < full, (i, visible)  # Entering and leaving.


def test_shapes_slow_shapes_make_long_clips():
  source, _ = _shapes(min_frames=4, max_frames=16)
  speeds = collections.defaultdict(list)
  for i in range(120):
    video = source[i]['video']
    mask = _foreground(video)
    ys, xs = np.nonzero(mask[len(video) // 2])
    ys2, xs2 = np.nonzero(mask[len(video) // 2 + 1])
    if len(ys) and len(ys2):
      speeds[len(video) <= 8].append(np.hypot(xs2.mean() - xs.mean(), ys2.mean() - ys.mean()))
  assert np.mean(speeds[True]) > 1.5 * np.mean(speeds[False])


@pytest.mark.parametrize('field, value', [('image_size', 4), ('min_frames', 0),
                                          ('max_frames', 3), ('max_shapes', 3)])
def test_shapes_rejects_bad_fields_naming_the_flag(field, value):
  with pytest.raises(ValueError, match=f'--config.data.{field}'):
    _shapes(**{field: value})


def test_unknown_dataset_names_the_flag_and_the_choices():
  with pytest.raises(ValueError, match='--config.data.name') as error:
    datasets.make_source(_data_config('ucf'))
  assert 'coloring' in str(error.value) and 'shapes' in str(error.value)
