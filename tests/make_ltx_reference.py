r"""Writes the reference fixtures of the LTX-Video port: tiny random autoencoders run by diffusers.

  pip install -e ".[reference]" && python tests/make_ltx_reference.py

Needs the optional `reference` extra (PyTorch, a CPU build is enough, and diffusers); the test
suite does not: it reads what this writes (a second run writes the same bytes). For each tiny
configuration below it seeds a diffusers `AutoencoderKLLTXVideo`, gives every parameter that
PyTorch initialises to a constant a random value (so that no term of the architecture is zero or
an identity), rounds the parameters to float16 (so that the stored file is small and both
implementations use the very same weights), and writes to `tests/data/<name>/`:
  config.json, diffusion_pytorch_model.safetensors: the weights, as `save_pretrained` writes them.
  reference.npz:
    pixels: uint8 [B, T, H, W, 3], the encoded video (the autoencoder sees `pixels / 127.5 - 1`).
    mean, logvar: float32 [B, t, h, w, c], `encode(...).latent_dist` (channels last).
    latents: float32 [B', t', h', w', c], the decoded latents; timesteps: float32 [B'].
    decoded: float32 [B', T', H', W', 3], `decode(latents, timesteps)` (channels last).
    noise_<i>: float32 [H, W], the i-th draw of the decoder's noise injection, in call order.
Everything runs in float32 on the CPU.
"""

import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKLLTXVideo

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

# 0.9.1's layout: strided-convolution encoder blocks; a decoder conditioned on the decode timestep,
# injecting noise, with residual upsampling that halves the width.
LTX_091 = dict(
    latent_channels=4, block_out_channels=(4, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, False), decoder_block_out_channels=(2, 4, 8),
    decoder_layers_per_block=(1, 1, 1, 1), decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(True, True, False, True), upsample_residual=(False, False, True),
    upsample_factor=(2, 2, 2), timestep_conditioning=True, patch_size=2)
# 0.9.5's space-to-depth encoder blocks, with 0.9.0's decoder (no timestep, widths changing inside
# the blocks), made causal.
LTX_095 = dict(
    latent_channels=4, block_out_channels=(4, 8, 8, 8, 8),
    down_block_types=('LTXVideo095DownBlock3D',) * 4, layers_per_block=(1, 1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, True),
    downsample_type=('spatial', 'temporal', 'spatiotemporal', 'spatiotemporal'),
    decoder_block_out_channels=(4, 4, 4, 8), decoder_layers_per_block=(1, 1, 1, 1, 1),
    decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=1,
    decoder_causal=True, spatial_compression_ratio=8, temporal_compression_ratio=8)
CONFIGS = {'ltx_091': LTX_091, 'ltx_095': LTX_095}


def _randomise_constants(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Random values for the parameters PyTorch initialises to a constant (norm scales and biases,
  noise scales, the timestep multiplier), and for the latent statistics."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.numel() == 1 or bool((param == param.flatten()[0]).all()):
        base = param.flatten()[0].item()
        spread = abs(base) * 0.1 if base else 0.3
        param.copy_(base + spread * torch.randn(param.shape, generator=generator))
    channels = model.latents_mean.shape[0]
    model.latents_mean.copy_(0.2 * torch.randn(channels, generator=generator))
    model.latents_std.copy_(0.5 + torch.rand(channels, generator=generator))


def _smooth_video(shape: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
  """uint8 [B, T, H, W, 3]: coarse random colour fields, upsampled, plus fine noise."""
  b, t, h, w, c = shape
  coarse = torch.rand((b * t, c, max(h // 4, 1), max(w // 4, 1)), generator=generator)
  fields = torch.nn.functional.interpolate(coarse, size=(h, w), mode='bilinear')
  fields = fields + 0.1 * torch.randn(fields.shape, generator=generator)
  video = fields.reshape(b, t, c, h, w).permute(0, 1, 3, 4, 2).clamp(0, 1)
  return (video * 255).round().to(torch.uint8).numpy()


def _channels_last(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 4, 1).contiguous().numpy().astype(np.float32)


def make(name: str, fields: dict, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  model = AutoencoderKLLTXVideo(**fields).eval()
  _randomise_constants(model, generator)
  directory = os.path.join(_DATA, name)
  model.half().save_pretrained(directory, safe_serialization=True)
  model.float()
  spatial, temporal = model.spatial_compression_ratio, model.temporal_compression_ratio
  pixels = _smooth_video((2, 1 + temporal, spatial, 2 * spatial, 3), generator)
  noise = []
  draw = torch.randn

  def recording_randn(*args, **kwargs):
    out = draw(*args, **kwargs)
    noise.append(out.numpy().astype(np.float32))
    return out

  with torch.no_grad():
    x = torch.from_numpy(pixels).float().permute(0, 4, 1, 2, 3) / 127.5 - 1
    posterior = model.encode(x).latent_dist
    latents = torch.randn((1, fields['latent_channels'], 2, 2, 1), generator=generator)
    timesteps = torch.tensor([0.05]) if model.config.timestep_conditioning else None
    torch.randn = recording_randn
    try:
      decoded = model.decode(latents, timesteps).sample
    finally:
      torch.randn = draw
  arrays = dict(pixels=pixels, mean=_channels_last(posterior.mean),
                logvar=_channels_last(posterior.logvar), latents=_channels_last(latents),
                decoded=_channels_last(decoded))
  if timesteps is not None:
    arrays['timesteps'] = timesteps.numpy().astype(np.float32)
  arrays.update({f'noise_{i}': n for i, n in enumerate(noise)})
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **arrays)
  with open(os.path.join(directory, 'config.json')) as f:
    config = json.load(f)
  sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
  print(f'{name}: {config["_class_name"]} (diffusers {config["_diffusers_version"]}), files '
        f'{sizes}, {len(noise)} noise draws')


def main() -> None:
  for seed, (name, fields) in enumerate(CONFIGS.items()):
    make(name, fields, seed)


if __name__ == '__main__':
  main()
