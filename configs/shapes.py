r"""Shapes crossing the frame: the default quickstart, trains on CPU in minutes.

  python -m flowception_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

Clip lengths follow from content (slow shapes make long clips), so the model must learn when to stop.
`configs/shapes.py:tiny` is a seconds-long smoke run.
"""

from flowception_jax import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/shapes.py')
  c = config_lib.base_config()
  c.total_steps = 2500
  c.batch_size = 16
  c.checkpoint_every = 500
  c.sample_every = 1250
  c.data.name = 'shapes'
  c.model.size = 'mini'
  c.model.patch_size = 8  # 16 tokens per 32x32 frame: what a 2-core CPU trains in minutes.
  c.optim.learning_rate = 5e-4
  if arg == 'tiny':
    config_lib.make_tiny(c)
    c.data.image_size = 16
  return c
