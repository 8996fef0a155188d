"""A trained model, ready to sample: config, model and EMA weights loaded from a workdir.

This is the path that sampling, evaluation and notebooks take; it reads checkpoints but does not need
the trainer (no optimizer state is read). `make_sampler` builds the on-device sampler of the config's
method (`sampler.py`, or a baseline's in `baselines.py`) for a model and its config, the same one the
trainer uses for its sample GIFs.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowception_jax.core import baselines
from flowception_jax.core import model as model_lib
from flowception_jax.core import sampler as sampler_lib
from flowception_jax import datasets
from flowception_jax.storage import files
from flowception_jax.training import checkpoint
from flowception_jax.training import sharding


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """What sampling needs from a training run."""
  config: ml_collections.ConfigDict  # The resolved config the weights were trained with.
  info: datasets.SourceInfo  # Frame shape, capacity and class count of its data.
  model: model_lib.DiT
  params: Any  # EMA parameters.
  step: int  # The training step of the checkpoint.


def build_model(config: ml_collections.ConfigDict, info: datasets.SourceInfo) -> model_lib.DiT:
  """The DiT of `config.model` for the frames and classes of `info`."""
  return model_lib.build_model(config.model, channels=info.frame_shape[-1],
                               num_classes=info.num_classes)


def init_params(model: model_lib.DiT, info: datasets.SourceInfo, frames: int, key: jax.Array):
  """Fresh boxed (logically partitioned) parameters of `model`, traced on `frames` slots."""
  inputs = model_lib.init_inputs(info.frame_shape, frames, info.num_classes)
  return model.init(key, *inputs)['params']


def sampler_config(config: ml_collections.ConfigDict) -> sampler_lib.SamplerConfig:
  """The sampler settings of a resolved config (`config.sampler` and the process of `config.flow`)."""
  return sampler_lib.SamplerConfig(
      num_steps=config.sampler.num_steps, num_start_frames=config.flow.num_start_frames,
      kappa=config.flow.kappa, insertion=config.sampler.insertion,
      guidance_scale=config.sampler.guidance_scale, rate_guidance=config.sampler.rate_guidance,
      snr_shift=config.flow.snr_shift, order=config.sampler.order,
      solver=config.sampler.get('solver', 'euler'))


def make_sampler(model: model_lib.DiT, config: ml_collections.ConfigDict,
                 info: datasets.SourceInfo, num_videos: int,
                 mesh: jax.sharding.Mesh | None = None):
  """A jitted sampler (see `sampler.make_sampler`) of `num_videos` videos of up to `max_frames`.

  The sampler of `config.method`: Flowception's, or a baseline's (`baselines.make_sampler`).
  With a `mesh`, every call runs on it with the model's logical axis rules: the videos are split
  over its batch axes (and the model as in training). Without one, calls run in whatever mesh
  context the caller set (the trainer samples inside its own).
  """

  def apply_fn(params, *inputs, **kwargs):
    return model.apply({'params': params}, *inputs, **kwargs)

  baselines.check_method(config)
  sample = baselines.make_sampler(
      config.method, apply_fn, config=sampler_config(config), batch_size=num_videos,
      capacity=info.max_frames, frame_shape=tuple(info.frame_shape), num_classes=info.num_classes,
      length_probabilities=config.get('length_distribution'))
  if mesh is None:
    return sample

  @functools.wraps(sample)
  def sample_on_mesh(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return sample(*args, **kwargs)

  return sample_on_mesh


def _checkpoint_step(manager, workdir: str, step: int | None) -> int:
  """`step` (default: the latest) if `workdir` holds a checkpoint of it."""
  steps = manager.all_steps() if manager.directory.exists() else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {workdir}; train first with '
                            f'python -m flowception_jax.main --config=... --workdir={workdir}')
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint of step {step} in {workdir}; saved steps: {steps}')
  return step


def load_config(workdir: str, *, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The resolved config saved in `workdir` at `step` (default: the latest), and that step."""
  manager = checkpoint.make_manager(workdir, read_only=True)
  step = _checkpoint_step(manager, workdir, step)
  config = checkpoint.restore_config(manager, step)
  manager.close()
  return config, step


def load(workdir: str, *, step: int | None = None,
         mesh: jax.sharding.Mesh | None = None) -> TrainedModel:
  """The model saved in `workdir` at `step` (default: the latest), with its EMA parameters.

  Parameters are placed by the model's logical axis rules on `mesh` (default: every device on the
  data axis, i.e. replicated), whatever mesh the run was trained on.
  """
  manager = checkpoint.make_manager(workdir, read_only=True)
  step = _checkpoint_step(manager, workdir, step)
  config = checkpoint.restore_config(manager, step)
  _, info = datasets.make_source(config.data)
  model = build_model(config, info)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    boxed = jax.eval_shape(functools.partial(init_params, model, info, min(config.data.buckets)),
                           jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  params = checkpoint.restore_ema_params(manager, step, abstract)
  manager.close()
  return TrainedModel(config=config, info=info, model=model, params=params, step=step)


def to_host(tree: Any) -> Any:
  """NumPy copies of the (possibly process-spanning) arrays of `tree`, whole on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def to_pixels(frames: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Model-space frames [B, N, H, W, C] in [-1, 1] to [0, 1], padded slots zero."""
  alive = np.arange(frames.shape[1])[None, :] < np.asarray(lengths)[:, None]
  pixels = np.clip((np.asarray(frames, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return np.where(alive[:, :, None, None, None], pixels, 0.0).astype(np.float32)


def from_pixels(frames: np.ndarray) -> np.ndarray:
  """Frames in [0, 1] to the model's space [-1, 1] (the inverse of `to_pixels` on alive slots)."""
  return (np.asarray(frames, np.float32) * 2.0 - 1.0).astype(np.float32)


def to_latents(frames: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Latent frames [B, N, h, w, c] as they are (float32), padded slots zero; for latent models."""
  alive = np.arange(frames.shape[1])[None, :] < np.asarray(lengths)[:, None]
  return np.where(alive[:, :, None, None, None], np.asarray(frames, np.float32), 0.0)


def save_latents(path: str, latents: np.ndarray, lengths: np.ndarray) -> None:
  """Writes generated `latents` float32 [N, N_max, h, w, c] and `lengths` int32 [N] to an .npz.

  A latent model's samples are not pixels: decode them with the autoencoder whose encoder wrote
  the training latents. The file is written under a temporary name and renamed, so it is never
  partial.
  """
  files.write_npz(path, latents=np.asarray(latents, np.float32),
                  lengths=np.asarray(lengths, np.int32))


def sample_labels(key: jax.Array, num_videos: int, num_classes: int) -> jax.Array | None:
  """Random class labels int32 [num_videos] for conditional models, None for unconditional ones."""
  if not num_classes:
    return None
  return jax.random.randint(key, (num_videos,), 0, num_classes, jnp.int32)
