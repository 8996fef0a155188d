"""Loads `configs/<name>.py` as `--config=configs/<name>.py:<variant>` does, for tests."""

import importlib.util
import os

import ml_collections
import numpy as np

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
