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
for conditional models, `labels` int32 [N] to the .npz; beside it a GIF grid and a PNG filmstrip of
the first 16 videos (a row per video, given frames framed in red). The same seed,
weights and inputs give the same file. The sampler settings come from the trained config unless a
flag overrides them (`--num_steps=200 --insertion=thinning`); a summary (with the data set's exact
metrics, for coloring and shapes, when nothing is given) is printed as JSON.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np

from flowception_jax import datasets
from flowception_jax import inference
from flowception_jax import sampler as sampler_lib
from flowception_jax import tasks
from flowception_jax import video_io

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints.')
_NUM_VIDEOS = flags.DEFINE_integer('num_videos', 16, 'Number of videos to sample.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Output .npz path; a .gif and a .png are written beside it.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None,
                                  'Flow steps per unit time (default: the config).')
_INSERTION = flags.DEFINE_enum('insertion', None, sampler_lib.INSERTION_MODES,
                               'Insertion law per gap and step (default: the config).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, 'Velocity guidance (default: the config).')
_RATE_GUIDANCE = flags.DEFINE_float('rate_guidance', None, 'Rate guidance (default: the config).')
_TASK = flags.DEFINE_enum('task', 'generate', tasks.TASKS, 'What to sample (see tasks.py).')
_CONTEXT = flags.DEFINE_string('context', None,
                               'Given frames of a task: an image, or an .npz with `frames` float32 '
                               '[K, H, W, C] in [0, 1] at the model\'s frame size.')
_CLASS = flags.DEFINE_string('class', None, 'Class id or name of every video (conditional models; '
                             'default: random classes).')
flags.mark_flags_as_required(['workdir', 'output'])
_FILMSTRIP_ROWS = 16  # Videos shown in the PNG beside the output.


def sample_videos(workdir: str, num_videos: int, seed: int, sampler_overrides=None):
  """Returns (videos [N, N_max, H, W, C] in [0, 1], lengths [N], config) of plain generation.

  `sampler_overrides` maps `config.sampler` fields to values that replace the trained config's.
  """
  trained = inference.load(workdir)
  trained.config.sampler.update(sampler_overrides or {})
  samples = tasks.sample(trained, num_videos=num_videos, seed=seed)
  return samples.videos, samples.lengths, trained.config


def context_error(videos: np.ndarray, context_slots: np.ndarray, context: np.ndarray) -> float:
  """Largest deviation of the given frames [K, H, W, C] from the videos at their slots [N, K]."""
  rows = np.arange(len(videos))[:, None]
  return float(np.abs(videos[rows, context_slots] - context[None]).max())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUTPUT.value.endswith('.npz'):
    raise app.UsageError(f'--output must end in .npz, got {_OUTPUT.value}')
  overrides = {'num_steps': _NUM_STEPS.value, 'insertion': _INSERTION.value,
               'guidance_scale': _GUIDANCE.value, 'rate_guidance': _RATE_GUIDANCE.value}
  overrides = {k: v for k, v in overrides.items() if v is not None}
  trained = inference.load(_WORKDIR.value)
  info = trained.info
  try:
    context = None
    if _CONTEXT.value:
      context = tasks.load_context(_CONTEXT.value, _TASK.value, info.frame_shape, info.max_frames)
    tasks.check_context(_TASK.value, context, info.frame_shape, info.max_frames)
    if _CLASS.value is not None:
      tasks.class_label(_CLASS.value, info.num_classes, info.class_names)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  samples = tasks.sample(trained, _TASK.value, context, num_videos=_NUM_VIDEOS.value,
                         seed=_SEED.value, label=_CLASS.value, sampler_overrides=overrides)
  videos, lengths = samples.videos, samples.lengths
  arrays = {'videos': videos, 'lengths': lengths, 'context_slots': samples.context_slots}
  if samples.labels is not None:
    arrays['labels'] = samples.labels
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  np.savez(_OUTPUT.value, **arrays)
  stem = _OUTPUT.value[:-len('.npz')]
  video_io.write_gif(stem + '.gif', video_io.video_grid(videos, lengths))
  shown = slice(0, _FILMSTRIP_ROWS)
  given = np.zeros(videos.shape[:2], bool)
  given[np.arange(len(videos))[:, None], samples.context_slots] = True
  video_io.write_png(stem + '.png', video_io.filmstrip(videos[shown], lengths[shown], given[shown]))
  summary = {'num_videos': len(lengths), 'mean_length': float(lengths.mean()),
             'task': _TASK.value, 'sampler': dict(trained.config.sampler.to_dict(), **overrides)}
  if context is None:
    summary.update(datasets.task_metrics(trained.config.data.name, videos, lengths,
                                         trained.config.data))
  else:
    summary['context_error'] = context_error(videos, samples.context_slots, context)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
