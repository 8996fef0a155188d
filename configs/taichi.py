r"""Tai-Chi-HD in the paper's setting: 256 px, clips of up to 145 frames at 16 FPS.

  python -m flowception_jax.prepare --videos='/data/taichi/**/*.mp4' --output=/data/taichi_256 \
      --size=256 --fps=16 --num_workers=16
  python -m flowception_jax.main --config=configs/taichi.py --workdir=/tmp/taichi \
      --config.data.data_dir=/data/taichi_256

Unconditional. Variants `:128` and `:64` train on the same folder at a lower resolution; `:tiny` is
a smoke run. See `config.long_clip_config` for the shared settings.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.long_clip_config(arg, 'configs/taichi.py')
