"""Video autoencoders behind one interface (`base.VideoAutoencoder`: `encode`, `decode`), for
training in latent space: `load(name, weights)` builds one, and a latent folder that `prepare
--encoder` wrote records which one made it, so that samples decode back to videos
(`for_data`, `from_metadata`). `ENCODERS` registers them by name; LTX-Video's is `ltx` (`ltx.py`,
its settings in `ltx_config.py`, its Flax networks in `ltx_video.py`, its diffusers weights in
`ltx_weights.py`).
"""

from typing import Any

from flowception_jax.autoencoders import ltx
from flowception_jax.autoencoders.base import VideoAutoencoder
from flowception_jax.datasets import video_folder

ENCODERS = {ltx.NAME: ltx.load}
_SETTINGS = ('decode_timestep', 'decode_noise_scale')


def load(name: str, weights: str, **settings) -> VideoAutoencoder:
  """The autoencoder `name` with the weights at `weights` (a folder; see its module)."""
  if name not in ENCODERS:
    raise ValueError(f'unknown autoencoder {name!r}; known: {sorted(ENCODERS)}')
  return ENCODERS[name](weights, **settings)


def from_metadata(description: dict[str, Any], weights: str | None = None) -> VideoAutoencoder:
  """The autoencoder a latent folder recorded (`VideoAutoencoder.metadata`), its weights read from
  `weights` (default: the recorded folder); refuses weights of another architecture."""
  try:
    autoencoder = load(description['name'], weights or description['weights'],
                       **{k: description[k] for k in _SETTINGS if k in description})
  except FileNotFoundError as error:
    raise FileNotFoundError(f'{error}. The data was encoded with the {description["name"]} '
                            f'weights recorded at {description["weights"]}: put them back there, '
                            'or pass --encoder_weights=DIR') from error
  if autoencoder.metadata()['config'] != description['config']:
    raise ValueError(f'the weights in {weights or description["weights"]} are not of the '
                     f'architecture that encoded the data ({description["config"]})')
  return autoencoder


def for_data(data_config, weights: str | None = None) -> VideoAutoencoder | None:
  """The autoencoder that encoded the latent folder of `data_config` (a `config.data`); None for
  data without one (pixels, built-in sets, latents encoded elsewhere)."""
  if data_config.get('name') != 'videos':
    return None
  description = video_folder.read_metadata(data_config.get('data_dir')).get('encoder')
  return from_metadata(description, weights) if description else None
