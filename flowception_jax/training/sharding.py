"""Device mesh, logical-axis rules and the placement of batches and train state.

The model names its axes logically ('batch', 'embed', 'mlp', 'heads', ...); `LOGICAL_RULES` maps
them onto three mesh axes: `data` (batch parallelism), `fsdp` (batch parallelism whose devices also
split the parameters and optimizer state along 'embed') and `tensor` (attention heads and MLP width
split across devices, Megatron style; examples are replicated along it). Scaling out changes the
mesh shape in the config (`config.mesh`), not the trainer.

Multi-slice TPU runs (and multi-host GPU runs that want it) build a hybrid mesh: `mesh.dcn_data` and
`mesh.dcn_fsdp` say how many ways of the data and fsdp axes span slices (or hosts), whose links are
slower than those inside a slice; the tensor axis never leaves a slice.
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # Mesh axes that split examples.

LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', None),
    ('patch', None),
    ('length', None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of `mesh_config` over `num_devices`; one axis may be -1 (the rest)."""
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.get('tensor', 1)]
  free = [i for i, s in enumerate(sizes) if s == -1]
  fixed = math.prod(s for s in sizes if s != -1)
  if len(free) > 1 or any(s < 1 and s != -1 for s in sizes) or num_devices % fixed:
    raise ValueError(f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} does not cover '
                     f'the {num_devices} devices; set --config.mesh.data, --config.mesh.fsdp and '
                     '--config.mesh.tensor so that their product is the device count (one of them '
                     'may be -1 to take the remaining devices)')
  if free:
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {tuple(sizes)} has {math.prod(sizes)} devices, not {num_devices}; '
                     'set one of --config.mesh.data/fsdp/tensor to -1 or make the product match')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `mesh_config` over `devices` (default: all).

  With `mesh.dcn_data * mesh.dcn_fsdp > 1` the mesh is hybrid: devices are grouped by TPU slice (or
  by process where all devices are in one slice, e.g. GPU hosts) and the DCN degrees split the data
  and fsdp axes across groups, so only their collectives cross the slower network.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  dcn = (mesh_config.get('dcn_data', 1), mesh_config.get('dcn_fsdp', 1), 1)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if any(s % d for s, d in zip(shape, dcn)):
    raise ValueError(f'the DCN degrees (dcn_data={dcn[0]}, dcn_fsdp={dcn[1]}) must divide the mesh '
                     f'axes (data={shape[0]}, fsdp={shape[1]}); fix --config.mesh.dcn_data or '
                     '--config.mesh.dcn_fsdp')
  ici = tuple(s // d for s, d in zip(shape, dcn))
  # Slices where there are several (multi-slice TPU), hosts otherwise (e.g. GPU or CPU hosts).
  by_process = len({getattr(d, 'slice_index', 0) for d in devices}) == 1
  groups = len({d.process_index if by_process else d.slice_index for d in devices})
  if groups != math.prod(dcn):
    raise ValueError(f'dcn_data x dcn_fsdp = {math.prod(dcn)} but the devices form {groups} '
                     f'{"processes" if by_process else "slices"}; set --config.mesh.dcn_data and '
                     '--config.mesh.dcn_fsdp so that their product is that number')
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Splits the leading (example) axis over the data and fsdp axes; replicated along tensor."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings of a tree whose leaves may be `nn.Partitioned` (abstract) boxes; others replicate."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_RULES)


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
  """Refuses a layout that splits an array axis into uneven parts, naming the array and the fix."""
  def check(path, leaf, sharding):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % ways:
        raise ValueError(
            f'{jax.tree_util.keystr(path)} axis {dim} of size {size} does not split over mesh '
            f'axes {axes} ({ways} devices); choose --config.mesh.* sizes that divide it (the '
            'tensor axis must divide the number of heads and the MLP width)')
  jax.tree.map_with_path(check, abstract_tree, shardings)


def data_shard(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(index, count): which part of every global batch this process loads, out of how many.

  Processes whose devices hold the same examples (replicas along `tensor`, or along batch axes that
  stay inside one process) form one shard and must load the same data.
  """
  rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
  indices = batch_sharding(mesh).devices_indices_map((rows,))
  blocks = {}
  for device, (index,) in indices.items():
    blocks.setdefault(device.process_index, set()).add(index.indices(rows)[0])
  shards = sorted({tuple(sorted(b)) for b in blocks.values()})
  mine = tuple(sorted(blocks[jax.process_index()]))
  if any(set(a) & set(b) for a in shards for b in shards if a != b):
    raise ValueError(f'processes hold overlapping but different parts of the batch on mesh '
                     f'{dict(mesh.shape)}; use a mesh whose batch axes group whole processes')
  return shards.index(mine), len(shards)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh,
                     grad_accum_steps: int = 1) -> int:
  """The batch size this process loads, after checking that the global one splits evenly.

  Every microbatch of a step (`grad_accum_steps` of them) must split over the batch axes.
  """
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES) * grad_accum_steps
  if grad_accum_steps < 1 or global_batch_size % ways:
    raise ValueError(f'batch_size {global_batch_size} does not split into {grad_accum_steps} '
                     f'microbatches over the {ways // max(grad_accum_steps, 1)} batch-parallel '
                     f'devices; set --config.batch_size to a multiple of {max(ways, 1)} or change '
                     '--config.grad_accum_steps')
  return global_batch_size // data_shard(mesh)[1]


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' local batches into one global, batch-sharded array per key.

  No host round trip: every process is given batches of the same frame bucket at every step, because
  with several data shards the input pipeline follows a bucket sequence that all processes derive
  from the seed alone (`input_shards.BucketSchedule`).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
