r"""Per-chip training memory of a config on a mesh of any size, from abstract shapes alone.

  python -m flowception_jax.research.memory_estimate --config=configs/shapes.py --chips=256 \
      --hbm_gib=16 --config.model.size=XL --config.data.image_size=256 --config.model.patch_size=16 \
      --config.data.max_frames=16 --config.data.buckets='(4,8,12,16)' --config.batch_size=256 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.remat=full \
      --config.model.dtype=bfloat16

The figures are those of `training/memory.py` (the train state exactly, activations by an
analytic estimate), the ones the trainer checks against a device's memory before compiling; here
on a mesh of `chips` devices that need not exist, for data that need not exist yet (the frames and
classes come from the config, `planned_info`). The compiled step's own figure on real devices is
logged by the trainer before step 0 (`train.log_memory`).
"""

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from flowception_jax import datasets
from flowception_jax.training import memory
from flowception_jax.training import sharding
from flowception_jax.training import train


def planned_info(data_config) -> tuple[datasets.SourceInfo, str]:
  """The data's facts, and where they come from: its source where it can be opened; otherwise,
  so that the estimate runs before any data exists, the config: latent frames of `latent_shape`,
  or else frames of `image_size` pixels and 3 channels; clips of up to `max_frames`;
  `num_classes` classes."""
  try:
    return datasets.make_source(data_config)[1], 'the data'
  except (FileNotFoundError, ValueError) as missing:
    latent_shape = tuple(data_config.latent_shape)
    size = data_config.image_size
    info = datasets.SourceInfo(frame_shape=latent_shape or (size, size, 3),
                               max_frames=data_config.max_frames,
                               num_classes=data_config.num_classes, pixels=not latent_shape)
    return info, f'the config (the data cannot be read: {missing})'


def estimate(config, chips: int, info: datasets.SourceInfo | None = None) -> memory.MemoryEstimate:
  """The per-chip memory of training `config` on a mesh of `chips` devices, for data of `info`
  (default: `planned_info`)."""
  info = info or planned_info(config.data)[0]
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes, config.pixels = info.num_classes, info.pixels
  model, _, init_fn = train.build(config, info)
  mesh_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, chips)))
  return memory.estimate(config, info, mesh_sizes, model=model, init_fn=init_fn)


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
        f'and microbatch; largest batch {result.frames} frames; attention '
        f'{config.model.attention}')
  for field in ('params', 'ema_params', 'optimizer', 'gradients', 'gathered_block', 'activations'):
    print(f'  {field:<15} {gib(getattr(result, field))}')
  fits = 'fits' if result.total <= hbm_gib * 2**30 else 'does not fit'
  print(f'  {"total":<15} {gib(result.total)} of {hbm_gib:g} GiB per chip: {fits}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
