"""Device mesh, logical-axis rules and the placement of batches and train state.

The model names its axes logically ('batch', 'embed', 'mlp', ...); `LOGICAL_RULES` maps them onto the
mesh axes `data` (batch parallelism) and `fsdp` (batch parallelism whose devices also split the
parameters and optimizer state). Scaling out changes the mesh shape in the config, not the trainer.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

MESH_AXES = ('data', 'fsdp')

LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', None),
    ('heads', None),
    ('kv', None),
    ('vocab', None),
    ('patch', None),
    ('length', None),
)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); `data = -1` takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_config.fsdp
  data = mesh_config.data if mesh_config.data != -1 else len(devices) // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp != len(devices):
    raise ValueError(f'mesh data={mesh_config.data} x fsdp={fsdp} does not cover the '
                     f'{len(devices)} devices; set --config.mesh.data and --config.mesh.fsdp so '
                     'that their product is the device count (data=-1 fills in)')
  return jax.make_mesh((data, fsdp), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Splits the leading (example) axis over every device of the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MESH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings of a tree whose leaves may be `nn.Partitioned` (abstract) boxes; others replicate."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_RULES)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The per-process batch size, after checking that the global one splits over devices and hosts."""
  if global_batch_size % mesh.size or global_batch_size % jax.process_count():
    raise ValueError(f'batch_size {global_batch_size} does not split over {mesh.size} devices in '
                     f'{jax.process_count()} processes; set --config.batch_size to a multiple of '
                     f'{np.lcm(mesh.size, jax.process_count())}')
  return global_batch_size // jax.process_count()


def _pad_frames(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads the frame axis (axis 1) of every per-frame array to `size` slots; padding is masked."""
  frames = batch['frame_mask'].shape[1]

  def pad(x):
    if x.ndim < 2 or x.shape[1] != frames or size == frames:
      return x
    widths = [(0, 0), (0, size - frames)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, widths)

  # Positions are padded like the rest, not renumbered: teacher-forcing batches repeat them.
  return {k: pad(v) for k, v in batch.items()}


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' local batches into one global, batch-sharded array per key.

  Processes bucket independently, so with several processes each pads to the largest bucket
  among them (a small, cross-host agreement on one integer per step).
  """
  if jax.process_count() > 1:
    size = int(np.max(multihost_utils.process_allgather(np.int32(batch['frame_mask'].shape[1]))))
    batch = _pad_frames(batch, size)
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
