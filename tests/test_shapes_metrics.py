"""The shapes tracker and metrics: exact on the generator's own clips, worse on each corruption."""

import numpy as np
import pytest

from configs import shapes as shapes_config
from flowception_jax import datasets
from flowception_jax.datasets import metrics as metrics_lib
from flowception_jax.datasets.shapes import metrics as shapes_metrics
from flowception_jax.datasets.shapes import source as shapes
from flowception_jax.datasets.shapes import tracker

_NUM = 40
_DATA = shapes_config.get_config().data  # The quickstart's clips: 16x16, 4-12 frames, 1-2 shapes.


@pytest.fixture(scope='module')
def clips():
  """Real clips [B, 12, 16, 16, 3] padded with zeros, lengths [B], and what the generator drew:
  per clip a list of (kind, centres [N, 2], radius), the primary (drawn on top) first."""
  source, info = datasets.make_source(_DATA)
  videos = np.zeros((_NUM, info.max_frames) + info.frame_shape, np.float32)
  lengths = np.zeros(_NUM, np.int32)
  drawn = []
  render = shapes.coverage
  with pytest.MonkeyPatch.context() as patch:
    for i in range(_NUM):
      layers = []
      patch.setattr(shapes, 'coverage', lambda kind, centres, radius, size: (
          layers.insert(0, (kind, centres, radius)) or render(kind, centres, radius, size)))
      clip = source[i]['video']
      videos[i, :len(clip)], lengths[i] = clip, len(clip)
      drawn.append(layers)
  return videos, lengths, drawn


def _score(videos, lengths):
  return shapes_metrics.metrics(videos, lengths, _DATA)


def test_tracker_recovers_what_the_generator_drew(clips):
  videos, lengths, drawn = clips
  located = []
  for video, length, layers in zip(videos, lengths, drawn):
    video = video[:length]
    tracks = tracker.track(video)
    alphas = [shapes.coverage(kind, centres, radius, 16) for kind, centres, radius in layers]
    free = np.all([a == 0 for a in alphas], axis=0)  # [N, H, W] pixels showing the background.
    for t in range(length):
      np.testing.assert_allclose(tracks.background[t], video[t][free[t]][0], atol=1e-5)

    kind, centres, radius = layers[0]  # The primary shape, drawn on top.
    primary = int(np.argmin(np.nanmean(np.abs(tracks.centres - centres[:, None]), axis=(0, 2))))
    assert tracks.kinds[primary] == kind
    assert abs(tracks.radii[primary] - radius) <= tracker.POSITION_TOL / 2
    np.testing.assert_allclose(tracks.colours[primary], video[alphas[0] == 1][0], atol=1e-3)
    np.testing.assert_array_equal(tracks.present[:, primary], alphas[0].max(axis=(1, 2)) > 0)
    whole = tracks.whole[:, primary]
    np.testing.assert_allclose(tracks.frame_colours[whole, primary],
                               np.broadcast_to(tracks.colours[primary], (whole.sum(), 3)), atol=1e-3)
    located.append(np.abs(tracks.centres[whole, primary] - centres[whole]).max(axis=-1))
  # A fully visible shape is located well within a sample spacing.
  assert np.concatenate(located).max() <= tracker.POSITION_TOL / 2


def test_real_clips_pass_nearly_every_check(clips):
  videos, lengths, _ = clips
  scores = _score(videos, lengths)
  # The few misses are clips whose second shape shows only an anti-aliased sliver, never its colour.
  assert scores['pass_share'] >= 0.9
  assert scores['clean_pixel_share'] >= 0.999
  for name in ('clean', 'connected', 'background_constant', 'colour_constant', 'shape', 'motion'):
    assert scores[f'{name}_share'] >= 0.97, name
  assert scores['starts_on_time'] >= 0.97 and scores['ends_on_time'] >= 0.97
  assert scores['valid_length_share'] == 1.0
  assert scores['mean_length'] == pytest.approx(lengths.mean())
  assert all(isinstance(v, float) for v in scores.values())


def test_sampling_error_within_the_tolerance_is_forgiven(clips):
  videos, lengths, _ = clips
  jitter = np.random.default_rng(0).uniform(-0.5, 0.5, videos.shape) * tracker.COLOUR_TOL
  scores = _score(np.clip(videos + jitter, 0, 1)[:12], lengths[:12])
  assert scores['clean_pixel_share'] >= 0.999
  assert scores['pass_share'] >= 0.8


def test_noise_fails_clean_pixels_and_shapes(clips):
  videos, lengths, _ = clips
  noisy = np.clip(videos + np.random.default_rng(0).normal(0, 0.1, videos.shape), 0, 1)
  scores = _score(noisy[:8], lengths[:8])
  assert scores['clean_pixel_share'] < 0.5
  assert scores['shape_share'] < 0.5
  assert scores['pass_share'] == 0.0


def test_shuffled_frames_break_motion_and_timing_but_not_colours(clips):
  videos, lengths, _ = clips
  rng = np.random.default_rng(0)
  shuffled, frozen = videos.copy(), videos.copy()
  for i, n in enumerate(lengths):
    shuffled[i, :n] = videos[i, rng.permutation(n)]
    frozen[i, :n] = videos[i, n // 2]
  scores = _score(shuffled[:16], lengths[:16])
  assert scores['motion_share'] < 0.5
  assert scores['starts_on_time'] < 0.3 and scores['ends_on_time'] < 0.3
  assert scores['clean_pixel_share'] >= 0.999 and scores['colour_constant_share'] >= 0.97
  still = _score(frozen[:16], lengths[:16])  # Nothing moves: never enters nor leaves.
  assert still['starts_on_time'] == still['ends_on_time'] == still['pass_share'] == 0.0


def test_cut_clips_end_or_start_when_the_shape_is_still_there(clips):
  videos, lengths, _ = clips
  keep = np.flatnonzero(lengths >= 6)[:16]
  videos, cut = videos[keep], lengths[keep] - 2
  late_start = videos.copy()
  for i, n in enumerate(cut):
    late_start[i, :n] = videos[i, 2:n + 2]
  assert _score(videos, cut)['ends_on_time'] <= 0.1
  assert _score(late_start, cut)['starts_on_time'] <= 0.1


def test_speckle_breaks_cleanliness_and_connectivity(clips):
  videos, lengths, _ = clips
  rng = np.random.default_rng(0)
  speckled = videos.copy()
  rows, cols = rng.integers(16, size=(2,) + videos.shape[:2] + (3,))  # 3 stray pixels per frame.
  speckled[np.arange(_NUM)[:, None, None], np.arange(videos.shape[1])[None, :, None],
           rows, cols] = rng.uniform(size=rows.shape + (3,))
  scores = _score(speckled[:16], lengths[:16])
  assert scores['connected_share'] < 0.5 and scores['clean_share'] < 0.5
  assert scores['clean_pixel_share'] >= 0.97  # Only the stray pixels are off.
  assert scores['pass_share'] == 0.0


def test_background_drift_breaks_background_constancy(clips):
  videos, lengths, _ = clips
  drifting = videos.copy()
  for i, n in enumerate(lengths):
    drifting[i, :n] = np.clip(videos[i, :n] + np.linspace(0, 0.2, n)[:, None, None, None], 0, 1)
  scores = _score(drifting[:16], lengths[:16])
  assert scores['background_constant_share'] < 0.7
  assert scores['pass_share'] <= 0.1


def _clip(kinds, colours, radius=2.5, length=8, size=16):
  """A clip of one shape crossing the upper half of the frame left to right with the given kind
  and colour per frame (each [N] long), on a grey background: [N, S, S, 3]."""
  times = np.arange(length)
  velocity = (size + 2 * radius) / (length + 1)
  centres = np.stack([-radius + velocity * (times + 1), np.full(length, size / 4)], axis=-1)
  frames = []
  for kind, colour, centre in zip(kinds, colours, centres):
    alpha = shapes.coverage(kind, centre[None], radius, size)[0, ..., None]
    frames.append(0.5 * (1 - alpha) + np.asarray(colour) * alpha)
  return np.array(frames, np.float32)


def test_shapes_keep_their_kind_and_colour():
  red = (0.9, 0.1, 0.1)
  steady = _clip(['disc'] * 8, [red] * 8)
  morphing = _clip(['disc'] * 4 + ['square'] * 4, [red] * 8)
  recoloured = _clip(['disc'] * 8, [red] * 4 + [(0.9, 0.1, 0.3)] * 4)
  checks = shapes_metrics.check(steady, max_shapes=1)
  assert checks.passed
  assert not shapes_metrics.check(morphing, max_shapes=1).shape.all()
  changed = shapes_metrics.check(recoloured, max_shapes=1)
  assert not changed.colour_constant.all() and not changed.passed
  # The shape drawn twice in one colour: the foreground is in pieces.
  doubled = steady.copy()
  doubled[:, 8:] = steady[:, :8]
  assert not shapes_metrics.check(doubled, max_shapes=1).connected.all()


def test_videos_without_shapes_are_scored_and_fail():
  rng = np.random.default_rng(0)
  flat = np.full((2, 12, 16, 16, 3), 0.3, np.float32)
  noise = rng.uniform(size=(2, 12, 16, 16, 3)).astype(np.float32)
  for videos in (flat, noise):
    scores = _score(videos, np.array([5, 1]))
    assert scores['pass_share'] == scores['shape_share'] == 0.0
    assert scores['starts_on_time'] == scores['ends_on_time'] == 0.0
  assert _score(noise, np.array([5, 1]))['clean_pixel_share'] < 0.2
  assert _score(flat, np.array([0, 3]))['pass_share'] == 0.0  # An empty video fails.


def test_length_tv_is_against_the_configured_range(clips):
  videos = clips[0][:9]
  support = range(_DATA.min_frames, _DATA.max_frames + 1)
  assert len(support) == 9
  assert _score(videos, np.array(support))['length_tv'] == pytest.approx(0.0)
  assert _score(videos, np.full(9, 4))['length_tv'] == pytest.approx(1 - 1 / 9)
  outside = np.array([3, 3, 4, 5, 5, 5, 12, 12, 2])
  scores = _score(videos, outside)
  assert scores['valid_length_share'] == pytest.approx(6 / 9)
  assert scores['length_tv'] == pytest.approx(metrics_lib.total_variation(
      metrics_lib.length_histogram(outside), metrics_lib.uniform_histogram(support)))


def test_task_metrics_dispatch_and_input_errors(clips):
  videos, lengths, _ = clips
  assert datasets.task_metrics('shapes', videos[:4], lengths[:4], _DATA) == _score(videos[:4],
                                                                                   lengths[:4])
  with pytest.raises(ValueError, match='data_config=config.data'):
    datasets.task_metrics('shapes', videos[:4], lengths[:4])
  with pytest.raises(ValueError, match=r'videos \[B, N, S, S, C\]'):
    _score(videos[:4, :, :8], lengths[:4])
  with pytest.raises(ValueError, match='video'):
    tracker.track(np.zeros((0, 16, 16, 3)))
