r"""The benchmark: Flowception against full-sequence training and sampling, in one process.

  python -m flowception_jax.research.bench --config=configs/bench.py --output=/tmp/bench.json

A model wider than `mini` (the `small` DiT: width 256, 6 blocks) on 32x32 `shapes` clips of 6 to
16 frames in patches of 8 (16 tokens per frame, up to 272 tokens per clip), so that its matrix
products are large enough to approach the device's peak. About 7 minutes on a shared 2-core CPU,
two of them compiling the 8 train steps (4 buckets, 2 methods). Both methods train on plain
generation (no context frames), the same task. `configs/bench.py:tiny` runs every measurement in
seconds (for tests; its figures mean nothing).

`configs/bench.py:staged` sizes the comparison of a trained model's plain and staged samplers
(512 videos in batches of 64, three interleaved repeats), which `--workdir` asks for:

  python -m flowception_jax.research.bench --config=configs/bench.py:staged \
      --workdir=/tmp/shapes --output=/tmp/staged.json

`configs/bench.py:tutorial` runs the whole benchmark at the architecture of the paper authors'
coloring tutorial (width 256, 8 blocks, 8 heads, one token per 3x3 frame) on the coloring set,
sampling 64 videos at 50 steps (at most 100 network evaluations), for its seconds per video.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/bench.py', ('tiny', 'staged', 'tutorial'))
  c = config_lib.base_config()
  c.batch_size = 8
  c.data.name = 'shapes'
  c.data.image_size = 32
  c.data.min_frames = 6
  c.data.max_frames = 16
  c.data.buckets = (4, 8, 12, 16)
  config_lib.no_context(c)
  c.model.size = 'small'
  c.model.patch_size = 8
  c.sampler.num_steps = 10
  c.bench.train_batches = 8
  c.bench.repeats = 3
  c.bench.sample_videos = 4
  c.bench.data_batches = 20
  c.bench.peak_size = 2048
  c.bench.study_examples = 1000
  if arg == 'staged':
    c.bench.sample_videos = 512
    c.bench.sample_batch = 64
    c.bench.repeats = 3
  if arg == 'tutorial':
    c.batch_size = 16
    c.data.name = 'coloring'
    c.data.max_frames = 30
    c.data.buckets = (8, 16, 24, 30)
    c.model.size = 'tutorial'
    c.model.patch_size = 3
    c.sampler.num_steps = 50
    c.sampler.insertion = 'thinning'
    c.bench.sample_videos = 64
  if arg == 'tiny':
    config_lib.make_tiny(c)
    c.batch_size = 2
    c.data.image_size = 8
    c.data.min_frames = 2
    c.data.max_frames = 4
    c.data.buckets = (4,)  # One bucket: one compilation per method.
    c.sampler.num_steps = 2
    c.sampler.stages = (4,)  # One staged loop to compile.
    c.bench.train_batches = 2
    c.bench.train_passes = 2
    c.bench.repeats = 2
    c.bench.sample_videos = 2
    c.bench.data_batches = 2
    c.bench.peak_size = 64
    c.bench.study_examples = 16
    c.bench.latent_videos = 16
  return c
