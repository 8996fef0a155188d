r"""The coloring toy task: 3x3 frames whose ring of colours rotates by a per-video stride.

  python -m flowception_jax.main --config=configs/coloring.py --workdir=/tmp/coloring

Lengths are uniform over {15, 20, 25, 30}; one token per frame (patch 3). `evaluate.coloring_metrics`
scores samples: length histogram against uniform, and the share of frame pairs that follow the rule.
"""

from flowception_jax import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/coloring.py')
  c = config_lib.base_config()
  c.total_steps = 2200  # About 20 minutes on a 2-core CPU (2700 steps took 24 minutes).
  c.batch_size = 64
  c.checkpoint_every = 1000
  c.sample_every = 0
  c.num_sample_videos = 256
  c.data.name = 'coloring'
  c.data.max_frames = 30
  c.data.buckets = (8, 16, 24, 30)
  c.model.size = 'mini'
  c.model.patch_size = 3
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 300
  c.sampler.num_steps = 50
  c.sampler.insertion = 'thinning'  # Exact final lengths when the rates are exact counts.
  if arg == 'tiny':
    config_lib.make_tiny(c)
  return c
