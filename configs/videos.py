r"""Any folder of videos (or latents) written by `python -m flowception_jax.prepare`.

  python -m flowception_jax.prepare --videos='/data/my_videos/*.mp4' --output=/data/my_64 --size=64
  python -m flowception_jax.main --config=configs/videos.py --workdir=/tmp/videos \
      --config.data.data_dir=/data/my_64

Clips of 8 to 16 consecutive frames with a random start, 64x64 (frames stored at another size are
resized on read); labels, if the folder has them, condition the model. On a folder of latents the
frames keep their stored shape and pass through unscaled: set `--config.model.patch_size` to a
divisor of the latents' height and width. `:tiny` is a seconds-long smoke run.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/videos.py')
  c = config_lib.base_config()
  c.total_steps = 100_000
  c.batch_size = 32
  c.checkpoint_every = 2000
  c.evals.samples.every = 5000
  c.data.name = 'videos'
  c.data.image_size = 64
  c.data.min_frames = 8
  c.data.max_frames = 16
  c.data.buckets = (4, 8, 12, 16)
  c.model.size = 'small'
  c.model.patch_size = 4
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 1000
  if arg == 'tiny':
    config_lib.make_tiny_clips(c)
  return c
