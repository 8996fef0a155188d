"""Readable runs: honest progress arithmetic, only the run's own lines, one-line errors."""

import logging
import os

import numpy as np
import pytest

import flowception_jax
from flowception_jax import datasets
from flowception_jax.training import run_log


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_counts_finished_steps_and_leaves_pauses_out_of_steps_per_second(caplog):
  clock = _Clock()
  progress = run_log.Progress(total_steps=110, first_step=0, clock=clock)
  caplog.set_level(logging.INFO)
  clock.now = 20.0
  assert progress.update(10) == {}  # The first interval includes compilation: no rate.
  assert 'step 10/110 (9%): 10 steps in 20s, compilation included' in caplog.text
  clock.now = 30.0
  with progress.paused():  # A sample or checkpoint: 4 s that are not training.
    clock.now = 34.0
  clock.now = 40.0
  # 20 steps in 20 - 4 s of training; the ETA uses the wall-clock pace, pauses included (1 step/s).
  assert progress.update(30) == {'steps_per_sec': 1.25}
  assert 'step 30/110 (27%): 1.25 steps/s, ETA 1m 20s' in caplog.text
  clock.now = 50.0
  assert progress.update(50) == {'steps_per_sec': 2.0}
  assert 'step 50/110 (45%): 2 steps/s, ETA 45s' in caplog.text  # 60 steps at 40 per 30 s.


@pytest.mark.parametrize('seconds, text', [(0.4, '0s'), (59, '59s'), (61, '1m 01s'),
                                           (3725, '1h 02m')])
def test_durations_read_naturally(seconds, text):
  assert run_log.format_duration(seconds) == text


def _record(pathname, msg='message', level=logging.INFO):
  return logging.LogRecord('absl', level, pathname, 1, msg, (), None)


def test_default_logs_show_the_package_and_metric_lines_only():
  own_lines = run_log._OwnLines()
  package = os.path.dirname(flowception_jax.__file__)
  for module in ('main.py', 'training/train.py', 'core/tasks.py', 'datasets/shapes/source.py'):
    assert own_lines.filter(_record(os.path.join(package, module))), module
  clu = os.path.join('site-packages', 'clu', 'metric_writers', 'logging_writer.py')
  assert own_lines.filter(_record(clu, '[%d]%s %s'))  # Scalars.
  assert not own_lines.filter(_record(clu, '[%d]%s Got images: %s.'))
  for library in ('orbax/checkpoint/checkpoint_manager.py', 'jax/_src/xla_bridge.py'):
    assert not own_lines.filter(_record(os.path.join('site-packages', library), level=logging.ERROR))
  assert not own_lines.filter(_record(package + '_elsewhere/train.py'))


def test_errors_raised_by_the_package_end_the_run_with_their_message(caplog):
  with pytest.raises(SystemExit) as exit_info:
    with run_log.one_line_errors():
      datasets.make_source({'name': 'nope'})
  assert exit_info.value.code == 1
  assert "unknown dataset 'nope'; set --config.data.name" in caplog.text
  with pytest.raises(SystemExit):  # The operating system names the problem and the file.
    with run_log.one_line_errors():
      open(os.path.join(os.path.dirname(run_log.__file__), 'missing', 'file'))
  assert 'No such file or directory' in caplog.text
  with pytest.raises(ValueError, match='negative dimensions'):  # Raised inside a library.
    with run_log.one_line_errors():
      np.zeros(-1)
  with pytest.raises(ValueError, match='unknown dataset'):
    with run_log.one_line_errors(enabled=False):
      datasets.make_source({'name': 'nope'})
