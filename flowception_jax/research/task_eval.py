r"""Scores one trained model's tasks on held-out `shapes` clips, against the same model without context.

  python -m flowception_jax.research.task_eval --workdir=/tmp/shapes --num_videos=128 \
      --output=/tmp/tasks.json

Held-out clips come from the model's own data settings with another seed (`data.seed + 1`, clips
training never drew) and one shape per clip, which the shapes tracker follows exactly. The given
frames are cut from them: frame 0 (i2v), frames 0..K-1 (extend, K = `--prefix`), frames 0, L // 2
and L - 1 (interpolate). Continuations are scored against the clip they were cut from
(`datasets/shapes/tasks.py`), and so is plain generation from the same model and seed, at the same
slots: what a model that ignores its context reaches. Writes the JSON of per-task means, standard
errors and counts (and prints it). `--write_contexts=DIR` also writes a held-out clip's given frames
as `first.png`, `prefix.npz` and `keys.npz`, ready for `sample --context`.
"""

import json
import os

from absl import app
from absl import flags
import ml_collections
import numpy as np

from flowception_jax.core import inference
from flowception_jax.core import tasks
from flowception_jax import datasets
from flowception_jax.datasets.shapes import tasks as shapes_tasks
from flowception_jax.datasets.shapes import tracker
from flowception_jax.storage import files
from flowception_jax.storage import video_io



HELD_OUT_SETS = ('shapes', 'camera')  # The sets with clips that training never draws.


def held_out_clips(data_config, count: int, min_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` clips of at least `min_frames` frames that training never drew: of `shapes`, with
  one shape each (which the tracker follows exactly); of `camera`, over its held-out photos.

  Returns (clips float32 [count, N_max, H, W, C] in [0, 1] zero-padded, lengths int32 [count]).
  """
  config = ml_collections.ConfigDict(data_config.to_dict())
  if config.name not in HELD_OUT_SETS:
    raise ValueError(f'held-out clips exist for {" and ".join(HELD_OUT_SETS)} only, not '
                     f'{config.name!r}; give the --workdir of a model trained on one of them')
  config.seed += 1
  if config.name == 'shapes':
    config.max_shapes = 1
  else:
    config.split = 'test'
  source, info = datasets.make_source(config)
  clips = np.zeros((count, info.max_frames) + tuple(info.frame_shape), np.float32)
  lengths = np.zeros(count, np.int32)
  index = found = 0
  while found < count:
    video = source[index]['video']
    index += 1
    if len(video) >= min_frames:
      clips[found, :len(video)] = video
      lengths[found] = len(video)
      found += 1
  return clips, lengths


def _check_shapes(data_config) -> None:
  if data_config.name != 'shapes':
    raise ValueError(f'task metrics are exact on shapes only, not {data_config.name!r}; give the '
                     '--workdir of a model trained with configs/shapes.py')


def key_indices(lengths: np.ndarray) -> np.ndarray:
  """Key frames of interpolation: int [B, 3], frames 0, L // 2 and L - 1 of each clip."""
  lengths = np.asarray(lengths)
  return np.stack([np.zeros_like(lengths), lengths // 2, lengths - 1], axis=-1)


def evaluate(sampler: tasks.TaskSampler, seed: int, prefix: int) -> dict[str, dict[str, float]]:
  """Per-task summaries (`shapes_tasks.summarize`) of one model on `sampler.num_videos` held-out
  clips, every task sampled with the same seed."""
  num_videos = sampler.num_videos
  _check_shapes(sampler.trained.config.data)
  clips, lengths = held_out_clips(sampler.trained.config.data, num_videos, max(prefix + 1, 3))
  keys = key_indices(lengths)
  free = sampler('generate', seed=seed)
  i2v = sampler('i2v', clips[:, :1], seed=seed)
  extend = sampler('extend', clips[:, :prefix], seed=seed)
  interpolate = sampler('interpolate', clips[np.arange(num_videos)[:, None], keys], seed=seed)
  score = shapes_tasks.continuation_scores
  results = {
      'i2v': score(i2v.videos, i2v.lengths, clips, lengths, 1),
      'i2v_without_context': score(free.videos, free.lengths, clips, lengths, 1),
      'extend': score(extend.videos, extend.lengths, clips, lengths, prefix),
      'extend_without_context': score(free.videos, free.lengths, clips, lengths, prefix),
      'interpolate': shapes_tasks.interpolation_scores(
          interpolate.videos, interpolate.lengths, interpolate.context_slots, keys),
      'interpolate_data': shapes_tasks.interpolation_scores(clips, lengths, keys, keys),
  }
  return {name: shapes_tasks.summarize(scores) for name, scores in results.items()}


def write_contexts(directory: str, data_config, prefix: int) -> None:
  """Given frames of a held-out clip as files `sample --context` reads: of the first 16 clips, the
  one whose first frame shows most of its shape (a shape enters the clip on its first frame)."""
  _check_shapes(data_config)
  clips, lengths = held_out_clips(data_config, 16, max(prefix + 1, 3))
  areas = [tracker.track(clip[:length], max_shapes=1).coverage.sum(axis=(1, 2, 3))
           for clip, length in zip(clips, lengths)]
  best = int(np.argmax([area[0] / area.max() for area in areas]))
  clip = clips[best, :lengths[best]]
  video_io.write_png(os.path.join(directory, 'first.png'),
                     np.round(clip[0] * 255).astype(np.uint8))
  files.write_npz(os.path.join(directory, 'prefix.npz'), frames=clip[:prefix])
  files.write_npz(os.path.join(directory, 'keys.npz'), frames=clip[key_indices(lengths[best])])


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir of a shapes model.')
  flags.DEFINE_integer('num_videos', 128, 'Held-out clips (videos per task).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (the same for every task).')
  flags.DEFINE_integer('prefix', 3, 'Given frames of the extension task.')
  flags.DEFINE_string('output', None, 'Output .json path.')
  flags.DEFINE_string('write_contexts', None, 'Directory for example context files (optional).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  trained = inference.load(args.workdir)
  if args.write_contexts:
    write_contexts(args.write_contexts, trained.config.data, args.prefix)
  summary = {'workdir': args.workdir, 'step': trained.step, 'num_videos': args.num_videos,
             'seed': args.seed, 'prefix': args.prefix,
             'tasks': evaluate(tasks.TaskSampler(trained, args.num_videos), args.seed,
                               args.prefix)}
  files.write_json(args.output, summary)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
