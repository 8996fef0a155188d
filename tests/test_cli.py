"""The command-line entry points, run as a user runs them: train, resume, override, sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=_ROOT, capture_output=True, text=True,
                        timeout=600, check=False)


@pytest.mark.e2e
def test_train_then_sample(tmp_path):
  workdir = str(tmp_path / 'run')
  train_args = ('flowception_jax.main', '--config=configs/coloring.py:tiny', f'--workdir={workdir}',
                '--config.total_steps=4', '--config.checkpoint_every=2',
                '--config.evals.samples.num_videos=2')
  result = _run(*train_args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  for name in ('samples_000004.gif', 'samples_000004_length_histogram.png',
               'samples_000004_insertion_timeline.png'):
    assert os.path.exists(os.path.join(workdir, name))
  # The run's own lines, without the libraries' chatter.
  for line in ('data: coloring', 'step 4/4 (100%)', 'checkpoint of step 2: writing',
               'samples of step 4'):
    assert line in result.stderr
  for chatter in ('checkpoint_manager', 'oneDNN', 'InitializeLog', 'xla_bridge'):
    assert chatter not in result.stderr

  output = str(tmp_path / 'out' / 'samples.npz')
  result = _run('flowception_jax.sample', f'--workdir={workdir}', '--num_videos=3', '--seed=1',
                f'--output={output}')
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(output) as saved:
    assert saved['videos'].shape == (3, 30, 3, 3, 3) and saved['videos'].dtype == np.float32
    assert saved['lengths'].shape == (3,) and saved['lengths'].dtype == np.int32
  for suffix in ('.gif', '_length_histogram.png', '_insertion_timeline.png'):
    assert os.path.exists(output[:-len('.npz')] + suffix)
  summary = json.loads(result.stdout[result.stdout.index('{'):])
  assert summary['num_videos'] == 3 and 0.0 <= summary['rule_accuracy'] <= 1.0
  assert summary['sampler']['insertion'] == 'thinning'  # The trained config's.

  result = _run('flowception_jax.sample', f'--workdir={workdir}', '--num_videos=3', '--seed=1',
                f'--output={output}', '--num_steps=3', '--insertion=poisson')
  assert result.returncode == 0, result.stderr[-3000:]
  sampler = json.loads(result.stdout[result.stdout.index('{'):])['sampler']
  assert sampler['insertion'] == 'poisson' and sampler['num_steps'] == 3

  # The same command again resumes: nothing left to do, the checkpoints stay as they were.
  # `--verbose` adds the libraries' logs.
  result = _run(*train_args, '--verbose')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 4' in result.stderr and 'checkpoint_manager.py' in result.stderr


@pytest.mark.e2e  # A process of the training command (stopping before it trains).
@pytest.mark.parametrize('override, message, one_line', [
    # A typo is refused with a suggestion (by ml_collections, while parsing flags).
    ('--config.batch_sise=8', 'batch_size', False),
    # Refused by the package's own check: its message alone, no traceback.
    ('--config.data.name=ucf', '--config.data.name', True),
])
def test_bad_overrides_fail_with_a_message(tmp_path, override, message, one_line):
  result = _run('flowception_jax.main', '--config=configs/coloring.py:tiny',
                f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert ('Traceback' not in result.stderr) == one_line


@pytest.mark.e2e  # A process of the training command (stopping before it trains).
def test_unknown_config_variant_is_refused(tmp_path):
  result = _run('flowception_jax.main', '--config=configs/coloring.py:huge', f'--workdir={tmp_path}')
  assert result.returncode != 0 and "unknown variant 'huge'" in result.stderr
