"""The settings of the LTX-Video autoencoder: a diffusers `AutoencoderKLLTXVideo` config, checked,
and the arithmetic that follows from it (compression factors, the decoder blocks' widths)."""

import dataclasses
import math
from typing import Any

_BLOCK_TYPES = ('LTXVideoDownBlock3D', 'LTXVideo095DownBlock3D')
# Stride (time, height, width) of each downsampling kind of the 0.9.5 encoder blocks.
_DOWNSAMPLE_STRIDES = {'conv': (2, 2, 2), 'spatial': (1, 2, 2), 'temporal': (2, 1, 1),
                       'spatiotemporal': (2, 2, 2)}


@dataclasses.dataclass(frozen=True)
class LTXVideoConfig:
  """The architecture: the fields of a diffusers `config.json` of `AutoencoderKLLTXVideo`.

  The defaults are LTX-Video 0.9.0's; 0.9.1 adds decoder timestep conditioning, noise injection
  and residual upsampling, 0.9.5 the space-to-depth encoder blocks (`LTXVideo095DownBlock3D`).
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 128
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  down_block_types: tuple[str, ...] = ('LTXVideoDownBlock3D',) * 4
  decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
  decoder_layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
  spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
  decoder_spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
  decoder_inject_noise: tuple[bool, ...] = (False, False, False, False, False)
  downsample_type: tuple[str, ...] = ('conv', 'conv', 'conv', 'conv')
  upsample_residual: tuple[bool, ...] = (False, False, False, False)
  upsample_factor: tuple[int, ...] = (1, 1, 1, 1)
  timestep_conditioning: bool = False
  patch_size: int = 4
  patch_size_t: int = 1
  resnet_norm_eps: float = 1e-6
  scaling_factor: float = 1.0
  encoder_causal: bool = True
  decoder_causal: bool = False
  spatial_compression_ratio: int | None = None
  temporal_compression_ratio: int | None = None

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> 'LTXVideoConfig':
    """The config of a diffusers `config.json` (its `_`-prefixed bookkeeping keys ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in fields.items() if not k.startswith('_')}
    unknown = sorted(set(given) - known)
    if unknown:
      raise ValueError(f'unknown fields {unknown} in an AutoencoderKLLTXVideo config; this port '
                       f'knows {sorted(known)}')
    config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    config.check()
    return config

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def encoder_strides(self) -> list[tuple[int, int, int] | None]:
    """The (time, height, width) stride of each encoder block, None where it keeps the size."""
    ltx_095 = self.down_block_types[-1] == 'LTXVideo095DownBlock3D'
    num_blocks = len(self.block_out_channels) - (1 if ltx_095 else 0)
    return [(_DOWNSAMPLE_STRIDES[self.downsample_type[i]] if ltx_095 else (2, 2, 2))
            if self.spatio_temporal_scaling[i] else None for i in range(num_blocks)]

  @property
  def temporal_factor(self) -> int:
    """Pixel frames per latent frame after the first (8 for LTX-Video)."""
    return math.prod(s[0] for s in self.encoder_strides() if s) * self.patch_size_t

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent row and column (32 for LTX-Video)."""
    return math.prod(s[1] for s in self.encoder_strides() if s) * self.patch_size

  def decoder_blocks(self) -> list[dict[str, Any]]:
    """The arguments of each decoder `UpBlock3d`, in order: diffusers' arithmetic, whose widths
    are divided by the block's upscale factor."""
    channels = tuple(reversed(self.decoder_block_out_channels))
    layers = tuple(reversed(self.decoder_layers_per_block))
    scaling = tuple(reversed(self.decoder_spatio_temporal_scaling))
    noise = tuple(reversed(self.decoder_inject_noise))
    residual = tuple(reversed(self.upsample_residual))
    factor = tuple(reversed(self.upsample_factor))
    blocks, out = [], channels[0]
    for i, width in enumerate(channels):
      inp, out = out // factor[i], width // factor[i]
      blocks.append(dict(in_features=inp, features=out, num_layers=layers[i + 1],
                         upsample=scaling[i], residual=residual[i], upscale_factor=factor[i],
                         inject_noise=noise[i + 1]))
    return blocks

  def check(self) -> None:
    """Raises ValueError for configurations this port does not build."""
    if self.patch_size_t != 1:
      raise ValueError(f'patch_size_t={self.patch_size_t}: only 1 (every LTX-Video release) is '
                       'supported')
    unknown = sorted(set(self.down_block_types) - set(_BLOCK_TYPES))
    if unknown:
      raise ValueError(f'unknown down_block_types {unknown}; known: {_BLOCK_TYPES}')
    upsampled = 2 ** sum(self.decoder_spatio_temporal_scaling)
    if (upsampled, upsampled * self.patch_size) != (self.temporal_factor, self.spatial_factor):
      raise ValueError(f'the decoder upsamples by {upsampled} in time and space but the encoder '
                       f'compresses time by {self.temporal_factor} and space by '
                       f'{self.spatial_factor // self.patch_size} (after patches)')
    if self.timestep_conditioning and any(b['in_features'] != b['features']
                                          for b in self.decoder_blocks()):
      raise ValueError('a timestep-conditioned decoder needs up blocks of constant width (as '
                       'every LTX-Video release has)')
    for name, value, actual in (('spatial', self.spatial_compression_ratio, self.spatial_factor),
                                ('temporal', self.temporal_compression_ratio,
                                 self.temporal_factor)):
      if value is not None and value != actual:
        raise ValueError(f'{name}_compression_ratio={value} but the blocks compress by {actual}')
