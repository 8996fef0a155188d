"""Evaluation: the data scores perfectly against itself; sampling, sample files, the command."""

import importlib
import json
import os
import subprocess
import sys

import jax
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


@pytest.mark.parametrize('name', ['camera', 'coloring', 'shapes'])
def test_the_data_scores_as_the_data(name):
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  reference = evaluators.data_reference(config.data, 16)
  videos, lengths = _data_as_samples(config.data, 16)
  np.testing.assert_array_equal(reference.lengths, lengths)
  result = evaluators.evaluate_samples(videos, lengths, reference)
  assert result['data_length_tv'] == 0.0
  assert result['mean_length'] == result['data_mean_length'] == pytest.approx(lengths.mean())
  assert (result['min_length'], result['max_length']) == (lengths.min(), lengths.max())
  assert sum(result['length_histogram'].values()) == pytest.approx(1.0)
  task = datasets.task_metrics(name, videos, lengths, config.data)
  assert {k: result[k] for k in task} == task
  # Every clip cut to two frames: no data clip is that short, so the histograms are disjoint.
  cut = evaluators.evaluate_samples(videos, np.full_like(lengths, 2), reference)
  assert cut['data_length_tv'] == 1.0 and cut['mean_length'] == 2.0
  logged = evaluators.scalars(result)
  assert 'data_length_tv' in logged and 'num_videos' not in logged
  assert all(isinstance(v, float) for v in logged.values())


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
  lengths[0] = 7  # Off the data's support: not a perfect score.
  samples = str(tmp_path / 'samples.npz')
  np.savez(samples, videos=videos, lengths=lengths)
  result = evaluators.evaluate(workdir, samples=samples, num_data=12)
  assert result['sampler'] is None and result['samples'] == samples and result['step'] == 1
  reference = evaluators.data_reference(data_config, 12)
  expected = evaluators.evaluate_samples(videos, lengths, reference)
  assert {k: result[k] for k in expected} == expected
  assert result['num_data'] == 12 and result['data_length_tv'] > 0.2


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
