"""LTX-Video autoencoder weights in the diffusers layout, read into Flax parameters and back.

A weights folder holds `config.json` (the `AutoencoderKLLTXVideo` config) and
`diffusion_pytorch_model.safetensors` (PyTorch tensors by module path, float32 or bfloat16, plus the
`latents_mean` and `latents_std` buffers, float [latent_channels]). The conversion goes by name:
`ltx_video.py` names its modules as the diffusers checkpoint does, a list entry `resnets.1` being
the module `resnets_1`; convolution kernels [O, I, T, H, W] become [T, H, W, I, O], linear ones [O, I]
become [I, O], and every tensor of the file must fill exactly one parameter of the configured
architecture, with its shape.
"""

import json
import os
import re

import flax
import jax
import numpy as np
from safetensors import flax as safetensors_flax
from safetensors import numpy as safetensors_numpy

from flowception_jax.autoencoders import ltx_config
from flowception_jax.autoencoders import ltx_video

CONFIG = 'config.json'
WEIGHTS = 'diffusion_pytorch_model.safetensors'
STATISTICS = ('latents_mean', 'latents_std')
DOWNLOAD = ('the diffusers form of an LTX-Video autoencoder: the files vae/config.json and '
            'vae/diffusion_pytorch_model.safetensors of the Hugging Face repository '
            'Lightricks/LTX-Video (e.g. huggingface-cli download Lightricks/LTX-Video '
            "--include 'vae/*' --local-dir DIR, then pass DIR/vae)")
_LIST_ENTRY = re.compile(r'(down_blocks|up_blocks|resnets|downsamplers|upsamplers)_(\d+)')
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight'}


def torch_name(path: tuple[str, ...]) -> str:
  """The diffusers key of the Flax parameter at `path`, e.g. ('encoder', 'down_blocks_0',
  'resnets_1', 'conv1', 'conv', 'kernel') -> 'encoder.down_blocks.0.resnets.1.conv1.conv.weight'."""
  modules = [_LIST_ENTRY.sub(r'\1.\2', name) for name in path[:-1]]
  return '.'.join(modules + [_LEAF_NAMES.get(path[-1], path[-1])])


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in the layout of the Flax parameter named `leaf`."""
  if leaf == 'kernel' and array.ndim == 5:  # Convolution [O, I, T, H, W] -> [T, H, W, I, O].
    return array.transpose(2, 3, 4, 1, 0)
  if leaf == 'kernel':  # Linear [O, I] -> [I, O].
    return array.T
  if leaf.startswith('per_channel_scale'):  # Noise scale [C, 1, 1] -> [C].
    return array.reshape(-1)
  return array


def _to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  """The inverse of `_to_flax`."""
  if leaf == 'kernel' and array.ndim == 5:
    return array.transpose(4, 3, 0, 1, 2)
  if leaf == 'kernel':
    return array.T
  if leaf.startswith('per_channel_scale'):
    return array.reshape(-1, 1, 1)
  return array


def read_config(directory: str) -> ltx_config.LTXVideoConfig:
  """The architecture of the weights folder `directory` (its `config.json`)."""
  missing = [name for name in (CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(directory,
                                                                                   name))]
  if missing:
    raise FileNotFoundError(f'no {" and no ".join(missing)} in {directory!r}: the autoencoder '
                            f'weights folder needs {DOWNLOAD}')
  with open(os.path.join(directory, CONFIG)) as f:
    fields = json.load(f)
  if fields.get('_class_name', 'AutoencoderKLLTXVideo') != 'AutoencoderKLLTXVideo':
    raise ValueError(f'{directory}/{CONFIG} describes a {fields["_class_name"]}, not an '
                     f'AutoencoderKLLTXVideo; the folder needs {DOWNLOAD}')
  return ltx_config.LTXVideoConfig.from_dict(fields)


def abstract_params(config: ltx_config.LTXVideoConfig):
  """The shapes (`jax.ShapeDtypeStruct`) of the parameters of `LTXVideoVAE(config)`."""
  model = ltx_video.LTXVideoVAE(config)
  pixels = np.zeros((1, 1 + config.temporal_factor, config.spatial_factor, config.spatial_factor,
                     config.in_channels), np.float32)
  timesteps = np.zeros((1,), np.float32) if config.timestep_conditioning else None
  keys = {'params': jax.random.key(0), 'noise': jax.random.key(1)}
  return jax.eval_shape(model.init, keys, pixels, timesteps)['params']


def load(directory: str) -> tuple[ltx_config.LTXVideoConfig, dict, dict[str, np.ndarray]]:
  """(config, Flax parameters, latent statistics) of the weights folder `directory`.

  The statistics are `latents_mean` and `latents_std`, float32 [latent_channels] (zeros and ones
  where the file has none). Raises FileNotFoundError naming what to download when the folder is
  incomplete, and ValueError when a tensor is missing, left over or of the wrong shape.
  """
  config = read_config(directory)
  path = os.path.join(directory, WEIGHTS)
  tensors = {name: np.asarray(value, np.float32)
             for name, value in safetensors_flax.load_file(path).items()}
  statistics = {name: tensors.pop(name, np.full(config.latent_channels, float(name[-3:] == 'std'),
                                                np.float32)) for name in STATISTICS}
  flat = flax.traverse_util.flatten_dict(abstract_params(config))
  params, problems = {}, []
  for key, target in flat.items():
    name = torch_name(key)
    if name not in tensors:
      problems.append(f'missing {name} {tuple(target.shape)}')
      continue
    array = _to_flax(key[-1], tensors.pop(name))
    if array.shape != tuple(target.shape):
      problems.append(f'{name}: {array.shape} in the file, {tuple(target.shape)} in the model')
    params[key] = array
  problems += [f'unused {name} {tensors[name].shape}' for name in sorted(tensors)]
  if problems:
    raise ValueError(f'{path} does not fit the architecture of its {CONFIG} '
                     f'({len(problems)} problems): ' + '; '.join(problems[:10]))
  return config, flax.traverse_util.unflatten_dict(params), statistics


def save(directory: str, config: ltx_config.LTXVideoConfig, params,
         statistics: dict[str, np.ndarray] | None = None) -> None:
  """Writes `params` (and the latent statistics) as a diffusers weights folder that `load` and
  diffusers' `AutoencoderKLLTXVideo.from_pretrained` read."""
  os.makedirs(directory, exist_ok=True)
  tensors = {}
  for key, value in flax.traverse_util.flatten_dict(params).items():
    name = torch_name(key)
    tensors[name] = np.array(_to_torch(key[-1], np.asarray(value, np.float32)), order='C')
  for name, value in (statistics or {}).items():
    tensors[name] = np.asarray(value, np.float32)
  safetensors_numpy.save_file(tensors, os.path.join(directory, WEIGHTS))
  fields = {'_class_name': 'AutoencoderKLLTXVideo', **config.to_dict()}
  with open(os.path.join(directory, CONFIG), 'w') as f:
    json.dump(fields, f, indent=1)
