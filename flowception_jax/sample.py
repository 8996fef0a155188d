r"""Samples videos from a trained workdir with its saved config and latest EMA weights.

  python -m flowception_jax.sample --workdir=/tmp/shapes --num_videos=16 --seed=0 --output=/tmp/s.npz

Writes `videos` float32 [N, N_max, H, W, C] in [0, 1] (slots past each length are zero) and `lengths`
int32 [N] to the .npz, and a GIF grid beside it (a model of latents writes `latents` instead, and no
GIF). The same seed and weights give the same file. The sampler settings come from the trained
config unless a flag overrides them (`--num_steps=200 --insertion=thinning`); a summary (with the
data set's exact metrics, where it has them) is printed as JSON.
"""

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from flowception_jax import datasets
from flowception_jax import inference
from flowception_jax import sampler as sampler_lib
from flowception_jax import video_io

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints.')
_NUM_VIDEOS = flags.DEFINE_integer('num_videos', 16, 'Number of videos to sample.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output .npz path; a .gif is written beside it.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None,
                                  'Flow steps per unit time (default: the config).')
_INSERTION = flags.DEFINE_enum('insertion', None, sampler_lib.INSERTION_MODES,
                               'Insertion law per gap and step (default: the config).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, 'Velocity guidance (default: the config).')
_RATE_GUIDANCE = flags.DEFINE_float('rate_guidance', None, 'Rate guidance (default: the config).')
flags.mark_flags_as_required(['workdir', 'output'])


def sample_videos(workdir: str, num_videos: int, seed: int, sampler_overrides=None):
  """Returns (videos [N, N_max, H, W, C] in [0, 1], lengths [N], config).

  `sampler_overrides` maps `config.sampler` fields to values that replace the trained config's.
  A model trained on latents (`config.pixels` False) gives its latents instead of videos.
  """
  trained = inference.load(workdir)
  config = trained.config
  config.sampler.update(sampler_overrides or {})
  sampler = inference.make_sampler(trained.model, config, trained.info, num_videos)
  label_key, sample_key = jax.random.split(jax.random.key(seed))
  labels = inference.sample_labels(label_key, num_videos, trained.info.num_classes)
  out = sampler(trained.params, sample_key, labels=labels)
  lengths = np.asarray(out.lengths, np.int32)
  if not config.get('pixels', True):
    return inference.to_latents(out.frames, lengths), lengths, config
  return inference.to_pixels(out.frames, lengths), lengths, config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUTPUT.value.endswith('.npz'):
    raise app.UsageError(f'--output must end in .npz, got {_OUTPUT.value}')
  overrides = {'num_steps': _NUM_STEPS.value, 'insertion': _INSERTION.value,
               'guidance_scale': _GUIDANCE.value, 'rate_guidance': _RATE_GUIDANCE.value}
  videos, lengths, config = sample_videos(
      _WORKDIR.value, _NUM_VIDEOS.value, _SEED.value,
      {k: v for k, v in overrides.items() if v is not None})
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  summary = {'num_videos': len(lengths), 'mean_length': float(lengths.mean()),
             'sampler': config.sampler.to_dict()}
  if not config.get('pixels', True):  # No decoder here: the latents are the output.
    inference.save_latents(_OUTPUT.value, videos, lengths)
    summary['latents'] = 'no GIF: decode the latents with the autoencoder that encoded the data'
    print(json.dumps(summary, indent=1))
    return
  np.savez(_OUTPUT.value, videos=videos, lengths=lengths)
  video_io.write_gif(_OUTPUT.value[:-len('.npz')] + '.gif', video_io.video_grid(videos, lengths))
  summary.update(datasets.task_metrics(config.data.name, videos, lengths, config.data))
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
