"""What every video autoencoder provides: `encode` videos to latents, `decode` latents to videos.

The arithmetic is that of causal video autoencoders. With a temporal factor `f` (8 for LTX-Video)
the first latent frame holds the first pixel frame alone and each later one the next `f`, so a
video of `1 + f k` frames has `1 + k` latent frames and decodes back to `1 + f k`; with a spatial
factor `s` (32) an `H x W` frame becomes `H/s x W/s`. Other lengths and sizes are refused, naming
the crop or pad that fits.

Conventions at the boundary (those of the rest of the package):
  videos:  float32 [B, T, H, W, 3] in [0, 1], as data sources give them and samples are written.
  latents: float32 [B, t, h, w, c], normalised per channel, `(z - mean) / std * scaling_factor`
           with the autoencoder's own statistics, so that a model sees them at about unit scale.
  lengths: int [B], the frames of each video (or latent frames); slots past a length are padding,
           zero in outputs. Batches of different lengths are padded to the longest.
A causal direction runs on the padded batch at once (what follows a video's end cannot change
it); a non-causal one (LTX-Video's decoder) runs per length group, so that padding never leaks
into a video. Each distinct (group size, length) compiles once.
"""

import abc
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_RANGE_SLACK = 1e-3


class VideoAutoencoder(abc.ABC):
  """A video autoencoder with its normalisation; subclasses give the networks (`_encode`,
  `_decode`) and what a latent folder records about them (`metadata`)."""
  name: str  # The registry name (`autoencoders.ENCODERS`).
  temporal_factor: int  # Pixel frames per latent frame after the first.
  spatial_factor: int  # Pixels per latent row and column.
  latent_channels: int
  causal_encoder: bool
  causal_decoder: bool
  latents_mean: np.ndarray  # float32 [c], the mean of the raw latents.
  latents_std: np.ndarray  # float32 [c], their standard deviation.
  scaling_factor: float

  @abc.abstractmethod
  def _encode(self, pixels: np.ndarray) -> jax.Array:
    """Pixels [B, 1 + f k, H, W, 3] in [-1, 1] to raw latents [B, 1 + k, H/s, W/s, c]."""

  @abc.abstractmethod
  def _decode(self, latents: np.ndarray, key: jax.Array) -> jax.Array:
    """Raw latents [B, 1 + k, h, w, c] to pixels [B, 1 + f k, s h, s w, 3] in about [-1, 1];
    `key` draws whatever the decoder draws."""

  @abc.abstractmethod
  def metadata(self) -> dict[str, Any]:
    """A JSON description (name, weights, architecture, settings) that a latent folder records,
    from which `autoencoders.from_metadata` builds the same autoencoder again."""

  def latent_length(self, frames: int) -> int:
    """Latent frames of a video of `frames` frames; ValueError unless `frames` is `1 + f k`."""
    frames = int(frames)
    if frames < 1 or (frames - 1) % self.temporal_factor:
      below = self.cropped_length(frames) if frames >= 1 else None
      above = 1 + -(-(max(frames, 1) - 1) // self.temporal_factor) * self.temporal_factor
      raise ValueError(
          f'a video of {frames} frames does not fit the {self.name} autoencoder, which takes '
          f'1 + {self.temporal_factor} k frames: crop it to {below} frames (keep the first) or '
          f'pad it to {above} (repeat the last)')
    return 1 + (frames - 1) // self.temporal_factor

  def pixel_length(self, latent_frames: int) -> int:
    """Pixel frames that `latent_frames` latent frames decode to."""
    return 1 + (int(latent_frames) - 1) * self.temporal_factor

  def cropped_length(self, frames: int) -> int:
    """The longest valid length `1 + f k` not above `frames` (>= 1)."""
    if frames < 1:
      raise ValueError(f'a video needs at least one frame, got {frames}')
    return 1 + (int(frames) - 1) // self.temporal_factor * self.temporal_factor

  def check_frame_size(self, height: int, width: int) -> None:
    """ValueError unless both sides are multiples of the spatial factor."""
    s = self.spatial_factor
    if height % s or width % s or not height or not width:
      fit = lambda n, up: max(s, (n // s + up) * s)
      raise ValueError(
          f'frames of {height}x{width} do not fit the {self.name} autoencoder, whose sides are '
          f'multiples of {s}: crop or resize them to {fit(height, 0)}x{fit(width, 0)}, or pad '
          f'them to {fit(height, bool(height % s))}x{fit(width, bool(width % s))}')

  def normalise(self, raw: jax.Array) -> jax.Array:
    """Raw latents [..., c] to the normalised latents a model sees."""
    return (raw - self.latents_mean) / self.latents_std * self.scaling_factor

  def denormalise(self, latents: jax.Array) -> jax.Array:
    """The inverse of `normalise`."""
    return latents / self.scaling_factor * self.latents_std + self.latents_mean

  def encode(self, videos: np.ndarray,
             lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latents of videos.

    Args:
      videos: float [B, T, H, W, 3] in [0, 1]; frames past a video's length are ignored (a
        causal encoder runs on all T, so padding the batch to a few fixed T compiles it once
        for each).
      lengths: int [B] frames per video, each `1 + f k` (default: all T).

    Returns:
      (latents float32 [B, t, H/s, W/s, c] normalised, zero past each video's latent length,
      latent lengths int32 [B]); t is the longest latent length.
    """
    videos = np.asarray(videos, np.float32)
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise ValueError(f'expected videos [B, T, H, W, 3], got shape {videos.shape}')
    if videos.min() < -_RANGE_SLACK or videos.max() > 1 + _RANGE_SLACK:
      raise ValueError(f'videos must be in [0, 1], got values in [{videos.min():.3g}, '
                       f'{videos.max():.3g}]')
    self.check_frame_size(*videos.shape[2:4])
    lengths = _lengths(lengths, videos.shape[:2])
    latent_lengths = np.array([self.latent_length(n) for n in lengths], np.int32)
    pixels = videos * 2 - 1
    if self.causal_encoder:  # The whole padded batch, its padding made a valid length.
      frames = self.pixel_length(1 + -(-(pixels.shape[1] - 1) // self.temporal_factor))
      pixels = np.concatenate(
          [pixels, np.repeat(pixels[:, -1:], frames - pixels.shape[1], axis=1)], axis=1)
    encode = lambda x, _: self.normalise(self._encode(x))
    latents = _run(encode, pixels, latent_lengths, self.pixel_length, self.causal_encoder,
                   jax.random.key(0))[:, :latent_lengths.max()]
    return _zero_padding(latents, latent_lengths), latent_lengths

  def decode(self, latents: np.ndarray, lengths: np.ndarray | None = None, *,
             key: jax.Array | None = None,
             batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Videos of latents.

    Args:
      latents: float [B, t, h, w, c], normalised; slots past a video's length are ignored.
      lengths: int [B] latent frames per video, in [1, t] (default: all t).
      key: the randomness of a decoder that draws (default: a fixed key).
      batch_size: videos per decoder call (memory).

    Returns:
      (videos float32 [B, T, s h, s w, 3] in [0, 1], zero past each video's length, lengths int32
      [B] of `1 + f (latent length - 1)` frames); T is the longest length.
    """
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f'expected latents [B, t, h, w, {self.latent_channels}], got shape '
                       f'{latents.shape}')
    lengths = _lengths(lengths, latents.shape[:2])
    key = jax.random.key(0) if key is None else key
    decode = lambda z, k: self._decode(self.denormalise(z), k)
    videos = _run(decode, latents[:, :lengths.max()], lengths, lambda n: n, self.causal_decoder,
                  key, batch_size=batch_size)
    pixel_lengths = np.array([self.pixel_length(n) for n in lengths], np.int32)
    videos = np.clip((videos + 1) / 2, 0.0, 1.0)
    return _zero_padding(videos, pixel_lengths), pixel_lengths


def _lengths(lengths: np.ndarray | None, batch_and_time: tuple[int, int]) -> np.ndarray:
  """Checked lengths int32 [B] in [1, T] (all T when None)."""
  batch, time = batch_and_time
  if lengths is None:
    return np.full(batch, time, np.int32)
  lengths = np.asarray(lengths, np.int32)
  if lengths.shape != (batch,) or lengths.min(initial=1) < 1 or lengths.max(initial=1) > time:
    raise ValueError(f'lengths must be int [{batch}] in [1, {time}], got {lengths}')
  return lengths


def _zero_padding(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """`x` [B, T, ...] with the slots at or past each length zeroed."""
  alive = np.arange(x.shape[1])[None, :] < lengths[:, None]
  return np.where(alive.reshape(alive.shape + (1,) * (x.ndim - 2)), x, 0).astype(np.float32)


def _run(fn: Callable[[np.ndarray, jax.Array], jax.Array], inputs: np.ndarray,
         lengths: np.ndarray, input_length: Callable[[int], int], causal: bool, key: jax.Array,
         batch_size: int = 8) -> np.ndarray:
  """`fn` over `inputs` [B, T, ...] of `lengths` (output frames) in chunks of at most
  `batch_size` videos, the outputs stacked and padded to the longest.

  Causal: chunks of the padded batch. Otherwise: chunks of the videos of one length, cut to the
  `input_length(length)` frames they hold. A chunk is padded (repeating its last video) to a
  power of two, so chunk sizes compile at most log2(batch_size) + 1 times per length.
  """
  groups = [np.arange(len(inputs))] if causal else [
      np.flatnonzero(lengths == n) for n in np.unique(lengths)]
  outputs, chunk_index = {}, 0
  for group in groups:
    frames = inputs.shape[1] if causal else input_length(lengths[group[0]])
    for start in range(0, len(group), batch_size):
      chunk = group[start:start + batch_size]
      size = 1 << (len(chunk) - 1).bit_length()
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])
      out = np.asarray(fn(inputs[padded, :frames], jax.random.fold_in(key, chunk_index)))
      chunk_index += 1
      outputs.update({int(i): out[j] for j, i in enumerate(chunk)})
  longest = max(o.shape[0] for o in outputs.values())
  stacked = np.zeros((len(inputs), longest) + outputs[0].shape[1:], np.float32)
  for i, out in outputs.items():
    stacked[i, :out.shape[0]] = out
  return stacked
