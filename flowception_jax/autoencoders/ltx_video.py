"""The LTX-Video causal video autoencoder in Flax linen (diffusers' `AutoencoderKLLTXVideo`).

Videos are channels-last, [B, T, H, W, C], with pixels in [-1, 1]. The encoder patchifies each
frame (`patch_size` x `patch_size` pixels to channels), then runs causal 3D convolutions, ResNet
blocks and spatio-temporal downsampling (strided convolutions, or the space-to-depth downsamplers of
0.9.5) to `latent_channels`; the decoder mirrors it with depth-to-space upsampling, optionally
conditioned on a decode timestep and injecting spatial noise (0.9.1 and later). Time is causal in
the encoder: a frame's first copy pads the past, so latent frame `j` sees pixel frames up to `8 j`
and nothing after; each temporal halving keeps the first frame alone, so `1 + 8 k` pixel frames give
`1 + k` latent frames and back. The architecture's settings are `ltx_config.LTXVideoConfig`.
Parameter names follow the diffusers checkpoint keys (`down_blocks.0.resnets.1` is
`down_blocks_0/resnets_1`), so `ltx_weights.py` converts by name.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowception_jax.autoencoders import ltx_config

_TIME_FEATURES = 256
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clips the log-variance.


def rms_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """RMS normalisation over channels, no scale (diffusers' `RMSNorm(elementwise_affine=False)`)."""
  variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  return (x * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def space_to_depth(x: jax.Array, stride: tuple[int, int, int]) -> jax.Array:
  """[B, T, H, W, C] -> [B, T/s0, H/s1, W/s2, C s0 s1 s2], channel `c s0 s1 s2 + i s1 s2 + j s2 + k`
  holding pixel (s0 t + i, s1 h + j, s2 w + k)."""
  b, t, h, w, c = x.shape
  s0, s1, s2 = stride
  x = x.reshape(b, t // s0, s0, h // s1, s1, w // s2, s2, c)
  return x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, t // s0, h // s1, w // s2, c * s0 * s1 * s2)


def depth_to_space(x: jax.Array, stride: tuple[int, int, int]) -> jax.Array:
  """The inverse of `space_to_depth`: [B, T, H, W, C s0 s1 s2] -> [B, s0 T, s1 H, s2 W, C]."""
  b, t, h, w, c = x.shape
  s0, s1, s2 = stride
  x = x.reshape(b, t, h, w, c // (s0 * s1 * s2), s0, s1, s2)
  return x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * s0, h * s1, w * s2, -1)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, T, H/p, W/p, C p p], channel `c p p + pw p + ph` (LTX's order: the
  column inside the patch before the row)."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, t, h // patch, w // patch, c * patch * patch)


def unpatchify(x: jax.Array, patch: int) -> jax.Array:
  """The inverse of `patchify`: [B, T, h, w, C p p] -> [B, T, h p, w p, C]."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h, w, c // (patch * patch), patch, patch)
  return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, t, h * patch, w * patch, -1)


def spatial_noise(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
  """The noise [H, W] a noise-injecting block adds, shared by channels, frames and videos."""
  return jax.random.normal(key, shape, dtype)


def timestep_features(timesteps: jax.Array, dim: int = _TIME_FEATURES) -> jax.Array:
  """Sinusoidal features [B, dim] of timesteps [B]: cosines then sines (diffusers' `Timesteps`
  with `flip_sin_to_cos=True`, no frequency shift)."""
  half = dim // 2
  frequencies = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class CausalConv3d(nn.Module):
  """A 3D convolution whose time padding repeats the first frame (causal) or both end frames;
  space is zero-padded to keep the size (divided by the stride)."""
  features: int
  kernel_size: int = 3
  stride: tuple[int, int, int] = (1, 1, 1)
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> [B, T', H', W', features]
    k = self.kernel_size
    before, after = (k - 1, 0) if self.causal else ((k - 1) // 2, (k - 1) // 2)
    x = jnp.concatenate([jnp.repeat(x[:, :1], before, axis=1), x,
                         jnp.repeat(x[:, -1:], after, axis=1)], axis=1)
    return nn.Conv(self.features, (k, k, k), strides=self.stride,
                   padding=((0, 0), (k // 2, k // 2), (k // 2, k // 2)), name='conv')(x)


class ResnetBlock3d(nn.Module):
  """RMS norm, SiLU and a causal convolution, twice, plus the (projected) input; with timestep
  conditioning each norm is followed by a per-video scale and shift, and with noise injection each
  convolution by per-channel scaled spatial noise (rng stream 'noise')."""
  features: int
  eps: float = 1e-6
  causal: bool = True
  inject_noise: bool = False
  timestep_conditioning: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x [B, T, H, W, C], temb [B, 4 C] (with timestep conditioning) -> [B, T, H, W, features]."""
    channels = x.shape[-1]
    h = rms_norm(x)
    if self.timestep_conditioning:
      table = self.param('scale_shift_table',
                         lambda key, shape: jax.random.normal(key, shape) / channels ** 0.5,
                         (4, channels))
      modulation = temb.reshape(-1, 4, channels) + table[None]
      shift1, scale1, shift2, scale2 = (modulation[:, i, None, None, None, :] for i in range(4))
      h = h * (1 + scale1) + shift1
    h = CausalConv3d(self.features, causal=self.causal, name='conv1')(nn.silu(h))
    if self.inject_noise:
      h = self._add_noise(h, 'per_channel_scale1', channels)
    h = rms_norm(h)
    if self.timestep_conditioning:
      h = h * (1 + scale2) + shift2
    h = CausalConv3d(self.features, causal=self.causal, name='conv2')(nn.silu(h))
    if self.inject_noise:
      h = self._add_noise(h, 'per_channel_scale2', channels)
    if channels != self.features:
      x = nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name='norm3')(x)
      x = CausalConv3d(self.features, kernel_size=1, causal=self.causal, name='conv_shortcut')(x)
    return h + x

  def _add_noise(self, h: jax.Array, name: str, channels: int) -> jax.Array:
    scale = self.param(name, nn.initializers.zeros_init(), (channels,))
    noise = spatial_noise(self.make_rng('noise'), h.shape[2:4], h.dtype)
    return h + noise[None, None, :, :, None] * scale


class Downsampler3d(nn.Module):
  """Space-to-depth downsampling of 0.9.5: a convolution to `features / (s0 s1 s2)` channels folded
  into `features`, plus the input folded and averaged in groups (a parameter-free shortcut)."""
  features: int
  stride: tuple[int, int, int]
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> [B, T/s0, ..., features]
    volume = math.prod(self.stride)
    x = jnp.concatenate([x[:, :self.stride[0] - 1], x], axis=1)  # Keeps the first frame alone.
    residual = space_to_depth(x, self.stride)
    residual = residual.reshape(*residual.shape[:-1], self.features, -1).mean(-1)
    h = CausalConv3d(self.features // volume, causal=self.causal, name='conv')(x)
    return space_to_depth(h, self.stride) + residual


class Upsampler3d(nn.Module):
  """Depth-to-space upsampling: a convolution to `C s0 s1 s2 / factor` channels unfolded in
  space-time, dropping the first `s0 - 1` frames so that `T` latent frames give `s0 T - (s0 - 1)`;
  optionally plus the input unfolded and repeated (`residual`)."""
  stride: tuple[int, int, int] = (2, 2, 2)
  causal: bool = True
  residual: bool = False
  upscale_factor: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> [B, 2T-1, 2H, 2W, C/factor]
    volume = math.prod(self.stride)
    h = CausalConv3d(x.shape[-1] * volume // self.upscale_factor, causal=self.causal,
                     name='conv')(x)
    h = depth_to_space(h, self.stride)[:, self.stride[0] - 1:]
    if self.residual:
      shortcut = depth_to_space(x, self.stride)[:, self.stride[0] - 1:]
      h = h + jnp.tile(shortcut, (1, 1, 1, 1, volume // self.upscale_factor))
    return h


class TimestepEmbedding(nn.Module):
  """Timesteps [B] to [B, features]: sinusoidal features, then Dense-SiLU-Dense (diffusers'
  `PixArtAlphaCombinedTimestepSizeEmbeddings` without size conditioning)."""
  features: int

  @nn.compact
  def __call__(self, timesteps: jax.Array) -> jax.Array:
    h = timestep_features(timesteps)
    h = nn.Dense(self.features, name='linear_1')(h)
    return nn.Dense(self.features, name='linear_2')(nn.silu(h))


class _TimeEmbedder(nn.Module):
  """The `time_embedder` of diffusers' blocks, a holder of its `timestep_embedder`."""
  features: int

  @nn.compact
  def __call__(self, timesteps: jax.Array) -> jax.Array:
    return TimestepEmbedding(self.features, name='timestep_embedder')(timesteps)


class DownBlock3d(nn.Module):
  """Encoder block: ResNet blocks, then (if `stride`) a strided causal convolution (`kind`
  'conv') or a space-to-depth `Downsampler3d`, then (0.9.0 blocks) a ResNet block to `features`."""
  features: int
  num_layers: int
  stride: tuple[int, int, int] | None
  kind: str = 'conv'
  conv_out: bool = True
  eps: float = 1e-6
  causal: bool = True

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> [B, T', H', W', features]
    channels = h.shape[-1]
    for j in range(self.num_layers):
      h = ResnetBlock3d(channels, eps=self.eps, causal=self.causal, name=f'resnets_{j}')(h)
    if self.stride is not None:
      if self.kind == 'conv':
        h = CausalConv3d(channels, stride=(2, 2, 2), causal=self.causal, name='downsamplers_0')(h)
      else:
        h = Downsampler3d(self.features, self.stride, causal=self.causal,
                          name='downsamplers_0')(h)
    if self.conv_out and h.shape[-1] != self.features:
      h = ResnetBlock3d(self.features, eps=self.eps, causal=self.causal, name='conv_out')(h)
    return h


class MidBlock3d(nn.Module):
  """ResNet blocks at constant width, conditioned on the embedded timesteps where asked."""
  num_layers: int
  eps: float = 1e-6
  causal: bool = True
  inject_noise: bool = False
  timestep_conditioning: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    channels = h.shape[-1]
    temb = None
    if self.timestep_conditioning:
      temb = _TimeEmbedder(4 * channels, name='time_embedder')(timesteps)
    for j in range(self.num_layers):
      h = ResnetBlock3d(channels, eps=self.eps, causal=self.causal, inject_noise=self.inject_noise,
                        timestep_conditioning=self.timestep_conditioning,
                        name=f'resnets_{j}')(h, temb)
    return h


class UpBlock3d(nn.Module):
  """Decoder block: a ResNet block to `features` (if `in_features` differs), an `Upsampler3d` (if
  `upsample`), then ResNet blocks, conditioned on the embedded timesteps where asked."""
  in_features: int
  features: int
  num_layers: int
  upsample: bool = True
  residual: bool = False
  upscale_factor: int = 1
  eps: float = 1e-6
  causal: bool = False
  inject_noise: bool = False
  timestep_conditioning: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    block = dict(eps=self.eps, causal=self.causal, inject_noise=self.inject_noise,
                 timestep_conditioning=self.timestep_conditioning)
    if self.in_features != self.features:
      h = ResnetBlock3d(self.features, name='conv_in', **block)(h)
    temb = None
    if self.timestep_conditioning:
      temb = _TimeEmbedder(4 * self.in_features, name='time_embedder')(timesteps)
    if self.upsample:
      h = Upsampler3d(causal=self.causal, residual=self.residual,
                      upscale_factor=self.upscale_factor, name='upsamplers_0')(h)
    for j in range(self.num_layers):
      h = ResnetBlock3d(self.features, name=f'resnets_{j}', **block)(h, temb)
    return h


class Encoder(nn.Module):
  """Pixels [B, 1 + 8k, H, W, 3] in [-1, 1] to the posterior (mean, log-variance), each
  [B, 1 + k, H/32, W/32, latent_channels] (factors of LTX-Video; `LTXVideoConfig` gives others)."""
  config: ltx_config.LTXVideoConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    causal, eps = c.encoder_causal, c.resnet_norm_eps
    h = CausalConv3d(c.block_out_channels[0], causal=causal, name='conv_in')(
        patchify(x, c.patch_size))
    ltx_095 = c.down_block_types[-1] == 'LTXVideo095DownBlock3D'
    strides = c.encoder_strides()
    for i, stride in enumerate(strides):
      out = c.block_out_channels[i + 1 if ltx_095 else min(i + 1, len(strides) - 1)]
      h = DownBlock3d(out, c.layers_per_block[i], stride,
                      kind=c.downsample_type[i] if ltx_095 else 'conv', conv_out=not ltx_095,
                      eps=eps, causal=causal, name=f'down_blocks_{i}')(h)
    h = MidBlock3d(c.layers_per_block[-1], eps=eps, causal=causal, name='mid_block')(h)
    h = CausalConv3d(c.latent_channels + 1, causal=causal, name='conv_out')(nn.silu(rms_norm(h)))
    # One log-variance channel is shared by every latent channel.
    logvar = jnp.broadcast_to(h[..., -1:], h[..., :-1].shape)
    return h[..., :-1], jnp.clip(logvar, *_LOGVAR_RANGE)


class Decoder(nn.Module):
  """Latents [B, 1 + k, h, w, latent_channels] to pixels [B, 1 + 8k, 32 h, 32 w, 3] in about
  [-1, 1]; `timesteps` [B] is the decode timestep of conditioned decoders (None otherwise)."""
  config: ltx_config.LTXVideoConfig

  @nn.compact
  def __call__(self, z: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    c = self.config
    conditioned = c.timestep_conditioning
    if conditioned and timesteps is None:
      raise ValueError('this decoder is timestep-conditioned: pass the decode timesteps [B]')
    causal, eps = c.decoder_causal, c.resnet_norm_eps
    blocks = c.decoder_blocks()
    h = CausalConv3d(c.decoder_block_out_channels[-1], causal=causal, name='conv_in')(z)
    if conditioned:
      timesteps = timesteps * self.param('timestep_scale_multiplier',
                                         nn.initializers.constant(1000.0), ())
    h = MidBlock3d(tuple(reversed(c.decoder_layers_per_block))[0], eps=eps, causal=causal,
                   inject_noise=tuple(reversed(c.decoder_inject_noise))[0],
                   timestep_conditioning=conditioned, name='mid_block')(h, timesteps)
    for i, block in enumerate(blocks):
      h = UpBlock3d(**block, eps=eps, causal=causal, timestep_conditioning=conditioned,
                    name=f'up_blocks_{i}')(h, timesteps)
    h = rms_norm(h)
    if conditioned:
      out = h.shape[-1]
      table = self.param('scale_shift_table',
                         lambda key, shape: jax.random.normal(key, shape) / out ** 0.5, (2, out))
      temb = _TimeEmbedder(2 * out, name='time_embedder')(timesteps)
      shift, scale = jnp.unstack(temb.reshape(-1, 2, out) + table[None], axis=1)
      h = h * (1 + scale[:, None, None, None]) + shift[:, None, None, None]
    h = CausalConv3d(c.out_channels * c.patch_size ** 2, causal=causal, name='conv_out')(
        nn.silu(h))
    return unpatchify(h, c.patch_size)


class LTXVideoVAE(nn.Module):
  """The autoencoder: `encode` (pixels to posterior moments) and `decode` (latents to pixels),
  applied with `method=`. Latents here are raw, before the per-channel normalisation that
  `ltx.LTXVideoAutoencoder` applies. Decoders that inject noise need the rng stream 'noise'."""
  config: ltx_config.LTXVideoConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encoder(pixels)

  def decode(self, latents: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    return self.decoder(latents, timesteps)

  def __call__(self, pixels: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
    """The reconstruction of `pixels` from the posterior mean (used to initialise parameters)."""
    return self.decode(self.encode(pixels)[0], timesteps)
