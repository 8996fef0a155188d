r"""Samples videos from a trained workdir with its saved config and latest EMA weights.

  python -m flowception_jax.sample --workdir=/tmp/shapes --num_videos=16 --seed=0 --output=/tmp/s.npz

The same model serves every task (`tasks.py`); a task's given frames come from `--context`, an image
or an .npz whose `frames` are float32 [K, H, W, C] in [0, 1] at the model's frame size:

  --task=i2v --context=first.png          the image at slot 0, the model makes the rest
  --task=interpolate --context=keys.npz   ordered key frames; the video ends on the last one
  --task=extend --context=prefix.npz      the frames at slots 0..K-1, then their continuation
  --class=NAME_OR_ID --guidance_scale=3   class-conditional models, with guidance (`--rate_guidance`
                                          guides the insertion rates)

Writes `videos` float32 [N, N_max, H, W, C] in [0, 1] (slots past each length are zero), `lengths`
int32 [N], `context_slots` int32 [N, K] (the slot of each given frame; K = 0 without context) and,
for conditional models, `labels` int32 [N] to the .npz. Beside it: a GIF grid, a PNG filmstrip of
the first 16 videos (`<name>.png`, a row per video, given frames framed in red) and two figures,
`<name>_length_histogram.png` (generated lengths against the data's) and
`<name>_insertion_timeline.png` (when and where each frame was inserted, and how its time rose to
1). The same seed, weights and inputs give the same file. The sampler settings come from the
trained config unless a flag overrides them (`--num_steps=200 --insertion=thinning`, or
`--order=hierarchical` for a prescribed insertion order); a summary (with the data set's exact
metrics, where it has them, when nothing is given) is printed as JSON. A model of latents whose
folder records its autoencoder (`prepare --encoder`) has its latents decoded: `videos` and
`lengths` count decoded frames, beside `latents` [N, N_max, h, w, c] and `latent_lengths` [N] (the
figures count latent frames; `--encoder_weights=DIR` when the weights have moved). Any other model
of latents writes `latents` (float32, unscaled) and `lengths` only, for the autoencoder that
encoded its data.
The videos of each call are split over every device (`--batch_size` a multiple of the device count
keeps them even); on several hosts every process runs the same command (see `main.py` for the runtime flags)
and process 0 writes the files.
"""

import json
import sys

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from flowception_jax import autoencoders
from flowception_jax.core import inference
from flowception_jax.core import tasks
from flowception_jax import datasets
from flowception_jax import sampler_flags
from flowception_jax.evaluation import evaluators
from flowception_jax.evaluation import figures
from flowception_jax.storage import files
from flowception_jax.storage import video_io
from flowception_jax.training import distributed
from flowception_jax.training import run_log
from flowception_jax.training import sharding

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints.')
_NUM_VIDEOS = flags.DEFINE_integer('num_videos', 16, 'Number of videos to sample.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Videos per sampler call; each call logs '
                                   'a progress line.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Output .npz path; a .gif and a .png are written beside it.')
sampler_flags.define_flags()
flags.adopt_module_key_flags(sampler_flags)
_TASK = flags.DEFINE_enum('task', 'generate', tasks.TASKS, 'What to sample (see tasks.py).')
_CONTEXT = flags.DEFINE_string('context', None,
                               'Given frames of a task: an image, or an .npz with `frames` float32 '
                               '[K, H, W, C] in [0, 1] at the model\'s frame size.')
_CLASS = flags.DEFINE_string('class', None, 'Class id or name of every video (conditional models; '
                             'default: random classes).')
_ENCODER_WEIGHTS = flags.DEFINE_string(
    'encoder_weights', None, 'Weights folder of the autoencoder of a latent folder (default: the '
    'one the folder records).')
_JOIN_RUNTIME = distributed.define_flags()
flags.adopt_module_key_flags(distributed)
_VERBOSE = flags.DEFINE_bool('verbose', False, "Also show the libraries' logs and the traceback "
                             'of every error.')
flags.mark_flags_as_required(['workdir', 'output'])


def sample_outputs(workdir: str, num_videos: int, seed: int, sampler_overrides=None,
                   task: str = 'generate', context=None, label=None,
                   batch_size: int | None = None):
  """Returns (`tasks.TaskSamples`, the config it ran with, the data's `SourceInfo`).

  `sampler_overrides` maps `config.sampler` fields to values that replace the trained config's;
  `task` and `label` as in `tasks.TaskSampler`, `context` its frames or a file holding them
  (`tasks.load_context`); `batch_size` videos per sampler call (None: all at once). The videos
  are split over all devices.
  """
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
  trained = inference.load(workdir, mesh=mesh)
  if isinstance(context, str):
    context = tasks.load_context(context, task, trained.info.frame_shape, trained.info.max_frames)
  sampler = tasks.TaskSampler(trained, num_videos, sampler_overrides, mesh=mesh,
                              batch_size=batch_size)
  return sampler(task, context, seed=seed, label=label), sampler.config, trained.info


def sample_videos(workdir: str, num_videos: int, seed: int, sampler_overrides=None):
  """Returns (videos [N, N_max, H, W, C] in [0, 1], lengths [N], config) of plain generation."""
  samples, config, _ = sample_outputs(workdir, num_videos, seed, sampler_overrides)
  return samples.videos, samples.lengths, config


def context_error(videos: np.ndarray, context_slots: np.ndarray, context: np.ndarray) -> float:
  """Largest deviation of the given frames [N, K, H, W, C] from the videos at their slots [N, K]."""
  rows = np.arange(len(videos))[:, None]
  return float(np.abs(videos[rows, context_slots] - context).max())


def write_outputs(output: str, samples: tasks.TaskSamples, config, info,
                  autoencoder: autoencoders.VideoAutoencoder | None = None,
                  decode_key: jax.Array | None = None) -> dict:
  """Writes the .npz, the GIF grid, the filmstrip and the figures of `samples` (see the module
  docstring); returns the summary printed as JSON. The latents of a model of latents are decoded
  by `autoencoder` (drawing from `decode_key`), or written as they are without one."""
  frames, lengths = samples.videos, samples.lengths  # Pixels, or latents of a latent model.
  summary = {'method': config.method, 'task': samples.task, 'num_videos': len(lengths),
             'mean_length': float(lengths.mean()), 'sampler': config.sampler.to_dict()}
  if not info.pixels and autoencoder is None:  # No decoder: the latents are the output.
    inference.save_latents(output, frames, lengths)
    summary['latents'] = 'no GIF: decode the latents with the autoencoder that encoded the data'
    return summary
  arrays = {'context_slots': samples.context_slots}
  if info.pixels:
    videos, video_lengths = frames, lengths
  else:
    videos, video_lengths = autoencoder.decode(frames, lengths, key=decode_key)
    arrays.update(latents=frames, latent_lengths=lengths)
    summary.update(mean_decoded_length=float(video_lengths.mean()),
                   decoded_by={'autoencoder': autoencoder.name,
                               'weights': autoencoder.metadata()['weights']})
  arrays.update(videos=videos, lengths=video_lengths)
  if samples.labels is not None:
    arrays['labels'] = samples.labels
  files.write_npz(output, **arrays)
  stem = output[:-len('.npz')]
  data_lengths = evaluators.data_reference(config.data,
                                           config.evals.samples.num_data_videos).lengths
  images = figures.sample_figures(
      samples.insert_step, lengths, data_lengths, num_steps=config.sampler.num_steps,
      num_iterations=samples.num_iterations, max_frames=info.max_frames)
  evaluators.write_pictures(stem, videos, video_lengths, images)
  if info.pixels:  # The filmstrip frames given frames, which only models of pixels take.
    video_io.write_png(stem + '.png', tasks.filmstrip(samples))
  if samples.context.shape[1]:
    summary['context_error'] = context_error(videos, samples.context_slots, samples.context)
  else:
    summary.update(datasets.task_metrics(config.data.name, videos, video_lengths, config.data))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUTPUT.value.endswith('.npz'):
    raise app.UsageError(f'--output must end in .npz, got {_OUTPUT.value}')
  run_log.setup(verbose=_VERBOSE.value)
  with run_log.one_line_errors(enabled=not _VERBOSE.value):
    _JOIN_RUNTIME()
    own_flags = (flags.FLAGS.get_flags_for_module(sys.modules[__name__])
                 + flags.FLAGS.get_flags_for_module(sampler_flags))
    distributed.check_same('sampling flags', {f.name: f.value for f in own_flags})
    samples, config, info = sample_outputs(
        _WORKDIR.value, _NUM_VIDEOS.value, _SEED.value,
        sampler_flags.overrides(), task=_TASK.value,
        context=_CONTEXT.value, label=_CLASS.value, batch_size=_BATCH_SIZE.value)
    if jax.process_index():
      return
    autoencoder = None if info.pixels else autoencoders.for_data(config.data,
                                                                 _ENCODER_WEIGHTS.value)
    summary = write_outputs(_OUTPUT.value, samples, config, info, autoencoder,
                            jax.random.fold_in(jax.random.key(_SEED.value), 1))
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
