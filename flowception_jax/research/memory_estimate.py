r"""Per-chip training memory of a config on a mesh of any size, from abstract shapes alone.

  python -m flowception_jax.research.memory_estimate --config=configs/shapes.py --chips=256 \
      --hbm_gib=16 --config.model.size=XL --config.data.image_size=256 --config.model.patch_size=16 \
      --config.data.max_frames=16 --config.data.buckets='(4,8,12,16)' --config.batch_size=256 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.remat=full \
      --config.model.dtype=bfloat16

The train state (parameters, EMA parameters, AdamW moments) is counted exactly: it is traced with
`jax.eval_shape`, each array is split by the logical axis rules over the mesh the config asks for on
`chips` devices, and the largest shard is counted. Gradients are counted like the parameters (the
compiled step keeps them sharded the same way under FSDP), plus one block's parameters gathered whole
for its computation. Activations are an analytic estimate for
the largest bucket (see `activation_bytes`): what the backward pass keeps per block under the remat
policy, plus one block's working set, attention logits in float32. The compiled step's own figure on
real devices is logged by the trainer before step 0 (`train.log_memory`).
"""

import dataclasses
import math

from absl import app
from absl import flags
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.training import sharding
from flowception_jax.training import train



@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per chip."""
  mesh: dict[str, int]
  num_params: int
  params: int  # Parameters (exact).
  ema_params: int  # EMA parameters (exact).
  optimizer: int  # AdamW moments and counters (exact).
  gradients: int  # Sharded like the parameters.
  gathered_block: int  # One block's parameters gathered whole along fsdp for its computation.
  activations: int  # Analytic estimate.
  examples_per_chip: float  # Per microbatch.

  @property
  def total(self) -> int:
    return (self.params + self.ema_params + self.optimizer + self.gradients + self.gathered_block
            + self.activations)


def _shard_bytes(abstract_tree, boxed_tree, mesh_sizes: dict[str, int]) -> int:
  """Bytes of the largest shard of each array of `abstract_tree`, summed."""
  specs = nn.get_partition_spec(boxed_tree)

  def shard(leaf, spec):
    axes = nn.logical_to_mesh_axes(tuple(spec), sharding.LOGICAL_RULES) if spec else ()
    size = 1
    for dim, mesh_axes in zip(leaf.shape, tuple(axes) + (None,) * leaf.ndim):
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
      size *= -(-dim // math.prod(mesh_sizes[a] for a in mesh_axes))
    return size * leaf.dtype.itemsize

  return sum(jax.tree.leaves(jax.tree.map(
      shard, abstract_tree, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))


def activation_bytes(model: model_lib.DiT, examples: float, frames: int, tokens_per_frame: int,
                     tensor: int) -> int:
  """Estimated activation bytes of `examples` examples of `frames` slots on one chip.

  Per block and example, with S tokens, width D, MLP width M, H heads (D, M and H split by the
  tensor axis where the model splits them) and activations of `model.dtype`: the block keeps about
  12 S D values outside the heads and MLP, 6 S D / t inside attention, 2 S M / t in the MLP, and
  2 H / t S K float32 attention logits and probabilities, K = S keys for the dense kernels and the
  key block for the blockwise one (whose backward pass keeps no logits). 'full' remat keeps only
  each block's input (S D) and recomputes one block at a time; 'dots' keeps the matrix products
  (about 6 S D + S M / t, and H / t S^2 logits for the dense kernels); 'dots_no_batch' keeps those
  of the weights only (about 6 S D + S M / t).
  """
  s, d = frames * tokens_per_frame, model.hidden_size
  m, h = model.mlp_ratio * d, model.num_heads
  act = jax.numpy.dtype(model.dtype).itemsize
  blockwise = model.attention == 'blockwise'
  keys = min(s, model.attention_block) if blockwise else s
  attention_scores = 2 * (h / tensor) * s * keys * 4
  block = (12 * s * d + 6 * s * d / tensor + 2 * s * m / tensor) * act + attention_scores
  kept = {
      'none': block,
      'full': s * d * act,
      'dots': (6 * s * d + s * m / tensor) * act + (0 if blockwise else (h / tensor) * s * s * act),
      'dots_no_batch': (6 * s * d + s * m / tensor) * act,
  }[model.remat]
  working = 0 if model.remat == 'none' else block  # One block recomputed during the backward pass.
  return int(examples * (model.depth * kept + working))


def planned_info(data_config) -> tuple[datasets.SourceInfo, str]:
  """The data's facts, and where they come from: its source where it can be opened; otherwise,
  so that the estimate runs before any data exists, the config: frames of `image_size` pixels
  (`channels`, default 3), clips of up to `max_frames`, `num_classes` classes (default 0)."""
  try:
    return datasets.make_source(data_config)[1], 'the data'
  except (FileNotFoundError, ValueError) as missing:
    size = data_config.image_size
    info = datasets.SourceInfo(frame_shape=(size, size, data_config.get('channels', 3)),
                               max_frames=data_config.max_frames,
                               num_classes=data_config.get('num_classes', 0))
    return info, f'the config (the data cannot be read: {missing})'


def estimate(config, chips: int, info: datasets.SourceInfo | None = None) -> MemoryEstimate:
  """The per-chip memory of training `config` on a mesh of `chips` devices, for data of `info`
  (default: `planned_info`)."""
  info = info or planned_info(config.data)[0]
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes, config.pixels = info.num_classes, info.pixels
  _, _, init_fn = train.build(config, info)
  data, fsdp, tensor = sharding.mesh_shape(config.mesh, chips)
  mesh_sizes = dict(zip(sharding.MESH_AXES, (data, fsdp, tensor)))
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
  abstract = nn.unbox(boxed)
  params = _shard_bytes(abstract.params, boxed.params, mesh_sizes)
  optimizer = _shard_bytes(abstract.opt_state, boxed.opt_state, mesh_sizes)
  gathered_block = _shard_bytes(abstract.params['block_0'], boxed.params['block_0'],
                                dict(mesh_sizes, fsdp=1))
  model = model_lib.build_for(config, info)
  p = config.model.patch_size
  tokens = len(model_lib.token_grid(info.frame_shape[0] // p, info.frame_shape[1] // p))
  examples = config.batch_size / (data * fsdp) / config.grad_accum_steps
  return MemoryEstimate(
      mesh=mesh_sizes, num_params=sum(x.size for x in jax.tree.leaves(abstract.params)),
      params=params, ema_params=params, optimizer=optimizer, gradients=params,
      gathered_block=gathered_block,
      activations=activation_bytes(model, examples, max(config.data.buckets), tokens, tensor),
      examples_per_chip=examples)


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('chips', 256, 'Devices of the mesh (e.g. 256 for v5litepod-256).')
  flags.DEFINE_float('hbm_gib', 16.0, 'Memory per chip in GiB (v5e: 16).')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, chips, hbm_gib = flags.FLAGS.config, flags.FLAGS.chips, flags.FLAGS.hbm_gib
  info, origin = planned_info(config.data)
  print(f'frames {info.frame_shape}, up to {info.max_frames} per clip, {info.num_classes} '
        f'classes, from {origin}')
  result = estimate(config, chips, info)
  gib = lambda b: f'{b / 2**30:8.3f} GiB'
  print(f'model {config.model.size}: {result.num_params / 1e6:.1f}M parameters; mesh '
        f'{result.mesh} on {chips} chips; {result.examples_per_chip:g} examples per chip '
        f'and microbatch; largest bucket {max(config.data.buckets)} frames; attention '
        f'{config.model.get("attention", "dense")}')
  for field in ('params', 'ema_params', 'optimizer', 'gradients', 'gathered_block', 'activations'):
    print(f'  {field:<15} {gib(getattr(result, field))}')
  print(f'  {"total":<15} {gib(result.total)} of {hbm_gib:g} GiB per chip')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
