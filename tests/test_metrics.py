"""Length statistics and the coloring metrics: perfect on the data itself, worse on each corruption."""

import ml_collections
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.datasets import coloring
from flowception_jax.datasets import metrics as metrics_lib

_NUM = 240
_N_MAX = max(coloring.LENGTHS)


@pytest.fixture(scope='module')
def ground_truth():
  """Real coloring clips, padded with zeros: videos [B, 30, 3, 3, 3], lengths [B]."""
  source, _ = datasets.make_source(ml_collections.ConfigDict(
      dict(name='coloring', seed=0, num_records=_NUM, max_frames=_N_MAX)))
  videos = np.zeros((_NUM, _N_MAX, 3, 3, 3), np.float32)
  lengths = np.zeros(_NUM, np.int32)
  for i in range(_NUM):
    clip = source[i]['video']
    lengths[i] = len(clip)
    videos[i, :len(clip)] = clip
  return videos, lengths


def test_ground_truth_scores_perfectly(ground_truth):
  videos, lengths = ground_truth
  metrics = coloring.metrics(videos, lengths)
  assert metrics['rule_accuracy'] == 1.0
  assert metrics['palette_accuracy'] == 1.0
  assert metrics['valid_length_share'] == 1.0
  assert metrics['length_tv'] < 0.1
  assert metrics['mean_length'] == pytest.approx(lengths.mean())
  assert all(isinstance(v, float) for v in metrics.values())


def test_small_sampling_error_is_forgiven(ground_truth):
  videos, lengths = ground_truth
  noisy = videos + np.random.default_rng(0).uniform(-0.03, 0.03, videos.shape)
  metrics = coloring.metrics(noisy, lengths)
  assert metrics['rule_accuracy'] == 1.0 and metrics['palette_accuracy'] == 1.0


def test_shuffled_frames_break_the_rule_but_not_the_palette(ground_truth):
  videos, lengths = ground_truth
  rng = np.random.default_rng(0)
  shuffled = videos.copy()
  for i, n in enumerate(lengths):
    shuffled[i, :n] = videos[i, rng.permutation(n)]
  metrics = coloring.metrics(shuffled, lengths)
  assert metrics['rule_accuracy'] < 0.5
  assert metrics['palette_accuracy'] == 1.0


def test_noise_fails_rule_and_palette(ground_truth):
  _, lengths = ground_truth
  noise = np.random.default_rng(0).uniform(size=(_NUM, _N_MAX, 3, 3, 3))
  metrics = coloring.metrics(noise, lengths)
  assert metrics['rule_accuracy'] < 0.1
  assert metrics['palette_accuracy'] < 0.1


def test_frozen_single_colour_videos_fail_the_palette(ground_truth):
  videos, lengths = ground_truth
  flat = np.broadcast_to(videos[:, :1, 1:2, 1:2], videos.shape)  # Every pixel the centre colour.
  metrics = coloring.metrics(flat, lengths)
  assert metrics['rule_accuracy'] == 1.0  # Trivially rotation invariant...
  assert metrics['palette_accuracy'] == 0.0  # ...which the palette check catches.


def test_a_single_length_is_far_from_uniform(ground_truth):
  videos, _ = ground_truth
  metrics = coloring.metrics(videos, np.full(_NUM, 15))
  assert metrics['length_tv'] == pytest.approx(0.75)
  assert metrics['rule_accuracy'] == 1.0  # Truncated clips still follow the rule.
  off_support = coloring.metrics(videos, np.full(_NUM, 17))
  assert off_support['length_tv'] == pytest.approx(1.0)
  assert off_support['valid_length_share'] == 0.0


def test_length_tv_matches_brute_force():
  lengths = np.array([15, 15, 20, 17, 30, 30, 30, 2, 25, 40])
  support = coloring.LENGTHS
  brute = 0.0
  for length in range(lengths.max() + 1):
    p = np.mean(lengths == length)
    q = 1 / len(support) if length in support else 0.0
    brute += 0.5 * abs(p - q)
  videos = np.zeros((len(lengths), 30, 3, 3, 3), np.float32)
  metrics = coloring.metrics(videos, lengths)
  assert metrics['length_tv'] == pytest.approx(brute)
  assert metrics['valid_length_share'] == pytest.approx(0.7)


def test_length_histogram_counts_shares():
  histogram = metrics_lib.length_histogram([20, 15, 20, 30])
  assert list(histogram) == [15, 20, 30]
  assert histogram == {15: 0.25, 20: 0.5, 30: 0.25}
  with pytest.raises(ValueError):
    metrics_lib.length_histogram([])


def test_one_stride_per_video_is_enforced(ground_truth):
  videos, lengths = ground_truth
  i = int(np.argmax(lengths))  # A 30-frame clip; rebuild its second half with another stride.
  clip = videos[i, :lengths[i]].copy()
  stride = next(s for s in coloring.STRIDES
                if np.allclose(coloring.rotate_ring(clip[0], s), clip[1]))
  other = next(s for s in coloring.STRIDES if s != stride)
  for t in range(15, len(clip)):
    clip[t] = coloring.rotate_ring(clip[t - 1], other)
  metrics = coloring.metrics(clip[None], lengths[i:i + 1])
  assert metrics['rule_accuracy'] == pytest.approx(15 / 29)


def test_task_metrics_dispatch_by_dataset(ground_truth):
  videos, lengths = ground_truth
  np.testing.assert_equal(datasets.task_metrics('coloring', videos, lengths),
                          coloring.metrics(videos, lengths))
  with pytest.raises(ValueError, match='data_config=config.data'):
    datasets.task_metrics('shapes', videos, lengths)  # Its settings are needed.


def test_total_variation_is_a_distance_between_histograms():
  p = metrics_lib.length_histogram([3, 3, 4, 5])
  q = metrics_lib.uniform_histogram([3, 4, 5])
  assert metrics_lib.total_variation(p, p) == 0.0
  assert metrics_lib.total_variation(p, q) == pytest.approx(metrics_lib.total_variation(q, p))
  assert metrics_lib.total_variation(p, q) == pytest.approx(0.5 - 1 / 3)  # Excess mass on 3.
  assert metrics_lib.total_variation({1: 1.0}, {2: 1.0}) == 1.0  # Disjoint supports.
