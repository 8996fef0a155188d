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


def test_train_then_sample(tmp_path):
  workdir = str(tmp_path / 'run')
  train_args = ('flowception_jax.main', '--config=configs/coloring.py:tiny', f'--workdir={workdir}',
                '--config.total_steps=4', '--config.checkpoint_every=2',
                '--config.num_sample_videos=2')
  result = _run(*train_args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert os.path.exists(os.path.join(workdir, 'samples_000004.gif'))

  output = str(tmp_path / 'out' / 'samples.npz')
  result = _run('flowception_jax.sample', f'--workdir={workdir}', '--num_videos=3', '--seed=1',
                f'--output={output}')
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(output) as saved:
    assert saved['videos'].shape == (3, 30, 3, 3, 3) and saved['videos'].dtype == np.float32
    assert saved['lengths'].shape == (3,) and saved['lengths'].dtype == np.int32
  assert os.path.exists(output[:-len('.npz')] + '.gif')
  summary = json.loads(result.stdout[result.stdout.index('{'):])
  assert summary['num_videos'] == 3 and 0.0 <= summary['rule_accuracy'] <= 1.0
  assert summary['sampler']['insertion'] == 'thinning'  # The trained config's.

  result = _run('flowception_jax.sample', f'--workdir={workdir}', '--num_videos=3', '--seed=1',
                f'--output={output}', '--num_steps=3', '--insertion=poisson')
  assert result.returncode == 0, result.stderr[-3000:]
  sampler = json.loads(result.stdout[result.stdout.index('{'):])['sampler']
  assert sampler['insertion'] == 'poisson' and sampler['num_steps'] == 3

  # The same command again resumes: nothing left to do, the checkpoints stay as they were.
  result = _run(*train_args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 4' in result.stderr


@pytest.mark.parametrize('override, message', [
    ('--config.batch_sise=8', 'batch_size'),  # A typo is refused with a suggestion.
    ('--config.data.name=ucf', '--config.data.name'),
])
def test_bad_overrides_fail_with_a_message(tmp_path, override, message):
  result = _run('flowception_jax.main', '--config=configs/coloring.py:tiny',
                f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr


def test_unknown_config_variant_is_refused(tmp_path):
  result = _run('flowception_jax.main', '--config=configs/coloring.py:huge', f'--workdir={tmp_path}')
  assert result.returncode != 0 and "unknown variant 'huge'" in result.stderr
