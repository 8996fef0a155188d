r"""UCF-101, class-conditional (101 actions), from the TFDS `ucf101` builder.

  tfds build ucf101 --data_dir=/data/tfds --file_format=array_record
  python -m flowception_jax.main --config=configs/ucf.py --workdir=/tmp/ucf \
      --config.data.data_dir=/data/tfds

`tfds build` needs apache_beam (pip install apache_beam) and the ffmpeg program. Clips of 8 to 16
frames at every second frame (12.5 FPS) with a random start, 64x64 with 4-pixel patches (256 tokens
per frame). Variants: `:128` and `:256` keep the tokens per frame (patches of 8 and 16); `:tiny` is
a seconds-long smoke run.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/ucf.py', ('128', '256', 'tiny'))
  c = config_lib.base_config()
  c.total_steps = 200_000
  c.batch_size = 64
  c.checkpoint_every = 5000
  c.evals.samples.every = 10_000
  c.data.name = 'ucf101'
  c.data.image_size = int(arg) if arg in ('128', '256') else 64
  c.data.min_frames = 8
  c.data.max_frames = 16
  c.data.frame_stride = 2
  c.data.buckets = (4, 8, 12, 16)
  c.model.size = 'B'
  c.model.patch_size = c.data.image_size // 16
  c.model.dtype = 'bfloat16'
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 5000
  c.optim.ema_decay = 0.9999
  if arg == 'tiny':
    config_lib.make_tiny_clips(c)
  return c
