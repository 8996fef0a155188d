"""A trained model, ready to sample: config, model and EMA weights loaded from a workdir.

This is the path that sampling, evaluation and notebooks take; it reads checkpoints but does not need
the trainer (no optimizer state is read). `VideoSampler` is the one way the package samples: the
on-device sampler of the config's method (`sampler.py`, its staged form `staged_sampler.py`, or a
baseline's in `baselines.py`), run in batches with one random scheme.
"""

import dataclasses
import functools
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowception_jax.core import baselines
from flowception_jax.core import model as model_lib
from flowception_jax.core import sampler as sampler_lib
from flowception_jax.core import staged_sampler
from flowception_jax import datasets
from flowception_jax.storage import files
from flowception_jax.training import checkpoint
from flowception_jax.training import run_log
from flowception_jax.training import sharding


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """What sampling needs from a training run."""
  config: ml_collections.ConfigDict  # The resolved config the weights were trained with.
  info: datasets.SourceInfo  # Frame shape, capacity and class count of its data.
  model: model_lib.DiT
  params: Any  # EMA parameters.
  step: int  # The training step of the checkpoint.


def sampler_config(config: ml_collections.ConfigDict) -> sampler_lib.SamplerConfig:
  """The sampler settings of a resolved config (`config.sampler` and the process of `config.flow`)."""
  return sampler_lib.SamplerConfig(
      num_steps=config.sampler.num_steps, num_start_frames=config.flow.num_start_frames,
      kappa=config.flow.kappa, insertion=config.sampler.insertion,
      guidance_scale=config.sampler.guidance_scale, rate_guidance=config.sampler.rate_guidance,
      snr_shift=config.flow.snr_shift, order=config.sampler.order,
      solver=config.sampler.get('solver', 'euler'))


def sampler_stages(config: ml_collections.ConfigDict, info: datasets.SourceInfo) -> tuple[int, ...]:
  """The capacities of the staged sampler: `sampler.stages`, or `staged_sampler.default_stages`
  from the start frames to the data's capacity."""
  stages = tuple(config.sampler.get('stages', ()))
  return stages or staged_sampler.default_stages(config.flow.num_start_frames, info.max_frames)


def _batch_sampler(model: model_lib.DiT, config: ml_collections.ConfigDict,
                   info: datasets.SourceInfo, batch_size: int):
  """The sampler of `config.method` for `batch_size` videos: `sampler.make_sampler`'s jitted
  function or, with `sampler.staged`, a `staged_sampler.StagedSampler` (over all videos at once);
  or a baseline's (`baselines.make_full_sequence_sampler`, `make_autoregressive_sampler`)."""

  def apply_fn(params, *inputs, **kwargs):
    return model.apply({'params': params}, *inputs, **kwargs)

  baselines.check_method(config)
  common = dict(config=sampler_config(config), batch_size=batch_size, capacity=info.max_frames,
                frame_shape=tuple(info.frame_shape), num_classes=info.num_classes)
  if config.method == 'flowception' and config.sampler.get('staged', False):
    return staged_sampler.StagedSampler(
        apply_fn, stages=sampler_stages(config, info),
        min_running=config.sampler.get('min_running', 1.0), fetch=to_host, **common)
  if config.method == 'flowception':
    return sampler_lib.make_sampler(apply_fn, **common)
  if config.method in baselines.AUTOREGRESSIVE_METHODS:
    return baselines.make_autoregressive_sampler(
        apply_fn, causal=config.method == 'autoregressive', **common)
  if config.get('length_distribution') is None:
    raise ValueError('the full_sequence sampler needs the length distribution that training '
                     'measures (config.length_distribution, set by training.train.resolve); '
                     'train with --config.method=full_sequence')
  return baselines.make_full_sequence_sampler(
      apply_fn, length_probabilities=config.length_distribution, **common)


class VideoSampler:
  """Samples videos from a model's weights: the one path every caller takes (the trainer's
  evaluators, `evaluate`, the study, the tasks and the `sample` command).

  Built once from a resolved config, its model and its data's `SourceInfo`: `num_videos` videos are
  made `batch_size` at a time by one compiled function (`fn`), each batch logging a progress line
  when there are several. The randomness of a call is one key: `label_key, noise_key = split(key)`; class
  labels, where not given, are drawn for every video from `label_key`, and batch `i` draws from
  `fold_in(noise_key, i)`, split into its videos' keys (`video_keys`). The same key, weights and
  inputs give the same videos, on any number of processes, staged or not. With `sampler.staged`,
  a call of more videos than one batch sends them all to the staged sampler at once, each with the
  key it has in its batch; one batch is sampled plain, since compiling a dozen stage loops costs
  more than they save on one batch (`docs/benchmark.md#staged-sampling`). Outputs are NumPy
  arrays, whole on every process (`to_host`).
  """

  def __init__(self, model: model_lib.DiT, config: ml_collections.ConfigDict,
               info: datasets.SourceInfo, *, batch_size: int,
               mesh: jax.sharding.Mesh | None = None):
    """With a `mesh`, every call runs on it with the model's logical axis rules (the videos split
    over its batch axes); without one, in whatever mesh context the caller set (the trainer's)."""
    self.config, self.info, self.batch_size, self.mesh = config, info, batch_size, mesh
    self.fn = _batch_sampler(model, config, info, batch_size)
    self.batch_fn = self.fn  # The sampler of one batch.
    if self.staged:
      plain = ml_collections.ConfigDict(config.to_dict())
      plain.sampler.staged = False
      self.batch_fn = _batch_sampler(model, plain, info, batch_size)

  @property
  def staged(self) -> bool:
    return isinstance(self.fn, staged_sampler.StagedSampler)

  def _in_mesh(self, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in this sampler's mesh (if it has one)."""
    if self.mesh is None:
      return fn(*args, **kwargs)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return fn(*args, **kwargs)

  def keys_by_batch(self, key: jax.Array, num_videos: int) -> jax.Array:
    """The keys [num_videos] of the videos of a call with `key`: batch `i`'s key split."""
    noise_key = jax.random.split(key)[1]
    count = -(-num_videos // self.batch_size)
    return jnp.concatenate([sampler_lib.video_keys(jax.random.fold_in(noise_key, i),
                                                   self.batch_size)
                            for i in range(count)])[:num_videos]

  def random_labels(self, key: jax.Array, num_videos: int) -> np.ndarray | None:
    """The class labels int32 [num_videos] a call with `key` draws (None if unconditional)."""
    if not self.info.num_classes:
      return None
    label_key = jax.random.split(key)[0]
    return np.asarray(jax.random.randint(label_key, (num_videos,), 0, self.info.num_classes,
                                         jnp.int32))

  def __call__(self, params, key: jax.Array, num_videos: int, *, labels=None,
               inputs: dict[str, np.ndarray] | None = None) -> sampler_lib.SampleOutput:
    """`num_videos` videos from `params`.

    Args:
      params: the (EMA) parameters.
      key: the call's randomness (see the class docstring).
      num_videos: videos to make; the last batch is padded and cut (staged: not needed).
      labels: int [num_videos] class ids of a conditional model (None: random classes).
      inputs: `sampler.make_sampler`'s task arguments, each [num_videos, N_max, ...]
        (`tasks.sampler_inputs`); None for plain generation.

    Returns:
      The `SampleOutput` of all videos, as NumPy arrays; `num_iterations` the largest of the
      batches.
    """
    if labels is None:
      labels = self.random_labels(key, num_videos)
    if self.staged and num_videos > self.batch_size:
      start = time.perf_counter()
      out = self._in_mesh(self.fn, params, self.keys_by_batch(key, num_videos), labels=labels,
                          **(inputs or {}))
      logging.info('sampled %d videos in %s (staged)', num_videos,
                   run_log.format_duration(time.perf_counter() - start))
      return out
    size = self.batch_size
    count = -(-num_videos // size)
    noise_key = jax.random.split(key)[1]
    pad = lambda x: None if x is None else np.concatenate(
        [np.asarray(x)] + [np.asarray(x)[-1:]] * (count * size - num_videos))
    labels, inputs = pad(labels), {k: pad(v) for k, v in (inputs or {}).items()}
    outs, start = [], time.perf_counter()
    for i in range(count):
      part = slice(i * size, (i + 1) * size)
      outs.append(to_host(self._in_mesh(
          self.batch_fn, params, jax.random.fold_in(noise_key, i),
          labels=None if labels is None else labels[part],
          **{k: v[part] for k, v in inputs.items()})))
      if count > 1:
        elapsed = time.perf_counter() - start
        logging.info('sampled %d/%d videos in %s, ETA %s', min((i + 1) * size, num_videos),
                     num_videos, run_log.format_duration(elapsed),
                     run_log.format_duration(elapsed / (i + 1) * (count - i - 1)))
    return jax.tree.map(
        lambda *xs: np.concatenate(xs)[:num_videos] if np.ndim(xs[0]) else max(xs), *outs)


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
  model = model_lib.build_for(config, info)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    init = functools.partial(model_lib.init_params, model, info, min(config.data.buckets))
    boxed = jax.eval_shape(init, jax.random.key(0))
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
  the training latents. The file is written whole or not at all (`files.write_npz`).
  """
  files.write_npz(path, latents=np.asarray(latents, np.float32),
                  lengths=np.asarray(lengths, np.int32))
