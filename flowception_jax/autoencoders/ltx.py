"""The LTX-Video autoencoder behind the `VideoAutoencoder` interface, loaded from diffusers weights.

  autoencoder = ltx.load('/models/ltx-video/vae')  # config.json, diffusion_pytorch_model.safetensors
  latents, latent_lengths = autoencoder.encode(videos, lengths)    # [B, 1 + 8k, H, W, 3] in [0, 1]
  videos, lengths = autoencoder.decode(latents, latent_lengths)

Encoding keeps the posterior mean (deterministic latents, as training data wants). Decoders
conditioned on a timestep (0.9.1 and later) decode as LTX-Video's pipeline does: the latents are
first mixed with noise, `(1 - noise_scale) z + noise_scale e`, and the decoder is told the
`decode_timestep`; defaults are the values LTX-Video suggests (0.05 and 0.025). Those decoders
may also inject spatial noise inside; both draw from the `key` that `decode` takes.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowception_jax.autoencoders import base
from flowception_jax.autoencoders import ltx_config
from flowception_jax.autoencoders import ltx_video
from flowception_jax.autoencoders import ltx_weights

NAME = 'ltx'


class LTXVideoAutoencoder(base.VideoAutoencoder):
  """LTX-Video's `CausalVideoAutoencoder` (`ltx_video.LTXVideoVAE`) with its weights."""
  name = NAME

  def __init__(self, config: ltx_config.LTXVideoConfig, params, statistics: dict[str, np.ndarray],
               *, weights: str | None = None, decode_timestep: float = 0.05,
               decode_noise_scale: float = 0.025):
    """`statistics` holds `latents_mean` and `latents_std` [latent_channels]; `weights` is the
    folder they came from (recorded in `metadata`)."""
    config.check()
    self.config, self.params, self.weights = config, params, weights
    self.decode_timestep, self.decode_noise_scale = decode_timestep, decode_noise_scale
    self.temporal_factor, self.spatial_factor = config.temporal_factor, config.spatial_factor
    self.latent_channels = config.latent_channels
    self.causal_encoder, self.causal_decoder = config.encoder_causal, config.decoder_causal
    self.latents_mean = np.asarray(statistics['latents_mean'], np.float32)
    self.latents_std = np.asarray(statistics['latents_std'], np.float32)
    self.scaling_factor = config.scaling_factor
    self.model = ltx_video.LTXVideoVAE(config)

  @functools.cached_property
  def _jit_encode(self):
    return jax.jit(lambda params, x: self.model.apply({'params': params}, x,
                                                      method=self.model.encode)[0])

  @functools.cached_property
  def _jit_decode(self):
    conditioned = self.config.timestep_conditioning

    def decode(params, z, key):
      mix_key, inject_key = jax.random.split(key)
      timesteps = None
      if conditioned:
        noise = jax.random.normal(mix_key, z.shape, z.dtype)
        z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * noise
        timesteps = jnp.full((z.shape[0],), self.decode_timestep, jnp.float32)
      return self.model.apply({'params': params}, z, timesteps, method=self.model.decode,
                              rngs={'noise': inject_key})

    return jax.jit(decode)

  def _encode(self, pixels: np.ndarray) -> jax.Array:
    return self._jit_encode(self.params, pixels)

  def _decode(self, latents: np.ndarray, key: jax.Array) -> jax.Array:
    return self._jit_decode(self.params, latents, key)

  def metadata(self) -> dict[str, Any]:
    return {'name': NAME, 'weights': self.weights, 'config': self.config.to_dict(),
            'decode_timestep': self.decode_timestep,
            'decode_noise_scale': self.decode_noise_scale,
            'temporal_factor': self.temporal_factor, 'spatial_factor': self.spatial_factor,
            'latent_channels': self.latent_channels}


def load(weights: str, *, decode_timestep: float = 0.05,
         decode_noise_scale: float = 0.025) -> LTXVideoAutoencoder:
  """The autoencoder of the diffusers weights folder `weights` (see `ltx_weights`)."""
  weights = os.path.abspath(os.path.expanduser(weights))
  config, params, statistics = ltx_weights.load(weights)
  return LTXVideoAutoencoder(config, params, statistics, weights=weights,
                             decode_timestep=decode_timestep,
                             decode_noise_scale=decode_noise_scale)
