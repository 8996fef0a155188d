r"""Kinetics-600 in the paper's setting: 256 px videos of up to 145 frames at 16 FPS, as LTX-Video
latents, 600 classes.

  python -m flowception_jax.prepare --videos='/data/kinetics600/train/*/*.mp4' --label_from_dir \
      --output=/data/k600_ltx --size=256 --fps=16 --max_frames=145 --num_workers=32 \
      --encoder=ltx --encoder_weights=/models/ltx-video/vae
  python -m flowception_jax.main --config=configs/kinetics600.py --workdir=/tmp/k600 \
      --config.data.data_dir=/data/k600_ltx

Class-conditional: `--label_from_dir` takes each video's class from its folder (the usual
`train/<class>/<video>.mp4` layout; `--labels=CSV` with columns video,label also works), and a
folder without exactly 600 classes is refused (`--config.data.num_classes`; guidance:
`--config.sampler.guidance_scale` when sampling). Clips of 2 to 19 latent frames of 8x8x128, the
paper's DiT. `:pixels` trains on the RGB frames of a folder prepared without `--encoder`
(`--size=256 --fps=16`), `:pixels128` and `:pixels64` on the same folder at a lower resolution;
`:tiny` is a smoke run. See `config.long_clip_config`.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.long_clip_config(arg, 'configs/kinetics600.py', num_classes=600)
