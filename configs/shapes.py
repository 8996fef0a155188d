r"""Shapes crossing the frame: the default quickstart, trains on CPU in minutes.

  python -m flowception_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

Clip lengths follow from content (slow shapes make long clips), so the model must learn when to stop.
`configs/shapes.py:tiny` is a seconds-long smoke run.
"""

from flowception_jax import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/shapes.py')
  c = config_lib.base_config()
  c.total_steps = 1800
  c.batch_size = 16
  c.checkpoint_every = 500
  c.sample_every = 900
  c.data.name = 'shapes'
  c.data.image_size = 16
  c.data.min_frames = 4
  c.data.max_frames = 12
  c.data.buckets = (3, 6, 9, 12)
  c.model.size = 'mini'
  # 16 tokens per frame, each patch (48 values) narrower than the model (128): a wider patch
  # leaves noise the model cannot carry through, a finer one is too slow for a 2-core CPU.
  c.model.patch_size = 4
  c.optim.learning_rate = 5e-4
  c.sampler.num_steps = 50
  if arg == 'tiny':
    config_lib.make_tiny(c)
  return c
