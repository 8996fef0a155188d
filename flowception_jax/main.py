r"""Trains a Flowception model, running the evaluators its config names (`config.evals`).

  python -m flowception_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

Any config field can be overridden, e.g. `--config.batch_size=8`. Running the same command again
resumes from the latest checkpoint in the workdir. By default only the run's own lines are shown;
`--verbose` adds the libraries' logs and full tracebacks. On several hosts every process runs the
same command; on TPU pod slices and under cluster managers (SLURM, Open MPI) the processes find each
other by themselves, elsewhere add `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (`launch/` holds scripts for TPU VMs, GPU clusters and local multi-process runs).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flowception_jax.training import distributed
from flowception_jax.training import run_log

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_JOIN_RUNTIME = distributed.define_flags()
flags.adopt_module_key_flags(distributed)
_VERBOSE = flags.DEFINE_bool('verbose', False, "Also show the libraries' logs (Orbax, Grain, JAX, "
                             'TensorFlow) and the traceback of every error.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_log.setup(verbose=_VERBOSE.value)
  with run_log.one_line_errors(enabled=not _VERBOSE.value):
    _JOIN_RUNTIME()
  # Imported here, after flag parsing, so that TensorFlow's C++ start-up notes (the trainer's
  # metric writers import it) can be kept out of the run's output.
  with run_log.native_output_silenced(enabled=not _VERBOSE.value):
    # pylint: disable=g-import-not-at-top
    from flowception_jax.evaluation import evaluators
    from flowception_jax.training import train
  logging.info('JAX %s, %d processes, local devices %s', jax.__version__, jax.process_count(),
               jax.local_devices())
  with run_log.one_line_errors(enabled=not _VERBOSE.value):
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             make_evaluators=evaluators.from_config)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
