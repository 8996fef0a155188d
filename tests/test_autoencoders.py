"""Video autoencoders: the frame arithmetic, variable lengths, causality, normalisation, the
diffusers weights round trip, and the LTX-Video port against diffusers' own outputs (fixtures
written by `tests/make_ltx_reference.py`)."""

import functools
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax import autoencoders
from flowception_jax.autoencoders import ltx
from flowception_jax.autoencoders import ltx_config
from flowception_jax.autoencoders import ltx_video
from flowception_jax.autoencoders import ltx_weights
from tests import compilations
from tests import config_files

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
_TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  return config_files.tiny_ltx_weights(str(tmp_path_factory.mktemp('ltx') / 'vae'))


@pytest.fixture(scope='module')
def autoencoder(weights):
  return autoencoders.load('ltx', weights)


def _videos(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_the_real_arithmetic_32x_in_space_and_8x_in_time(autoencoder):
  assert (autoencoder.spatial_factor, autoencoder.temporal_factor) == (32, 8)
  assert ltx_config.LTXVideoConfig().spatial_factor == 32  # LTX-Video 0.9.0's own config.
  assert [autoencoder.latent_length(n) for n in (1, 9, 17, 145)] == [1, 2, 3, 19]
  assert [autoencoder.pixel_length(n) for n in (1, 2, 19)] == [1, 9, 145]
  assert [autoencoder.cropped_length(n) for n in (1, 8, 9, 150)] == [1, 1, 9, 145]
  latents, latent_lengths = autoencoder.encode(_videos((1, 17, 64, 96, 3)))
  assert latents.shape == (1, 3, 2, 3, 4) and latent_lengths.tolist() == [3]
  videos, lengths = autoencoder.decode(latents, latent_lengths)
  assert videos.shape == (1, 17, 64, 96, 3) and lengths.tolist() == [17]
  assert 0.0 <= videos.min() and videos.max() <= 1.0


def test_lengths_and_sizes_that_do_not_fit_are_refused_with_the_fix(autoencoder):
  with pytest.raises(ValueError, match='crop it to 9 frames .* pad it to 17'):
    autoencoder.latent_length(12)
  with pytest.raises(ValueError, match='crop it to 9 frames .* pad it to 17'):
    autoencoder.encode(_videos((2, 17, 32, 32, 3)), lengths=[17, 12])
  with pytest.raises(ValueError, match='to 32x64, or pad them to 64x64'):
    autoencoder.encode(_videos((1, 9, 40, 64, 3)))
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    autoencoder.encode(_videos((1, 9, 32, 32, 3)) * 2 - 1)
  with pytest.raises(ValueError, match='latents'):
    autoencoder.decode(np.zeros((1, 2, 1, 1, 5), np.float32))
  with pytest.raises(ValueError, match='lengths'):
    autoencoder.decode(np.zeros((2, 2, 1, 1, 4), np.float32), lengths=[2, 3])


def test_a_batch_of_lengths_matches_each_video_alone(autoencoder):
  videos = _videos((3, 17, 32, 64, 3))
  latents, latent_lengths = autoencoder.encode(videos, lengths=[17, 9, 1])
  assert latents.shape == (3, 3, 1, 2, 4) and latent_lengths.tolist() == [3, 2, 1]
  for i, n in enumerate([17, 9, 1]):
    alone, _ = autoencoder.encode(videos[i:i + 1, :n])
    np.testing.assert_allclose(latents[i, :len(alone[0])], alone[0], atol=1e-5)
    assert not latents[i, len(alone[0]):].any()
  # The decoder is not causal: what fills the padded slots must not reach the videos.
  garbage = latents + 5.0 * (latents == 0)
  decoded, lengths = autoencoder.decode(garbage, latent_lengths)
  assert decoded.shape == (3, 17, 32, 64, 3) and lengths.tolist() == [17, 9, 1]
  for i, n in enumerate([3, 2, 1]):
    alone, _ = autoencoder.decode(latents[i:i + 1, :n])
    np.testing.assert_allclose(decoded[i, :lengths[i]], alone[0], atol=1e-5)
    assert not decoded[i, lengths[i]:].any()


def test_a_latent_frame_does_not_depend_on_later_pixel_frames(autoencoder):
  videos = _videos((1, 25, 32, 32, 3))
  changed = videos.copy()
  changed[:, 10:] = _videos((1, 15, 32, 32, 3), seed=1)  # Frames 10..24: latent frames 2 and 3.
  before, _ = autoencoder.encode(videos)
  after, _ = autoencoder.encode(changed)
  np.testing.assert_array_equal(before[:, :2], after[:, :2])
  assert np.abs(before[:, 2:] - after[:, 2:]).min(axis=(0, 2, 3, 4)).max() > 0
  assert np.abs(before[:, 2] - after[:, 2]).max() > 1e-3


def test_latents_are_normalised_by_the_weights_statistics(autoencoder, weights):
  _, _, statistics = ltx_weights.load(weights)
  assert not np.allclose(statistics['latents_std'], 1.0)
  videos = _videos((1, 9, 32, 32, 3))
  latents, _ = autoencoder.encode(videos)
  raw, _ = jax.jit(functools.partial(autoencoder.model.apply, method=autoencoder.model.encode))(
      {'params': autoencoder.params}, videos * 2 - 1)
  expected = (raw - statistics['latents_mean']) / statistics['latents_std']
  np.testing.assert_allclose(latents, expected, atol=1e-5)
  np.testing.assert_allclose(autoencoder.denormalise(autoencoder.normalise(raw)), raw, atol=1e-5)


def test_encoding_and_decoding_compile_once_per_shape(weights):
  autoencoder = autoencoders.load('ltx', weights)
  for seed in range(2):
    with compilations.counted() as counts:
      latents, _ = autoencoder.encode(_videos((2, 9, 32, 32, 3), seed))
      autoencoder.decode(latents, key=jax.random.key(seed))
    if seed == 0:
      assert counts['decode'] == 1, counts
  assert not counts, counts  # New videos and keys of the same shapes reuse every compilation.


def test_weights_round_trip_through_the_diffusers_layout(weights, tmp_path):
  config, params, statistics = ltx_weights.load(weights)
  copy = str(tmp_path / 'copy')
  ltx_weights.save(copy, config, params, statistics)
  config2, params2, statistics2 = ltx_weights.load(copy)
  assert config2 == config
  flat, flat2 = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(params2)
  assert flat.keys() == flat2.keys()
  assert all(np.array_equal(flat[k], flat2[k]) for k in flat)
  assert all(np.array_equal(statistics[k], statistics2[k]) for k in statistics)
  assert ltx_weights.torch_name(('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'conv',
                                 'kernel')) == 'encoder.down_blocks.0.resnets.1.conv1.conv.weight'


def test_missing_or_mismatched_weights_are_refused_clearly(weights, tmp_path):
  with pytest.raises(FileNotFoundError, match='Lightricks/LTX-Video'):
    autoencoders.load('ltx', str(tmp_path / 'nowhere'))
  other = str(tmp_path / 'other')
  shutil.copytree(weights, other)
  with open(os.path.join(other, 'config.json')) as f:
    fields = json.load(f)
  fields['latent_channels'] = 8
  with open(os.path.join(other, 'config.json'), 'w') as f:
    json.dump(fields, f)
  with pytest.raises(ValueError, match='does not fit the architecture'):
    autoencoders.load('ltx', other)
  fields['unheard_of'] = 1
  with open(os.path.join(other, 'config.json'), 'w') as f:
    json.dump(fields, f)
  with pytest.raises(ValueError, match='unheard_of'):
    autoencoders.load('ltx', other)
  with pytest.raises(ValueError, match='unknown autoencoder'):
    autoencoders.load('sd', weights)


def test_metadata_rebuilds_the_same_autoencoder(autoencoder, weights, tmp_path):
  description = json.loads(json.dumps(autoencoder.metadata()))  # As a folder stores it.
  again = autoencoders.from_metadata(description)
  assert again.metadata() == autoencoder.metadata()
  moved = str(tmp_path / 'moved')
  shutil.copytree(weights, moved)
  assert autoencoders.from_metadata(description, weights=moved).weights == moved
  with pytest.raises(FileNotFoundError, match='--encoder_weights'):
    autoencoders.from_metadata(description | {'weights': str(tmp_path / 'gone')})
  other = config_files.tiny_ltx_weights(str(tmp_path / 'other'), latent_channels=8)
  with pytest.raises(ValueError, match='not of the architecture'):
    autoencoders.from_metadata(description, weights=other)


def test_a_conditioned_decoder_needs_its_timestep():
  config = ltx_config.LTXVideoConfig(**(config_files.TINY_LTX | dict(timestep_conditioning=True)))
  model = ltx_video.Decoder(config)
  with pytest.raises(ValueError, match='timestep'):
    model.init(jax.random.key(0), jnp.zeros((1, 1, 1, 1, 4)))


@pytest.mark.parametrize('name', ['ltx_091', 'ltx_095'])
def test_the_port_matches_diffusers(name, monkeypatch):
  """Same weights, same input: diffusers' `AutoencoderKLLTXVideo` outputs, to 1e-4."""
  directory = os.path.join(_DATA, name)
  config, params, statistics = ltx_weights.load(directory)
  assert not np.allclose(statistics['latents_mean'], 0)  # The fixture's random statistics.
  with np.load(os.path.join(directory, 'reference.npz')) as stored:
    reference = dict(stored)
  model = ltx_video.LTXVideoVAE(config)
  pixels = reference['pixels'].astype(np.float32) / 127.5 - 1
  mean, logvar = jax.jit(functools.partial(model.apply, method=model.encode))(
      {'params': params}, pixels)
  assert mean.shape == reference['mean'].shape
  np.testing.assert_allclose(mean, reference['mean'], atol=_TOLERANCE)
  np.testing.assert_allclose(logvar, reference['logvar'], atol=_TOLERANCE)
  # Noise injection: the draws diffusers made, in the order it made them.
  draws = iter([reference[f'noise_{i}'] for i in range(len(reference))
                if f'noise_{i}' in reference])
  monkeypatch.setattr(ltx_video, 'spatial_noise', lambda key, shape, dtype: next(draws))
  decoded = jax.jit(functools.partial(model.apply, method=model.decode))(
      {'params': params}, reference['latents'], reference.get('timesteps'),
      rngs={'noise': jax.random.key(0)})
  assert decoded.shape == reference['decoded'].shape
  np.testing.assert_allclose(decoded, reference['decoded'], atol=_TOLERANCE)
  assert next(draws, None) is None  # Every draw was used: as many noise injections as diffusers.
  assert config.timestep_conditioning == (name == 'ltx_091')


def test_decoding_draws_from_its_key_where_the_decoder_is_stochastic(tmp_path):
  stochastic = ltx.load(config_files.tiny_ltx_weights(
      str(tmp_path / 'vae'), timestep_conditioning=True,
      decoder_inject_noise=(True, False, False, False, False)))
  latents = np.random.default_rng(0).normal(size=(1, 2, 1, 1, 4)).astype(np.float32)
  first, _ = stochastic.decode(latents, key=jax.random.key(0))
  again, _ = stochastic.decode(latents, key=jax.random.key(0))
  other, _ = stochastic.decode(latents, key=jax.random.key(1))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 0
