"""Checkpoint integrity: checksums catch what Orbax misses; damaged or unwritable workdirs stop with
one message and lose nothing."""

import hashlib
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import coloring
from flowception_jax.training import checkpoint
from flowception_jax.training import config as config_lib
from flowception_jax.training import sharding
from flowception_jax.training import train
from tests import compilations


# Orbax leaves its failed reads' coroutines to the garbage collector, which reports them.
_ORBAX_LEFTOVERS = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _toy_state(seed: int) -> dict:
  """A small train-state-like tree; random floats are incompressible, so a byte of the stored file
  is a byte of an array."""
  rng = np.random.default_rng(seed)

  def params():
    return {'w': jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16)}

  return {'params': params(), 'ema_params': params(), 'step': jnp.int32(seed)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save_steps(workdir, steps):
  """Saves a toy state at each of `steps` with a real Grain iterator; returns the states by step."""
  manager = checkpoint.make_manager(workdir, keep=len(steps))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  states = {}
  for step in steps:
    next(iterator)
    states[step] = _toy_state(step)
    checkpoint.save(manager, step, states[step], iterator, config_lib.base_config())
  checkpoint.wait(manager)
  manager.close()
  return states


def _array_files(workdir, step):
  """The array-data files of a checkpoint's state, largest first."""
  directory = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  return sorted((os.path.join(directory, f) for f in os.listdir(directory)),
                key=os.path.getsize, reverse=True)


def _snapshot(directory):
  """Every file under `directory` with the hash of its content."""
  return {os.path.relpath(os.path.join(root, name), directory):
          hashlib.sha256(open(os.path.join(root, name), 'rb').read()).hexdigest()
          for root, _, files in os.walk(directory) for name in files}


def test_checksums_see_every_element_and_not_the_sharding():
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  tree = {'f32': jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32),
          'bf16': jnp.arange(10, dtype=jnp.bfloat16), 'i32': jnp.arange(5, dtype=jnp.int32),
          'mask': jnp.array([True, False, True]), 'key': jax.random.key(3)}
  sums = checkpoint.checksums(tree)
  split = dict(tree, f32=jax.device_put(tree['f32'], sharding.batch_sharding(mesh)))
  assert len(split['f32'].sharding.device_set) == 2
  assert checkpoint.checksums(split) == sums
  for index in np.ndindex(tree['f32'].shape):  # One flipped bit anywhere changes the sum.
    bits = jax.lax.bitcast_convert_type(tree['f32'], jnp.uint32)
    flipped = jax.lax.bitcast_convert_type(bits.at[index].set(bits[index] ^ 1), jnp.float32)
    assert checkpoint.checksums(dict(tree, f32=flipped))['f32'] != sums['f32']
  swapped = dict(tree, i32=tree['i32'][::-1])
  assert checkpoint.checksums(swapped)['i32'] != sums['i32']
  assert checkpoint.checksums(dict(tree, mask=~tree['mask']))['mask'] != sums['mask']


def test_checksums_compile_once_per_tree_structure():
  states = [_toy_state(seed) for seed in range(3)]
  checkpoint.checksums(states[0])
  with compilations.counted() as compiles:
    first, second = checkpoint.checksums(states[1]), checkpoint.checksums(states[2])
  assert first != second
  assert compiles['_leaf_checksums'] == 0
  with compilations.counted() as compiles:  # Another structure: compiled (the count sees it).
    checkpoint.checksums(dict(states[0], extra=jnp.zeros(5)))
  assert compiles['_leaf_checksums'] == 1


def test_a_flipped_byte_that_orbax_reads_is_caught_by_the_checksums(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1])
  path = _array_files(workdir, 1)[0]
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  manager = checkpoint.make_manager(workdir, read_only=True)
  raw = manager.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(states[1]))))['state']
  changed = [name for name, a, b in zip(['params/b', 'params/w', 'ema_params/b', 'ema_params/w'],
                                        jax.tree.leaves([raw['params'], raw['ema_params']]),
                                        jax.tree.leaves([states[1]['params'],
                                                         states[1]['ema_params']]))
             if not np.array_equal(a, b)]
  assert len(changed) == 1  # Orbax restores the damaged array without a word.
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'1 arrays differ from the checksums saved with them .{changed[0]}'):
    checkpoint.restore_state(manager, 1, _abstract(states[1]))
  manager.close()


@_ORBAX_LEFTOVERS
def test_sampling_from_a_damaged_checkpoint_names_it(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1])
  for path in _array_files(workdir, 1):
    with open(path, 'r+b') as f:
      f.truncate(10)
  manager = checkpoint.make_manager(workdir, read_only=True)
  with pytest.raises(checkpoint.CheckpointError,
                     match='checkpoint .*checkpoints/1 is unusable: .*moves it aside'):
    checkpoint.restore_ema_params(manager, 1, _abstract(states[1]['ema_params']))
  manager.close()


def test_a_model_unlike_the_checkpoint_is_named_as_such_and_nothing_moves(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1, 2])
  wider = dict(states[2], params=dict(states[2]['params'], w=jnp.zeros((64, 512))))
  manager = checkpoint.make_manager(workdir)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'checkpoint \S+/2 holds other arrays than this code and config build '
                           r'\(1 differ: params/w: saved \[64, 256\] float32, expected \[64, 512\] '
                           r'float32\); use the code version and config it was trained with'):
    checkpoint.restore_latest(manager, _abstract(wider), iterator, config_lib.base_config(),
                              workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  extra = dict(states[2]['ema_params'], gate=jnp.zeros(3))
  with pytest.raises(checkpoint.CheckpointMismatchError, match='ema_params/gate: not in the'):
    checkpoint.restore_ema_params(manager, 2, _abstract(extra))
  manager.close()


@_ORBAX_LEFTOVERS
def test_no_usable_checkpoint_stops_with_one_message_and_changes_nothing(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1, 2])
  with open(_array_files(workdir, 2)[0], 'r+b') as f:
    f.truncate(100)
  with open(os.path.join(workdir, 'checkpoints', '1', 'config', 'metadata'), 'wb') as f:
    f.write(np.random.default_rng(0).bytes(500))
  before = _snapshot(workdir)
  manager = checkpoint.make_manager(workdir)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'no usable checkpoint.*step 2: .*step 1: .*Nothing was changed'):
    checkpoint.restore_latest(manager, _abstract(states[2]), iterator,
                              config_lib.base_config(), workdir)
  manager.close()
  assert _snapshot(workdir) == before


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  config = coloring.get_config('tiny')
  with pytest.raises(checkpoint.CheckpointError,
                     match='cannot write to the workdir .*file/run: Not a directory; choose a '
                           '--workdir'):
    train.train_and_evaluate(config, str(blocker / 'run'))
