"""Loads `configs/<name>.py` as `--config=configs/<name>.py:<variant>` does, for tests."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np

from flowception_jax.autoencoders import ltx_config
from flowception_jax.autoencoders import ltx_weights
from flowception_jax.datasets import video_folder

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tiny_latent_run(directory: str, seed: int) -> ml_collections.ConfigDict:
  """`configs/videos.py:tiny` on a folder of four random latent clips (6 frames of 4x4x3) that it
  writes to `directory`: one bucket (one compilation), patches of 2."""
  rng = np.random.default_rng(seed)
  with video_folder.FolderWriter(directory, kind='latents') as writer:
    for i in range(4):
      writer.add(f'video_{i}', rng.normal(size=(6, 4, 4, 3)).astype(np.float32))
  config = load('videos', 'tiny')
  config.data.data_dir = directory
  config.data.buckets = (config.data.max_frames,)
  config.model.patch_size = 2
  return config


# A tiny LTX-Video autoencoder with the real arithmetic (patches of 4, three spatio-temporal
# halvings: 32x in space, 8x in time) and 4 latent channels.
TINY_LTX = dict(latent_channels=4, block_out_channels=(4, 4, 4, 4),
                layers_per_block=(1, 1, 1, 1, 1), decoder_block_out_channels=(4, 4, 4, 4),
                decoder_layers_per_block=(1, 1, 1, 1, 1))


def tiny_ltx_weights(directory: str, seed: int = 0, **fields) -> str:
  """Writes random weights of `TINY_LTX` (updated by `fields`) in the diffusers layout to
  `directory`, with random latent statistics; returns `directory`."""
  config = ltx_config.LTXVideoConfig(**(TINY_LTX | fields))
  shapes = ltx_weights.abstract_params(config)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(shapes)) + 2))
  params = jax.tree.map(lambda s: 0.3 * jax.random.normal(next(keys), s.shape), shapes)
  statistics = {'latents_mean': 0.1 * jax.random.normal(next(keys), (config.latent_channels,)),
                'latents_std': 0.5 + jax.random.uniform(next(keys), (config.latent_channels,))}
  ltx_weights.save(directory, config, params, statistics)
  return directory
