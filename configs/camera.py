r"""A camera moving over real photographs: the realistic built-in set, no downloads.

  python -m flowception_jax.main --config=configs/camera.py --workdir=/tmp/camera

16x16 clips pan, zoom and roll over four public-domain photographs (`datasets/camera.py`; six more
are held out, `--config.data.split=test`) and end when the view would leave the photo.
`datasets/camera.py` scores samples by how well each frame is the previous one seen by a moving
camera.
`configs/camera.py:tiny` is a seconds-long smoke run.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/camera.py')
  c = config_lib.base_config()
  c.total_steps = 1800  # About 10 minutes on an idle 2-core CPU, like the shapes quickstart.
  c.batch_size = 16
  c.checkpoint_every = 600
  c.evals.samples.every = 900
  c.data.name = 'camera'
  c.data.image_size = 16
  c.data.min_frames = 4
  c.data.max_frames = 12
  c.data.buckets = (3, 6, 9, 12)
  c.model.size = 'mini'
  # 16 tokens per frame, each patch (48 values) narrower than the model (128), as in shapes: a
  # step costs what a shapes step does. At 24x24 with 6-pixel patches the same budget leaves
  # blocky patches after 800 steps; at 16x16 the four photographs stay recognisable.
  c.model.patch_size = 4
  c.optim.learning_rate = 5e-4
  c.sampler.num_steps = 50
  if arg == 'tiny':
    config_lib.make_tiny(c)
  return c
