"""Evaluation: the data's clips pass the exact metrics, length statistics by hand; sampling, sample
files, the command."""

import collections
import importlib
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import coloring
from flowception_jax import datasets
from flowception_jax.evaluation import evaluators
from flowception_jax.training import checkpoint
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding
from flowception_jax.training import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_as_samples(data_config, num: int):
  """The first `num` records of the data in the sample form: videos [num, N_max, ...], lengths."""
  source, info = datasets.make_source(data_config)
  videos = np.zeros((num, info.max_frames) + tuple(info.frame_shape), np.float32)
  lengths = np.zeros(num, np.int32)
  for i in range(num):
    clip = source[i]['video']
    videos[i, :len(clip)], lengths[i] = clip, len(clip)
  return videos, lengths


# What the data's own first 16 clips score on each data set's exact metrics: every check a clip of
# the data passes by construction. (A few shapes clips fail the tracker, whose misses are clips
# whose second shape shows only an anti-aliased sliver: see test_shapes_metrics.py.)
_DATA_PASSES = {
    'camera': {'motion_explained': 1.0},
    'coloring': {'rule_accuracy': 1.0, 'palette_accuracy': 1.0, 'valid_length_share': 1.0},
    'shapes': {'valid_length_share': 1.0, 'starts_on_time': 1.0, 'ends_on_time': 1.0,
               'shape_share': 1.0, 'background_constant_share': 1.0,
               'colour_constant_share': 1.0},
}


@pytest.mark.parametrize('name', ['camera', 'coloring', 'shapes'])
def test_the_data_scores_as_the_data(name):
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  reference = evaluators.data_reference(config.data, 16)
  videos, lengths = _data_as_samples(config.data, 16)
  np.testing.assert_array_equal(reference.lengths, lengths)
  result = evaluators.evaluate_samples(videos, lengths, reference)
  assert {k: result[k] for k in _DATA_PASSES[name]} == _DATA_PASSES[name]
  if name == 'camera':  # Real camera paths: small residuals, smooth and moving.
    assert result['motion_rmse'] < 0.03 and result['motion_jerk_px'] < 0.5
    assert 0.3 < result['mean_speed_px'] < 3.0
  if name == 'shapes':
    assert result['pass_share'] >= 0.85 and result['clean_pixel_share'] >= 0.999
  assert result['num_videos'] == result['num_data'] == 16
  assert result['data_length_tv'] == 0.0
  assert result['mean_length'] == result['data_mean_length'] == pytest.approx(lengths.mean())
  assert (result['min_length'], result['max_length']) == (lengths.min(), lengths.max())
  share = {int(n): float(np.mean(lengths == n)) for n in np.unique(lengths)}
  assert result['length_histogram'] == result['data_length_histogram'] == pytest.approx(share)
  # Every clip cut to two frames: no data clip is that short, so the histograms are disjoint.
  cut = evaluators.evaluate_samples(videos, np.full_like(lengths, 2), reference)
  assert cut['data_length_tv'] == 1.0 and cut['mean_length'] == 2.0
  if 'valid_length_share' in result:
    assert cut['valid_length_share'] == 0.0
  logged = evaluators.scalars(result)
  assert 'data_length_tv' in logged and 'num_videos' not in logged
  assert all(isinstance(v, float) for v in logged.values())


def test_length_statistics_of_a_small_example_by_hand():
  # Samples of 2, 3, 3 and 5 frames against data of 3, 3, 4 and 4, from a data set (a prepared
  # folder) with no exact metrics of its own.
  reference = evaluators.DataReference(
      data_config=ml_collections.ConfigDict({'name': 'videos'}),
      lengths=np.array([3, 3, 4, 4], np.int32))
  result = evaluators.evaluate_samples(np.zeros((4, 5, 2, 2, 3), np.float32), [2, 3, 3, 5],
                                       reference)
  std = math.sqrt((1.25**2 + 0.25**2 + 0.25**2 + 1.75**2) / 4)  # Around the mean 3.25.
  assert result == {
      'num_videos': 4, 'num_data': 4, 'mean_length': 3.25, 'std_length': pytest.approx(std),
      'min_length': 2, 'max_length': 5, 'data_mean_length': 3.5,
      'length_histogram': {2: 0.25, 3: 0.5, 5: 0.25}, 'data_length_histogram': {3: 0.5, 4: 0.5},
      # Half the absolute differences of the shares of 2, 3, 4 and 5 frames.
      'data_length_tv': (0.25 + 0.0 + 0.5 + 0.25) / 2}
  assert evaluators.scalars(result) == {
      'mean_length': 3.25, 'std_length': pytest.approx(std), 'min_length': 2.0,
      'max_length': 5.0, 'data_mean_length': 3.5, 'data_length_tv': 0.5}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir holding an untrained tiny coloring model's checkpoint (step 1)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = coloring.get_config('tiny')
  config.data.num_threads = 1
  source, info = datasets.make_source(config.data)
  config = train.resolve(config, source, info)
  mesh = sharding.make_mesh(config.mesh)
  _, _, init_fn = train.build(config, info)
  _, shardings = train.state_layout(init_fn, mesh)
  state = train.init_sharded(init_fn, mesh, shardings, jax.random.key(0))
  iterator = iter(
      input_pipeline.make_train_dataset(source,
                                        config.data,
                                        config.flow,
                                        batch_size=2,
                                        seed=0,
                                        max_frames=info.max_frames))
  manager = checkpoint.make_manager(workdir)
  checkpoint.save(manager, 1, state, iterator, config)
  manager.wait_until_finished()
  manager.close()
  return workdir


def test_samples_from_a_workdir_are_scored(workdir):
  result = evaluators.evaluate(workdir, num_videos=3, seed=1, batch_size=2,
                               sampler_overrides={'num_steps': 2})
  assert result['step'] == 1 and result['sampler']['num_steps'] == 2 and result['seed'] == 1
  assert result['num_videos'] == result['num_data'] == 3
  assert 1 <= result['min_length'] <= result['max_length'] <= 30
  assert 0.0 <= result['rule_accuracy'] <= 1.0 and 0.0 <= result['data_length_tv'] <= 1.0
  assert 'fvd' not in result


def test_a_samples_file_is_scored_against_the_workdirs_data(workdir, tmp_path):
  data_config = coloring.get_config('tiny').data
  videos, lengths = _data_as_samples(data_config, 5)
  lengths[0] = 7  # The first 7 frames of a data clip: right frames, a length off the data's support.
  samples = str(tmp_path / 'samples.npz')
  np.savez(samples, videos=videos, lengths=lengths)
  result = evaluators.evaluate(workdir, samples=samples, num_data=12)
  assert result['sampler'] is None and result['seed'] is None and result['step'] == 1
  assert result['samples'] == samples and result['workdir'] == workdir
  assert result['num_videos'] == 5 and result['num_data'] == 12
  assert result['rule_accuracy'] == result['palette_accuracy'] == 1.0
  assert result['valid_length_share'] == 0.8  # Coloring clips have 15 to 30 frames.
  assert result['mean_length'] == pytest.approx(lengths.mean())
  assert (result['min_length'], result['max_length']) == (7, lengths.max())
  data_lengths = _data_as_samples(data_config, 12)[1]
  assert result['data_mean_length'] == pytest.approx(data_lengths.mean())
  ours, theirs = collections.Counter(lengths.tolist()), collections.Counter(data_lengths.tolist())
  assert result['data_length_tv'] == pytest.approx(
      sum(abs(ours[n] / 5 - theirs[n] / 12) for n in ours | theirs) / 2)


@pytest.mark.e2e
def test_command_scores_a_samples_file_with_fvd(workdir, tmp_path):
  videos, lengths = _data_as_samples(coloring.get_config('tiny').data, 2)
  samples = str(tmp_path / 'data.npz')
  np.savez(samples, videos=videos, lengths=lengths)
  output = str(tmp_path / 'eval.json')
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.evaluate', f'--workdir={workdir}',
       f'--samples={samples}', '--fvd', '--fvd_batch_size=2', f'--output={output}'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output) as f:
    summary = json.load(f)
  assert summary['fvd'] == pytest.approx(0.0, abs=1e-6)  # The data against itself.
  assert summary['fvd_num_real'] == summary['fvd_num_generated'] == 2
  assert summary['fvd_num_frames'] == 16
  assert summary['fvd_num_real_padded'] == summary['fvd_num_generated_padded'] == np.sum(
      lengths < 16)
  assert summary['data_length_tv'] == 0.0 and summary['rule_accuracy'] == 1.0
  assert any(name.startswith('fvd_reference_') for name in os.listdir(workdir))
