r"""RealEstate10K in the paper's setting: 256 px videos of up to 145 frames at 16 FPS, as LTX-Video
latents.

  python -m flowception_jax.prepare --videos='/data/re10k/**/*.mp4' --output=/data/re10k_ltx \
      --size=256 --fps=16 --max_frames=145 --num_workers=16 --encoder=ltx \
      --encoder_weights=/models/ltx-video/vae
  python -m flowception_jax.main --config=configs/realestate10k.py --workdir=/tmp/re10k \
      --config.data.data_dir=/data/re10k_ltx

Unconditional (the videos are 16:9; `prepare` keeps their centred square); clips of 2 to 19 latent
frames of 8x8x128, the paper's DiT. `:pixels` trains on the RGB frames of a folder prepared without
`--encoder` (`--size=256 --fps=16`), `:pixels128` and `:pixels64` on the same folder at a lower
resolution; `:tiny` is a smoke run. See `config.long_clip_config` for the shared settings.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.long_clip_config(arg, 'configs/realestate10k.py')
