"""UCF-101 through TFDS: the real pipeline on mock-prepared data, and the stop when data are missing."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from flowception_jax import datasets
from flowception_jax.evaluation import evaluators
from flowception_jax.training import train
from tests import config_files

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ucf_config(data_dir, **fields):
  return ml_collections.ConfigDict(dict(
      name='ucf101', data_dir=str(data_dir), seed=0, image_size=16, min_frames=2, max_frames=5,
      frame_stride=2, split='train', tfds_name='ucf101', on_corrupt='stop') | fields)


def test_clips_of_mock_prepared_data_follow_the_record_form(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    source, info = datasets.make_source(_ucf_config(tmp_path))
    records = [source[i] for i in range(6)]
    redrawn = source.read(0, np.random.default_rng(123))
  assert info == datasets.SourceInfo(frame_shape=(16, 16, 3), max_frames=5, num_classes=101)
  assert len(source) == 6 and isinstance(source, datasets.RandomClipSource)
  for record in records:
    assert record['video'].dtype == np.float32 and record['video'].shape[1:] == (16, 16, 3)
    assert 2 <= len(record['video']) <= 5
    assert 0 <= record['video'].min() and record['video'].max() <= 1
    assert record['label'].dtype == np.int32 and 0 <= record['label'] < 101
  assert len({len(r['video']) for r in records}) > 1
  assert redrawn['video'].shape != records[0]['video'].shape or not np.array_equal(
      redrawn['video'], records[0]['video'])  # Another draw, another clip.
  assert not os.listdir(tmp_path)  # Reading writes nothing.


def test_missing_data_names_the_command_that_prepares_it_and_writes_nothing(tmp_path):
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  with pytest.raises(FileNotFoundError) as error:
    datasets.make_source(_ucf_config(data_dir))
  message = str(error.value)
  assert f'tfds build ucf101 --data_dir={data_dir} --file_format=array_record' in message
  assert 'apache_beam' in message and 'ffmpeg' in message
  assert not os.listdir(data_dir)


@pytest.mark.e2e  # A process of the training command (stopping before it trains).
def test_ucf_command_with_empty_data_dir_stops_at_once(tmp_path):
  default_dir = tmp_path / 'default_tfds'
  workdir = tmp_path / 'run'
  env = dict(os.environ, TFDS_DATA_DIR=str(default_dir))
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.main', '--config=configs/ucf.py:tiny',
       f'--workdir={workdir}', '--config.data.data_dir='],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode != 0
  assert (f'tfds build ucf101 --data_dir={default_dir} --file_format=array_record'
          in result.stderr), result.stderr[-3000:]
  assert not workdir.exists()
  assert not default_dir.exists() or not os.listdir(default_dir)


@pytest.mark.e2e
def test_ucf_tiny_trains_on_mock_prepared_data(tmp_path):
  config = config_files.load('ucf', 'tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.buckets = (config.data.max_frames,)  # One bucket: one compilation.
  config.total_steps, config.checkpoint_every, config.evals.samples.num_videos = 2, 2, 2
  workdir = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=8):
    state = train.train_and_evaluate(config, str(workdir),
                                     make_evaluators=evaluators.from_config)
  assert int(state.step) == 2
  assert (workdir / 'checkpoints' / '2').exists() and (workdir / 'samples_000002.gif').exists()


@pytest.mark.parametrize('variant, size, patch', [(None, 64, 4), ('128', 128, 8), ('256', 256, 16),
                                                  ('tiny', 16, 4)])
def test_ucf_variants(variant, size, patch):
  config = config_files.load('ucf', variant)
  assert config.data.name == 'ucf101' and config.data.image_size == size
  assert config.model.patch_size == patch and config.data.buckets[-1] >= config.data.max_frames


def test_unknown_variants_are_refused_naming_the_known_ones():
  with pytest.raises(ValueError, match="unknown variant '512'.*128, 256, tiny"):
    config_files.load('ucf', '512')
  for name in ('taichi', 'realestate10k', 'kinetics600'):
    with pytest.raises(ValueError, match='unknown variant .*pixels, pixels128, pixels64, tiny'):
      config_files.load(name, '64')
