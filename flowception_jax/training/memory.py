"""Per-device training memory from abstract shapes, and the refusal of a config that cannot fit.

The train state (parameters, EMA parameters, AdamW moments) is counted exactly: it is traced with
`jax.eval_shape`, each array is split by the logical axis rules over the mesh, and the largest shard
is counted. Gradients are counted like the parameters (the compiled step keeps them sharded the same
way under FSDP), plus one block's parameters gathered whole for its computation. Activations are an
analytic estimate for the largest batch (see `activation_bytes`). The trainer calls `check_fits`
before anything is compiled; `research/memory_estimate.py` prints the same figures for any mesh
before any data exists.
"""

import dataclasses
import math

import flax.linen as nn
import jax

from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device."""
  mesh: dict[str, int]
  num_params: int
  params: int  # Parameters (exact).
  ema_params: int  # EMA parameters (exact).
  optimizer: int  # AdamW moments and counters (exact).
  gradients: int  # Sharded like the parameters.
  gathered_block: int  # One block's parameters gathered whole along fsdp for its computation.
  activations: int  # Analytic estimate.
  examples_per_chip: float  # Per microbatch.
  frames: int  # Frame slots of the largest batch, whose activations are counted.

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
  key block for the blockwise and splash ones (whose backward passes keep no logits). 'full' remat
  keeps only each block's input (S D) and recomputes one block at a time; 'dots' keeps the matrix
  products (about 6 S D + S M / t, and H / t S^2 logits for the dense kernels); 'dots_no_batch'
  keeps those of the weights only (about 6 S D + S M / t).
  """
  s, d = frames * tokens_per_frame, model.hidden_size
  m, h = model.mlp_ratio * d, model.num_heads
  act = jax.numpy.dtype(model.dtype).itemsize
  linear = model.attention in ('blockwise', 'splash')  # Memory linear in the sequence.
  keys = min(s, model.attention_block) if linear else s
  attention_scores = 2 * (h / tensor) * s * keys * 4
  block = (12 * s * d + 6 * s * d / tensor + 2 * s * m / tensor) * act + attention_scores
  kept = {
      'none': block,
      'full': s * d * act,
      'dots': (6 * s * d + s * m / tensor) * act + (0 if linear else (h / tensor) * s * s * act),
      'dots_no_batch': (6 * s * d + s * m / tensor) * act,
  }[model.remat]
  working = 0 if model.remat == 'none' else block  # One block recomputed during the backward pass.
  return int(examples * (model.depth * kept + working))


def estimate(config, info: datasets.SourceInfo, mesh_sizes: dict[str, int], *,
             model: model_lib.DiT, init_fn) -> MemoryEstimate:
  """The per-device memory of training the resolved `config` on data of `info`, with the `model`
  and `init_fn(key) -> TrainState` (boxed) of `train.build`, over a mesh of `mesh_sizes` (one size
  per `sharding.MESH_AXES` name)."""
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
  abstract = nn.unbox(boxed)
  params = _shard_bytes(abstract.params, boxed.params, mesh_sizes)
  optimizer = _shard_bytes(abstract.opt_state, boxed.opt_state, mesh_sizes)
  gathered_block = _shard_bytes(abstract.params['block_0'], boxed.params['block_0'],
                                dict(mesh_sizes, fsdp=1))
  p = config.model.patch_size
  tokens = len(model_lib.token_grid(info.frame_shape[0] // p, info.frame_shape[1] // p))
  examples = (config.batch_size / (mesh_sizes['data'] * mesh_sizes['fsdp'])
              / config.grad_accum_steps)
  frames = input_pipeline.max_slots(config.data, config.method)
  return MemoryEstimate(
      mesh=dict(mesh_sizes), num_params=sum(x.size for x in jax.tree.leaves(abstract.params)),
      params=params, ema_params=params, optimizer=optimizer, gradients=params,
      gathered_block=gathered_block,
      activations=activation_bytes(model, examples, frames, tokens, mesh_sizes['tensor']),
      examples_per_chip=examples, frames=frames)


def device_limit() -> int | None:
  """Bytes of memory this process's first device may use, None where it does not say (CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')


def check_fits(result: MemoryEstimate, limit: int) -> None:
  """Refuses a run whose estimate exceeds `limit` bytes per device (before anything is compiled)."""
  if result.total <= limit:
    return
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  state = result.params + result.ema_params + result.optimizer + result.gradients
  raise MemoryError(
      f'training needs about {gib(result.total)} per device by the estimate (state '
      f'{gib(state)}, gathered block {gib(result.gathered_block)}, activations '
      f'{gib(result.activations)} for {result.examples_per_chip:g} examples of '
      f'{result.frames} frames) but a device holds {gib(limit)}: it would run out of memory. Use '
      'more devices or split the state over them (--config.mesh.fsdp=-1), recompute activations '
      '(--config.model.remat=full), use --config.model.attention=blockwise (or splash on a TPU), '
      'or lower --config.batch_size or raise --config.grad_accum_steps; python -m '
      'flowception_jax.research.memory_estimate gives the figures for any mesh. '
      '--config.check_memory=False compiles anyway')
