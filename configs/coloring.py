r"""The coloring toy task: 3x3 frames whose ring of colours rotates by a per-video stride.

  python -m flowception_jax.main --config=configs/coloring.py --workdir=/tmp/coloring

Lengths are uniform over {15, 20, 25, 30}; one token per frame (patch 3). `datasets/coloring.py`
scores samples: length histogram against uniform, and the share of frame pairs that follow the rule.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/coloring.py')
  c = config_lib.base_config()
  c.total_steps = 8000  # About 19 minutes on a 2-core CPU, at about 8 steps per second.
  c.batch_size = 16  # At a fixed budget, 4x the updates of batch 64 denoise better.
  c.checkpoint_every = 1000
  c.evals.samples.every = 0
  c.evals.samples.num_videos = 256
  c.data.name = 'coloring'
  c.data.max_frames = 30
  c.data.buckets = (8, 16, 24, 30)
  c.model.size = 'mini'
  c.model.patch_size = 3
  c.optim.learning_rate = 2e-3  # At batch 16 it denoises faster than 5e-4 (`docs/benchmark.md`).
  c.optim.warmup_steps = 300
  c.sampler.num_steps = 50
  c.sampler.insertion = 'thinning'  # Exact final lengths when the rates are exact counts.
  if arg == 'tiny':
    config_lib.make_tiny(c)
  return c
