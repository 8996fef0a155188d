"""Meshes, layouts and the memory and speed knobs; the 8-device equalities run in a subprocess."""

import functools
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import coloring
from flowception_jax import datasets
from flowception_jax.core import model as model_lib
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding
from flowception_jax.training import train
from tests import tiny_params

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _mesh_config(**sizes):
  return ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1, tensor=1), **sizes))


@pytest.mark.parametrize('sizes, devices, expected', [
    (dict(), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1), 8, (2, 4, 1)),
    (dict(data=1, fsdp=2, tensor=-1), 8, (1, 2, 4)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
])
def test_mesh_shape_fills_one_axis(sizes, devices, expected):
  assert sharding.mesh_shape(_mesh_config(**sizes), devices) == expected


@pytest.mark.parametrize('sizes', [dict(data=-1, fsdp=-1), dict(data=3), dict(tensor=0),
                                   dict(data=2, fsdp=2, tensor=1)])
def test_mesh_that_does_not_cover_the_devices_names_the_flags(sizes):
  with pytest.raises(ValueError, match='--config.mesh.data'):
    sharding.mesh_shape(_mesh_config(**sizes), 8)


def test_hybrid_mesh_needs_as_many_slices_or_processes_as_dcn_ways():
  with pytest.raises(ValueError, match='form 1 processes.*--config.mesh.dcn_data'):
    sharding.make_mesh(_mesh_config(dcn_data=2))
  with pytest.raises(ValueError, match='must divide'):
    sharding.make_mesh(_mesh_config(data=1, fsdp=2, dcn_data=2))


def test_batch_splits_over_data_and_fsdp_and_whole_processes():
  mesh = sharding.make_mesh(_mesh_config(data=1, fsdp=2))
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert sharding.data_shard(mesh) == (0, 1)
  assert sharding.check_batch_size(8, mesh, grad_accum_steps=4) == 8
  with pytest.raises(ValueError, match='--config.batch_size to a multiple of 16'):
    sharding.check_batch_size(8, mesh, grad_accum_steps=8)


def test_uneven_layout_names_the_parameter_and_the_fix():
  mesh = sharding.make_mesh(_mesh_config(data=1, tensor=2))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'tensor'))
  sharding.check_divisible({'w': jax.ShapeDtypeStruct((3, 4), np.float32)}, {'w': split})
  with pytest.raises(ValueError, match=r"\['attn'\]\['qkv'\] axis 1 of size 3 .*'tensor'.*"):
    sharding.check_divisible({'attn': {'qkv': jax.ShapeDtypeStruct((4, 3), np.float32)}},
                             {'attn': {'qkv': split}})


def _step_setup(**overrides):
  config = coloring.get_config('tiny')
  config.data.num_threads = 0
  config.data.buckets = (30,)
  config.optim.warmup_steps = 0
  config.update(overrides)
  source, info = datasets.make_source(config.data)
  config = train.resolve(config, source, info)
  batch = next(
      iter(
          input_pipeline.make_train_dataset(source,
                                            config.data,
                                            config.flow,
                                            batch_size=8,
                                            seed=1,
                                            max_frames=info.max_frames,
                                            shard=(0, 1))))
  return config, info, batch


def _initial_params(model, config, info):
  """The parameters `train.build`'s `init_fn(key(0))` starts from, compiled whole."""
  inputs = model_lib.init_inputs(info.frame_shape, min(config.data.buckets), info.num_classes)
  return tiny_params.init(model, *inputs)['params']


def test_gradient_accumulation_equals_the_whole_batch():
  config, info, batch = _step_setup()
  # The microbatches (examples i, i + 4, ...) average over different numbers of frames, so a plain
  # mean of their losses would not be the whole batch's.
  assert len({int(batch['flow_mask'][i::4].sum()) for i in range(4)}) > 1
  mesh = sharding.make_mesh(config.mesh)
  model, _, _ = train.build(config, info)
  params = _initial_params(model, config, info)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    global_batch = sharding.to_global_batch(batch, mesh)
    for steps in (1, 4):
      config.grad_accum_steps = steps

      def gradients(params, batch, key):
        return train.accumulate_gradients(params, batch, key, model=model, config=config)

      chex.clear_trace_counter()  # Each setting is traced once.
      grad_fn = jax.jit(chex.assert_max_traces(gradients, n=1))
      results[steps] = jax.device_get(grad_fn(params, global_batch, jax.random.key(3)))
      # New values of the same shapes reuse the trace.
      grad_fn(params, sharding.to_global_batch({k: v[::-1].copy() for k, v in batch.items()}, mesh),
              jax.random.key(4))
  (loss, aux, grads), (loss_4, aux_4, grads_4) = results[1], results[4]
  np.testing.assert_allclose(loss_4, loss, rtol=1e-5)
  np.testing.assert_allclose(  # `loss_terms` names every term of `compute_losses`' loss.
      sum(weight * aux[name] for name, _, weight in train.loss_terms(config.flow)), loss, rtol=1e-6)
  for key in ('velocity_loss', 'rate_loss'):
    np.testing.assert_allclose(aux_4[key], aux[key], rtol=1e-5, err_msg=key)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), grads_4, grads)
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3


def test_remat_policies_give_the_same_gradients():
  config, info, batch = _step_setup()
  grads = {}
  for policy in ('none', 'full', 'dots'):
    config.model.remat = policy
    model, _, _ = train.build(config, info)
    params = _initial_params(model, config, info)
    loss = lambda p: train.compute_losses(p, batch, jax.random.key(2), model=model,
                                          flow_config=config.flow, num_classes=0)[0]
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for policy in ('full', 'dots'):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 grads[policy], grads['none'])


# The tests of the report share one worker, so that it is made once (training in a subprocess).
_EIGHT_DEVICES = pytest.mark.xdist_group('eight_devices')


@pytest.fixture(scope='module')
def eight_devices():
  """The report of `multidevice_checks.py`, run once in a process with 8 fake devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # The script sets its own XLA_FLAGS.
  result = subprocess.run([sys.executable, os.path.join(_TESTS, 'multidevice_checks.py')],
                          env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith('REPORT '))
  return json.loads(line[len('REPORT '):])


@pytest.mark.e2e
@_EIGHT_DEVICES
def test_meshes_of_eight_devices_train_like_one_device(eight_devices):
  # float32: the meshes sum partial products in other orders, hence a tolerance, not equality.
  reference = eight_devices['reference_losses']
  assert len(reference) == eight_devices['steps'] == 3 and reference[0] != reference[-1]
  for mesh in ('(8, 1, 1)', '(1, 8, 1)', '(2, 2, 2)', '(1, 2, 4)'):
    result = eight_devices[mesh]
    np.testing.assert_allclose(result['losses'], reference, rtol=1e-5, err_msg=mesh)
    assert result['max_param_difference'] < 1e-4, mesh
    assert result['compiles'] == 1, mesh


@pytest.mark.e2e
@_EIGHT_DEVICES
def test_fsdp_holds_at_most_a_sixth_of_the_replicated_state(eight_devices):
  replicated = eight_devices['replicated_compiled_state_bytes']
  fsdp = eight_devices['(1, 8, 1)']['compiled_state_bytes']
  assert fsdp <= replicated / 6
  # The compiled figure is the state the devices hold, and what the estimate computes from shapes.
  assert abs(fsdp - eight_devices['(1, 8, 1)']['held_state_bytes']) < 64
  assert abs(fsdp - eight_devices['estimated_fsdp_state_bytes']) < 64
  assert eight_devices['replicated_state_bytes'] == eight_devices['(8, 1, 1)']['held_state_bytes']


@pytest.mark.e2e
@_EIGHT_DEVICES
def test_sharded_sampler_makes_the_videos_of_one_device(eight_devices):
  sampler = eight_devices['sampler']
  assert sampler['lengths_sharded'] == sampler['lengths_single']
  assert len(set(sampler['lengths_single'])) > 1  # The model decides lengths that vary.
  assert sampler['max_frame_difference'] < 1e-4
  assert sampler['second_key_frame_difference'] < 1e-4
  assert sampler['compiles'] == 1  # A new key reuses the compiled sampler.
  # Staged on the mesh: the same videos again.
  assert sampler['lengths_staged'] == sampler['lengths_single']
  assert sampler['staged_frame_difference'] < 1e-4
