r"""Shapes crossing the frame: the default quickstart, trains on CPU in minutes.

  python -m flowception_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

Clip lengths follow from content (slow shapes make long clips), so the model must learn when to stop.
The quickstart trains plain generation only, on packed batches with per-clip losses, with 3x3 local
mixing in the MLPs and a learning rate of 2e-3 (the recipe the curves of `docs/learning.md` chose).
Variants:
- `configs/shapes.py:tasks` trains every task of one model (`config.context` patterns: image to
  video, interpolation, extension), as the tasks notebook and the task commands of
  `docs/tasks.md` use it;
- `configs/shapes.py:image` trains the same DiT on single frames (image flow matching: the
  full-sequence method on clips of one frame), the cross-check that the backbone learns to draw a
  shape at all, with the recipe its knobs were measured against (learning rate 5e-4, no mixing);
- `configs/shapes.py:long` is the same recipe on a 10000-step schedule, the curve of
  `docs/learning.md` section 5 (its checkpoint of step 5000, about 40 minutes on a quiet 2-core CPU,
  scores 0.91 clean pixels and length TV 0.08);
- `configs/shapes.py:tiny` is a seconds-long smoke run.
"""

from flowception_jax.training import config as config_lib


def get_config(arg=None):
  config_lib.check_variant(arg, 'configs/shapes.py', ('tiny', 'tasks', 'image', 'long'))
  c = config_lib.base_config()
  c.total_steps = 1600  # About 13 minutes of training on a quiet 2-core CPU.
  c.batch_size = 16
  c.checkpoint_every = 400
  c.evals.samples.every = 800
  c.data.name = 'shapes'
  c.data.image_size = 16
  c.data.min_frames = 4
  c.data.max_frames = 12
  c.data.buckets = (3, 6, 9, 12)
  c.data.packing = True
  c.flow.loss_normalisation = 'clip'
  c.model.size = 'mini'
  # 16 tokens per frame, each patch (48 values) narrower than the model (128): a wider patch
  # leaves noise the model cannot carry through, a finer one is too slow for a 2-core CPU.
  c.model.patch_size = 4
  c.model.local_mixing = True  # Each patch sees its grid neighbours from the first step.
  c.optim.learning_rate = 2e-3
  c.sampler.num_steps = 50
  if arg != 'tasks':  # Plain generation gets all the training.
    config_lib.no_context(c)
  if arg == 'image':
    c.model.local_mixing = False
    c.optim.learning_rate = 5e-4
    c.method = 'full_sequence'
    c.data.min_frames = c.data.max_frames = 1
    c.data.buckets = (1,)
  if arg == 'long':
    c.total_steps = 10000
    c.checkpoint_every = 1000
    c.evals.samples.every = 2500
  if arg == 'tiny':
    config_lib.make_tiny(c)
  return c
