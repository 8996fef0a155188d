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
from flowception_jax import checkpoint
from flowception_jax import config as config_lib
from flowception_jax import sharding
from flowception_jax import train


def _toy_state(seed: int) -> dict:
  """A small train-state-like tree; random floats are incompressible, so a byte of the stored file
  is a byte of an array."""
  rng = np.random.default_rng(seed)
  return {'params': {'w': jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
                     'b': jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16)},
          'step': jnp.int32(seed)}


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


def _array_file(workdir, step):
  """The largest array-data file of a checkpoint's state."""
  directory = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  return max((os.path.join(directory, f) for f in os.listdir(directory)), key=os.path.getsize)


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
  checkpoint.checksums(_toy_state(0))
  compiled = checkpoint._leaf_checksums._cache_size()
  first, second = checkpoint.checksums(_toy_state(1)), checkpoint.checksums(_toy_state(2))
  assert first != second
  assert checkpoint._leaf_checksums._cache_size() == compiled


def test_a_flipped_byte_that_orbax_reads_is_caught_by_the_checksums(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1])
  path = _array_file(workdir, 1)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  manager = checkpoint.make_manager(workdir, read_only=True)
  raw = manager.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(states[1]))))['state']
  assert not np.array_equal(raw['params']['w'], states[1]['params']['w'])  # Orbax trusts it.
  with pytest.raises(checkpoint.CheckpointError, match='differ from the checksums.*params/w'):
    checkpoint.restore_state(manager, 1, _abstract(states[1]))
  with pytest.raises(checkpoint.CheckpointError, match='checkpoints/1 is unusable'):
    checkpoint.restore_ema_params(manager, 1, _abstract(states[1]['params']))
  manager.close()


def test_no_usable_checkpoint_stops_with_one_message_and_changes_nothing(tmp_path):
  workdir = str(tmp_path)
  states = _save_steps(workdir, [1, 2])
  with open(_array_file(workdir, 2), 'r+b') as f:
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
