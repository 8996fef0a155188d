"""Measurements on 8 fake CPU devices, printed as JSON for `test_sharding.py` to judge.

Runs in its own process because the device count is fixed when JAX starts (the test suite has 2).
One process measures everything so that JAX, the model and the data are set up once:
- the losses and final parameters of 3 train steps on each mesh against one device;
- per-device bytes of the train state, from the compiled step's memory analysis, and from
  `memory_estimate` (abstract shapes only);
- the sampler's videos on a data x fsdp mesh against one device, and its compile count (counted
  as in `compilations.py`).
"""

import json
import os
import sys

# Fewer LLVM optimisations halve the compile time; every comparison is made within this process.
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                           '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import ml_collections
import numpy as np

from configs import coloring
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.research import memory_estimate
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding
from flowception_jax.training import train
from tests import compilations

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))
STEPS = 3


# A one-block DiT with 4 heads (so that a tensor axis of 4 splits them), cheap to compile.
model_lib.MODEL_SIZES['one_block'] = (32, 1, 4)


def _config():
  """Coloring with the one-block DiT and a single bucket."""
  config = coloring.get_config('tiny')
  config.model.size = 'one_block'
  config.data.buckets = (30,)
  config.data.num_threads = 0
  config.batch_size = 8
  config.optim.warmup_steps = 0  # Full learning rate at once, so the steps move the parameters.
  return config


def _mesh(shape, devices=None):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))),
                            devices)


def train_on(mesh, config, info, batches):
  """Losses and final parameters of `STEPS` steps, and the state's bytes per device."""
  model, tx, init_fn = train.build(config, info)
  _, shardings = train.state_layout(init_fn, mesh)
  state = train.init_sharded(init_fn, mesh, shardings, jax.random.key(0))
  step_fn = train.jit_train_step(model, tx, config, mesh, shardings)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), \
       compilations.counted() as compiles:
    for i, batch in enumerate(batches):
      global_batch = sharding.to_global_batch(batch, mesh)
      if i == 0:
        memory = train.compiled_memory(step_fn, state, global_batch, 30)
        state_bytes = memory.argument_size_in_bytes - sum(
            x.addressable_shards[0].data.nbytes for x in global_batch.values())
        held_bytes = train.device_bytes(state)
      state, metrics = step_fn(state, global_batch)
      losses.append(float(metrics['loss']))
  return {'losses': losses, 'params': jax.device_get(state.params),
          'compiled_state_bytes': int(state_bytes), 'held_state_bytes': int(held_bytes),
          'compiles': compiles['train_step']}


def sample_on(mesh, config, info, params, seed):
  model = model_lib.build_for(config, info)
  sampler = inference.VideoSampler(model, config, info, batch_size=8, mesh=mesh)
  _, shardings = train.state_layout(train.build(config, info)[2], mesh)
  params = jax.device_put(params, shardings.params)
  with compilations.counted() as compiles:
    first = sampler(params, jax.random.key(seed), 8)
    second = sampler(params, jax.random.key(seed + 1), 8)
  return first, second, compiles['sample']


def main():
  config = _config()
  source, info = datasets.make_source(config.data)
  config = train.resolve(config, source, info)
  dataset = input_pipeline.make_train_dataset(source,
                                              config.data,
                                              config.flow,
                                              batch_size=8,
                                              seed=0,
                                              max_frames=info.max_frames,
                                              shard=(0, 1))
  batches = [b for _, b in zip(range(STEPS), iter(dataset))]
  report = {'steps': STEPS}

  reference = train_on(_mesh((1, 1, 1), jax.devices()[:1]), config, info, batches)
  report['reference_losses'] = reference['losses']
  report['replicated_state_bytes'] = reference['held_state_bytes']
  for shape in MESHES:
    result = train_on(_mesh(shape), config, info, batches)
    report[str(shape)] = {
        'losses': result['losses'],
        'max_param_difference': max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree.leaves(result['params']), jax.tree.leaves(reference['params']))),
        'compiled_state_bytes': result['compiled_state_bytes'],
        'held_state_bytes': result['held_state_bytes'],
        'compiles': result['compiles'],
    }
  report['replicated_compiled_state_bytes'] = report['(8, 1, 1)']['compiled_state_bytes']

  fsdp_config = ml_collections.ConfigDict(config.to_dict())
  fsdp_config.mesh.update(data=1, fsdp=8, tensor=1)
  estimate = memory_estimate.estimate(fsdp_config, chips=8)
  report['estimated_fsdp_state_bytes'] = estimate.params + estimate.ema_params + estimate.optimizer

  # Sampling: parameters perturbed so the zero-initialised heads predict rates and velocities.
  params = reference['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  single = sample_on(_mesh((1, 1, 1), jax.devices()[:1]), config, info, params, seed=3)
  sharded = sample_on(_mesh((2, 4, 1)), config, info, params, seed=3)
  staged_config = ml_collections.ConfigDict(config.to_dict())
  staged_config.sampler.update(staged=True, stages=(8, 16, info.max_frames))
  staged = sample_on(_mesh((2, 4, 1)), staged_config, info, params, seed=3)
  report['sampler'] = {
      'lengths_single': single[0].lengths.tolist(),
      'lengths_sharded': sharded[0].lengths.tolist(),
      'lengths_second_key': sharded[1].lengths.tolist(),
      'max_frame_difference': float(np.max(np.abs(single[0].frames - sharded[0].frames))),
      'second_key_frame_difference': float(np.max(np.abs(single[1].frames - sharded[1].frames))),
      'compiles': sharded[2],
      'lengths_staged': staged[0].lengths.tolist(),
      'staged_frame_difference': float(np.max(np.abs(single[0].frames - staged[0].frames))),
  }
  print('REPORT ' + json.dumps(report))


if __name__ == '__main__':
  main()
