r"""Kinetics-600 in the paper's setting: 256 px, clips of up to 145 frames at 16 FPS, 600 classes.

  python -m flowception_jax.prepare --videos='/data/kinetics600/train/*/*.mp4' --label_from_dir \
      --output=/data/k600_256 --size=256 --fps=16 --num_workers=32
  python -m flowception_jax.main --config=configs/kinetics600.py --workdir=/tmp/k600 \
      --config.data.data_dir=/data/k600_256

Class-conditional: `--label_from_dir` takes each video's class from its folder (the usual
`train/<class>/<video>.mp4` layout; `--labels=CSV` with columns video,label also works), and the
number of classes comes from the prepared folder (guidance: `--config.sampler.guidance_scale`
when sampling). Variants `:128` and `:64` train on the same
folder at a lower resolution; `:tiny` is a smoke run. See `config.long_clip_config`.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.long_clip_config(arg, 'configs/kinetics600.py')
