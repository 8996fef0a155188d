"""Training as real processes, interrupted the way clusters and disks interrupt them.

SIGTERM (preemption), SIGKILL in the middle of a checkpoint write and damaged checkpoint files all
end, after the same command is run again, with the weights, optimizer state and data position of
one uninterrupted run; a write that fails stops with one message and leaves nothing a resume would
trust. SIGTERM is also sent at the moments the loop waits (`sigterm_at.py`), and to one process of
two. The processes share a JAX compilation cache, so only the first one compiles.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import coloring
from flowception_jax import datasets
from flowception_jax.training import checkpoint
from flowception_jax.training import sharding
from flowception_jax.training import train

# End to end: real training processes. One worker: one reference run, one warm cache.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group('faults')]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EVERY = 5  # Steps between checkpoints.
# Enough steps after the first checkpoint that a SIGTERM sent when it appears lands mid-run.
_OVERRIDES = {'total_steps': 30, 'data.buckets': (16, 30), 'data.num_threads': 1,
              'checkpoint_every': _EVERY, 'keep_checkpoints': 3}


def _config():
  config = coloring.get_config('tiny')
  for dotted, value in _OVERRIDES.items():
    *parents, leaf = dotted.split('.')
    target = config
    for name in parents:
      target = target[name]
    target[leaf] = value
  return config


def _command(workdir, flags=()):
  return [sys.executable, '-m', 'flowception_jax.main', '--config=configs/coloring.py:tiny',
          f'--workdir={workdir}'] + [f'--config.{k}={v}'.replace(' ', '')
                                     for k, v in _OVERRIDES.items()] + list(flags)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _start(workdir, env, max_file_size=None, flags=(), sigterm_at=None):
  """Starts a training run; `max_file_size` (bytes) makes every longer write fail (EFBIG);
  `sigterm_at` (moment, step) sends it SIGTERM there (see `sigterm_at.py`)."""
  command = _command(workdir, flags)
  if sigterm_at:
    command[1:3] = [os.path.join(_ROOT, 'tests', 'sigterm_at.py'), *map(str, sigterm_at)]
  if max_file_size:
    limit = ('import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, '
             f'({max_file_size}, {max_file_size})); '
             'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')
    command[1:1] = ['-c', limit]
  return subprocess.Popen(command, cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(workdir, env, max_file_size=None):
  process = _start(workdir, env, max_file_size)
  _, stderr = process.communicate(timeout=600)
  return process.returncode, stderr


def _wait_for(path, process):
  """Polls every millisecond until `path` exists; fails if the process ends first."""
  while not os.path.exists(path):
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.001)


def _checkpoints(workdir):
  return os.path.join(workdir, 'checkpoints')


def _preempted(process, workdir):
  """The step a SIGTERMed run saved, once it exits: with 0 and one warning, which names its newest
  checkpoint, complete."""
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if 'SIGTERM' in line]
  assert len(lines) == 1, stderr[-3000:]
  step, path = re.search(r'saved step (\d+) in (\S+) and exiting', lines[0]).groups()
  assert path == os.path.join(_checkpoints(workdir), step)
  assert checkpoint.make_manager(workdir, read_only=True).latest_step() == int(step)
  assert not [name for name in os.listdir(_checkpoints(workdir)) if 'tmp' in name]
  return int(step)


def _final_state(workdir):
  """The latest step, its train state (on the host) and its data-iterator state."""
  config = _config()
  source, info = datasets.make_source(config.data)
  _, _, init_fn = train.build(train.resolve(config, source, info), info)
  abstract, _ = train.state_layout(init_fn, sharding.make_mesh(config.mesh))
  manager = checkpoint.make_manager(workdir, read_only=True)
  step = manager.latest_step()
  state = jax.device_get(checkpoint.restore_state(manager, step, abstract))
  manager.close()
  data_dir = os.path.join(_checkpoints(workdir), str(step), 'data')
  data_state = {name: json.load(open(os.path.join(data_dir, name)))
                for name in os.listdir(data_dir) if name.endswith('.json')}
  assert data_state, f'no data-iterator state in {data_dir}'
  return step, state, data_state


def _assert_same_run(reference, workdir, total_steps=_config().total_steps):
  step_a, state_a, data_a = reference[1]
  step_b, state_b, data_b = _final_state(workdir)
  assert step_a == step_b == total_steps == int(state_b.step)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)  # Params, EMA, moments, step.
  assert data_a == data_b  # The same position in the data stream.


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """One uninterrupted run: its workdir and final state."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  returncode, stderr = _run(workdir, env)
  assert returncode == 0, stderr[-3000:]
  return workdir, _final_state(workdir)


def test_sigterm_then_sigkill_mid_save_resume_like_an_uninterrupted_run(reference, env, tmp_path):
  workdir = str(tmp_path)
  # Preemption: SIGTERM once the first checkpoint is written finishes the step, saves it, exits 0.
  process = _start(workdir, env)
  _wait_for(os.path.join(_checkpoints(workdir), str(_EVERY)), process)
  process.send_signal(signal.SIGTERM)
  preempted = _preempted(process, workdir)

  # SIGKILL while the next checkpoint is being written: only its temporary directory remains.
  next_save = (preempted // _EVERY + 1) * _EVERY
  partial = os.path.join(_checkpoints(workdir), f'{next_save}.orbax-checkpoint-tmp')
  process = _start(workdir, env)
  _wait_for(partial, process)
  process.kill()
  process.communicate(timeout=60)
  assert os.path.isdir(partial)
  assert not os.path.exists(os.path.join(_checkpoints(workdir), str(next_save)))
  assert checkpoint.make_manager(workdir, read_only=True).latest_step() == preempted

  returncode, stderr = _run(workdir, env)
  assert returncode == 0, stderr[-3000:]
  assert f'resumed from step {preempted}' in stderr
  assert not os.path.exists(partial)
  _assert_same_run(reference, workdir)


@pytest.mark.parametrize('moment, step, flags', [
    ('fetch', 9, ['--config.log_every=3']),  # A step that logs but has no regular checkpoint.
    ('samples', 7, ['--config.evals.samples.every=7']),
    ('checkpoint', 10, []),
])
def test_sigterm_while_the_loop_waits_saves_the_step_it_names(reference, env, tmp_path, moment,
                                                             step, flags):
  workdir = str(tmp_path)
  saved = _preempted(_start(workdir, env, flags=flags, sigterm_at=(moment, step)), workdir)
  if moment == 'checkpoint':  # The loop may go on while step 10 is written, but waits for it.
    assert saved >= step and step in checkpoint.make_manager(workdir, read_only=True).all_steps()
  else:
    assert saved == step
  returncode, stderr = _run(workdir, env)  # `flags` only set up the moment.
  assert returncode == 0, stderr[-3000:]
  assert f'resumed from step {saved}' in stderr
  _assert_same_run(reference, workdir)


_TWO_STEPS = 12  # Steps of the two-process runs, which have one bucket: fewer step compilations.


def _start_two(workdir, env, sigterm_at=None):
  """Starts a run of two processes, of one CPU device each; `sigterm_at` applies to process 1."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(env, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  flags = [f'--config.total_steps={_TWO_STEPS}', '--config.data.buckets=(30,)',
           '--config.log_every=3', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  return [_start(workdir, env, flags=flags + [f'--process_id={i}'],
                 sigterm_at=sigterm_at if i else None) for i in range(2)]


def _each(processes, check):
  """`check(process)` of every process, in order; none outlives a failure."""
  try:
    return [check(process) for process in processes]
  finally:
    for process in processes:
      process.kill()


def _succeeded(process):
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(env, tmp_path):
  uninterrupted, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'preempted')
  _each(_start_two(uninterrupted, env), _succeeded)
  # Only process 1 gets SIGTERM, in the fetch of step 9 (a step that logs but has no checkpoint).
  saved = _each(_start_two(workdir, env, sigterm_at=('fetch', 9)),
                lambda process: _preempted(process, workdir))
  assert saved == [9, 9]
  data_dir = os.path.join(_checkpoints(workdir), '9', 'data')
  assert len([f for f in os.listdir(data_dir) if f.endswith('.json')]) == 2  # Each process's.
  _each(_start_two(workdir, env), _succeeded)
  _assert_same_run((uninterrupted, _final_state(uninterrupted)), workdir, _TWO_STEPS)


def test_damaged_newest_checkpoints_are_reported_skipped_and_moved_aside(reference, env, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  last = _config().total_steps
  newest, previous, usable = last, last - _EVERY, last - 2 * _EVERY

  def array_file(step):
    directory = os.path.join(_checkpoints(workdir), str(step), 'state', 'ocdbt.process_0', 'd')
    return max((os.path.join(directory, f) for f in os.listdir(directory)), key=os.path.getsize)

  with open(array_file(newest), 'r+b') as f:  # Truncated.
    f.truncate(os.path.getsize(array_file(newest)) // 3)
  path = array_file(previous)
  with open(path, 'r+b') as f:  # Garbage over the middle of an array file.
    f.seek(os.path.getsize(path) // 2)
    f.write(np.random.default_rng(0).bytes(64))

  returncode, stderr = _run(workdir, env)
  assert returncode == 0, stderr[-3000:]
  for step in (newest, previous):
    assert re.search(rf'WARNING: checkpoint \S+/checkpoints/{step} is unusable', stderr), stderr
    assert os.path.isdir(os.path.join(workdir, checkpoint.CORRUPT_DIR, str(step)))
  assert f'resumed from step {usable}' in stderr
  _assert_same_run(reference, workdir)


def test_failing_checkpoint_write_stops_with_one_message_and_nothing_trusted(reference, env,
                                                                            tmp_path):
  del reference  # Its run fills the compilation cache, which this run could not write.
  workdir = str(tmp_path)
  # Writes past 100 kB fail in the kernel (EFBIG), as writes to a full disk fail (ENOSPC); the
  # largest array file of a checkpoint outgrows that within the first saves.
  returncode, stderr = _run(workdir, env, max_file_size=100_000)
  assert returncode == 1
  errors = [line for line in stderr.splitlines() if 'ERROR' in line]
  assert len(errors) == 1 and 'Traceback' not in stderr, stderr[-3000:]
  failed = int(re.search(r'could not write the checkpoint of step (\d+)', errors[0]).group(1))
  assert 'File too large' in errors[0] and 'run the same command again' in errors[0]
  # What a resume would see: only complete checkpoints, all older than the failed one.
  complete = checkpoint.make_manager(workdir, read_only=True).all_steps()
  assert all(step < failed for step in complete)
  assert f'the complete ones ({", ".join(map(str, complete)) or "none"}) are kept' in errors[0]
  assert sorted(os.listdir(_checkpoints(workdir))) == sorted(
      [str(step) for step in complete] + [f'{failed}.orbax-checkpoint-tmp'])
