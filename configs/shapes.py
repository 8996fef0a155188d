r"""Shapes crossing the frame: the default quickstart, trains on CPU in minutes.

  python -m flowception_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

Clip lengths follow from content (slow shapes make long clips), so the model must learn when to stop.
`configs/shapes.py:tiny` is a seconds-long smoke run.
"""

from flowception_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.total_steps = 3000
  c.batch_size = 32
  c.checkpoint_every = 500
  c.sample_every = 1500
  c.data.name = 'shapes'
  c.model.size = 'mini'
  c.model.patch_size = 4
  if arg == 'tiny':
    c.total_steps = 20
    c.batch_size = 8
    c.log_every = 5
    c.checkpoint_every = 10
    c.sample_every = 0
    c.num_sample_videos = 4
    c.data.image_size = 16
    c.model.size = 'tiny'
    c.sampler.num_steps = 8
  return c
