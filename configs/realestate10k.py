r"""RealEstate10K in the paper's setting: 256 px, clips of up to 145 frames at 16 FPS.

  python -m flowception_jax.prepare --videos='/data/re10k/**/*.mp4' --output=/data/re10k_256 \
      --size=256 --fps=16 --num_workers=16
  python -m flowception_jax.main --config=configs/realestate10k.py --workdir=/tmp/re10k \
      --config.data.data_dir=/data/re10k_256

Unconditional (the videos are 16:9; `prepare` keeps their centred square). Variants `:128` and
`:64` train on the same folder at a lower resolution; `:tiny` is a smoke run. See
`config.long_clip_config` for the shared settings.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.long_clip_config(arg, 'configs/realestate10k.py')
