"""The paper's tasks from one trained model: generation, image-to-video, interpolation, extension.

A task is a set of given (context) frames and how the sampler treats them (METHOD section 8):
  generate     nothing given: unconditional, or class-conditional with guidance.
  i2v          one image, an active context frame at slot 0.
  interpolate  ordered key frames, the last one passive: the video ends on it and the model decides
               how many frames go between each pair.
  extend       a prefix of context frames that the model continues after its last frame.
The given frames keep their order and the video starts from them plus `num_start_frames` noise
frames, as in training (`flowception.sample_extended_time`); insertions make the rest. A prefix's
inner gaps are known to be empty, so its frames before the last are passive here (in training they
are active with insertion target 0), and the prefix stays at slots 0..K-1. Context frames come back
unchanged, at the slots `TaskSamples.context_slots` names. The baselines sample the prefix tasks
(`PREFIX_TASKS`) from the same inputs (`baselines.py`). Arrays in and out are NumPy, frames in
[0, 1], so a notebook can call `load_context`, `sample` and `TaskSampler` directly.
"""

import dataclasses
import difflib
import io
import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from flowception_jax.core import inference
from flowception_jax.storage import files
from flowception_jax.storage import video_io

TASKS = ('generate', 'i2v', 'interpolate', 'extend')
PREFIX_TASKS = ('i2v', 'extend')  # Given frames at slots 0..K-1: the baselines sample these too.
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
_MIN_FRAMES = {'i2v': 1, 'interpolate': 2, 'extend': 1}


@dataclasses.dataclass(frozen=True)
class TaskSamples:
  """Sampled videos of a task.

  task: one of `TASKS`.
  context: float32 [B, K, H, W, C] in [0, 1], the frames given to each video (K = 0 for generate).
  videos: float32 [B, N, H, W, C] in [0, 1], zero past each video's length (the sample file form);
    for a model of latents (`SourceInfo.pixels` False) its latents, unscaled.
  lengths: int32 [B].
  context_slots: int32 [B, K], the slot of the k-th given frame in each video (K = 0 for generate).
  labels: int32 [B] class labels of a conditional model, None for an unconditional one.
  insert_step: int32 [B, N] the sampler iteration that inserted each slot (`SampleOutput`).
  num_iterations: the sampler's iterations.
  """
  task: str
  context: np.ndarray
  videos: np.ndarray
  lengths: np.ndarray
  context_slots: np.ndarray
  labels: np.ndarray | None
  insert_step: np.ndarray
  num_iterations: int


def expected_form(frame_shape) -> str:
  """What a context file must hold for a model of `frame_shape` (H, W, C)."""
  h, w, c = frame_shape
  return (f'an image of {w}x{h} pixels, or an .npz whose `frames` are float32 [K, {h}, {w}, {c}] '
          'in [0, 1]')


def check_context(task: str, frames, frame_shape, capacity: int) -> np.ndarray | None:
  """Validated context frames of `task`: float32 [K, H, W, C] (shared) or [B, K, H, W, C].

  K must suit the task (i2v: 1; interpolate: at least 2; extend: at least 1) and leave room for a
  generated frame in the model's `capacity`. Returns None for 'generate', which takes no frames.
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; known: {", ".join(TASKS)}; set --task')
  if task == 'generate':
    if frames is not None:
      raise ValueError('generate takes no context; choose --task=i2v, interpolate or extend')
    return None
  if frames is None:
    raise ValueError(f'--task={task} needs context frames: --context=FILE, '
                     f'{expected_form(frame_shape)}')
  frames = np.asarray(frames)
  if (not np.issubdtype(frames.dtype, np.floating) or frames.ndim not in (4, 5)
      or frames.shape[-3:] != tuple(frame_shape)):
    raise ValueError(f'context frames {frames.dtype} {list(frames.shape)} do not fit this model: '
                     f'expected {expected_form(frame_shape)}')
  if not np.all(np.isfinite(frames)) or frames.min() < 0.0 or frames.max() > 1.0:
    raise ValueError(f'context frames range over [{frames.min()}, {frames.max()}]: expected '
                     f'{expected_form(frame_shape)}')
  k = frames.shape[-4]
  if task == 'i2v' and k != 1:
    raise ValueError(f'i2v takes one image, got {k} frames; to continue several frames use '
                     '--task=extend')
  if k < _MIN_FRAMES[task]:
    raise ValueError(f'{task} needs at least {_MIN_FRAMES[task]} context frames, got {k}')
  if k >= capacity:
    raise ValueError(f'{k} context frames leave no room in the model\'s {capacity} frames; '
                     f'give at most {capacity - 1}')
  return frames.astype(np.float32)


def load_context(path: str, task: str, frame_shape, capacity: int) -> np.ndarray:
  """Context frames float32 [K, H, W, C] in [0, 1] from an image or an .npz (`frames`) file."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in IMAGE_SUFFIXES + ('.npz',):
    raise ValueError(f'cannot read context {path}: expected {expected_form(frame_shape)}')
  if not files.exists(path):
    raise FileNotFoundError(f'no context file {path}; expected {expected_form(frame_shape)}')
  if suffix == '.npz':
    saved = files.read_npz(path)
    if 'frames' not in saved:
      raise ValueError(f'{path} holds {sorted(saved)}, no `frames`: expected '
                       f'{expected_form(frame_shape)}')
    frames = saved['frames']
  else:
    h, w, c = frame_shape
    try:
      with Image.open(io.BytesIO(files.read_bytes(path))) as image:
        pixels = np.asarray(image.convert('RGB' if c == 3 else 'L'), np.float32) / 255.0
    except OSError as e:
      raise ValueError(f'cannot read context image {path} ({e}): expected '
                       f'{expected_form(frame_shape)}') from e
    if pixels.shape[:2] != (h, w):
      raise ValueError(f'context image {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels: '
                       f'expected {expected_form(frame_shape)}')
    frames = pixels.reshape(1, h, w, c)
  return check_context(task, frames, frame_shape, capacity)


def sampler_inputs(task: str, frames: np.ndarray, num_videos: int, capacity: int,
                   num_start_frames: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Keyword arguments of `sampler.make_sampler`'s function for checked context `frames`.

  The K given frames keep their order, in model space, with `num_start_frames` noise frames at
  t = 0 (as in training, fewer if the capacity is short): after the image or the prefix, or each in
  a random gap between key frames. Passive: for interpolation the last key frame (the video ends
  there), for extension every frame of the prefix but the last (consecutive given frames have
  nothing between them). `rng` draws the gaps.
  Returns init_frames float32 [B, N, H, W, C], init_alive, context_mask and passive_mask bool [B, N].
  """
  if frames.ndim == 4:
    frames = np.broadcast_to(frames, (num_videos,) + frames.shape)
  if frames.shape[0] != num_videos:
    raise ValueError(f'context for {frames.shape[0]} videos given to sample {num_videos}')
  b, k = frames.shape[:2]
  starts = min(num_start_frames, capacity - k)
  noise_after = np.zeros((b, k), np.int64)  # Noise start frames right after each given frame.
  if task == 'interpolate':
    noise_after[:, :-1] = rng.multinomial(starts, np.full(k - 1, 1.0 / (k - 1)), size=b)
  else:
    noise_after[:, -1] = starts
  slots = np.arange(k) + np.cumsum(noise_after, axis=1) - noise_after  # [B, K]
  rows = np.arange(b)[:, None]
  init_frames = np.zeros((b, capacity) + frames.shape[2:], np.float32)
  init_frames[rows, slots] = inference.from_pixels(frames)
  context_mask = np.zeros((b, capacity), bool)
  context_mask[rows, slots] = True
  passive_mask = np.zeros_like(context_mask)
  if task == 'interpolate':
    passive_mask[rows[:, 0], slots[:, -1]] = True
  elif task == 'extend':
    passive_mask[rows, slots[:, :-1]] = True
  init_alive = np.broadcast_to(np.arange(capacity) < k + starts, (b, capacity))
  return {'init_frames': init_frames, 'init_alive': init_alive, 'context_mask': context_mask,
          'passive_mask': passive_mask}


def class_label(value: int | str, num_classes: int, class_names=()) -> int:
  """The label id of `value`: an id, or a class name where the data set knows names."""
  if not num_classes:
    raise ValueError('this model is unconditional (its data has no classes); drop --class')
  text = str(value).strip()
  if text.isdigit():
    if int(text) >= num_classes:
      raise ValueError(f'class id {text} out of range: this model has classes 0..{num_classes - 1}')
    return int(text)
  if not class_names:
    raise ValueError(f'this data set has no class names; give a class id in 0..{num_classes - 1}')
  lowered = [name.lower() for name in class_names]
  if text.lower() in lowered:
    return lowered.index(text.lower())
  close = difflib.get_close_matches(text.lower(), lowered, n=3)
  hint = f'; did you mean {", ".join(class_names[lowered.index(c)] for c in close)}?' if close else ''
  raise ValueError(f'unknown class {text!r}{hint} (give a name of the data set or an id in '
                   f'0..{num_classes - 1})')


class TaskSampler:
  """Samples every task from one model with one compilation.

  Plain generation goes through the same compiled function as the context tasks (with no frame
  given), so a notebook can switch tasks, contexts, seeds and classes without recompiling. Videos
  are made `batch_size` at a time (`inference.VideoSampler`), each batch logging a progress line.
  """

  def __init__(self, trained: inference.TrainedModel, num_videos: int,
               sampler_overrides: dict | None = None, mesh: jax.sharding.Mesh | None = None,
               batch_size: int | None = None):
    """`sampler_overrides`: `config.sampler` fields to change, e.g. `{'guidance_scale': 3.0}`;
    `mesh`: the devices the videos are split over (see `inference.VideoSampler`); `batch_size`:
    videos per sampler call (None: all at once)."""
    self.trained = trained
    self.num_videos = num_videos
    self.config = ml_collections.ConfigDict(trained.config.to_dict())
    self.config.sampler.update(sampler_overrides or {})
    self.sampler = inference.VideoSampler(trained.model, self.config, trained.info,
                                          batch_size=min(batch_size or num_videos, num_videos),
                                          mesh=mesh)

  def __call__(self, task: str = 'generate', context=None, *, seed: int = 0,
               label: int | str | None = None) -> TaskSamples:
    """Samples `num_videos` videos of `task`.

    Args:
      task: one of `TASKS`.
      context: frames in [0, 1], [K, H, W, C] for every video or [B, K, H, W, C] per video; None
        for 'generate'.
      seed: the same seed, weights and inputs give the same videos.
      label: a class id or name for every video of a conditional model; None draws random classes.
    """
    info, b = self.trained.info, self.num_videos
    frames = check_context(task, context, info.frame_shape, info.max_frames)
    method = self.config.method
    if frames is not None and not info.pixels:
      raise ValueError(f'--task={task} gives frames in pixels, but this model generates latents; '
                       'sample it with --task=generate')
    if frames is not None and method != 'flowception' and task not in PREFIX_TASKS:
      raise ValueError(f'--task={task} needs a Flowception model; the {method} baseline takes '
                       f'given frames only as a prefix: --task={" or --task=".join(PREFIX_TASKS)}')
    key = jax.random.key(seed)
    if label is None:
      labels = self.sampler.random_labels(key, b)
    else:
      labels = np.full((b,), class_label(label, info.num_classes, info.class_names), np.int32)
    if frames is None:  # Nothing given: every video starts from `num_start_frames` noise frames.
      none = np.zeros((b, info.max_frames), bool)
      inputs = {'init_frames': np.zeros((b, info.max_frames) + tuple(info.frame_shape), np.float32),
                'init_alive': none, 'context_mask': none, 'passive_mask': none}
    else:
      inputs = sampler_inputs(task, frames, b, info.max_frames, self.config.flow.num_start_frames,
                              np.random.default_rng(seed))
    out = self.sampler(self.trained.params, key, b, labels=labels, inputs=inputs)
    lengths = np.asarray(out.lengths, np.int32)
    k = 0 if frames is None else frames.shape[-4]
    given = (np.zeros((b, 0) + tuple(info.frame_shape), np.float32) if frames is None
             else np.broadcast_to(frames, (b,) + frames.shape[-4:]))
    to_videos = inference.to_pixels if info.pixels else inference.to_latents
    return TaskSamples(task=task, context=given, videos=to_videos(out.frames, lengths),
                       lengths=lengths,
                       context_slots=np.asarray(out.context_slots)[:, :k].astype(np.int32),
                       labels=None if labels is None else np.asarray(labels, np.int32),
                       insert_step=np.asarray(out.insert_step, np.int32),
                       num_iterations=int(out.num_iterations))


def filmstrip(samples: TaskSamples, max_rows: int = 16) -> np.ndarray:
  """uint8 [H', W', 3] picture of the first `max_rows` videos: a row per video, its frames from left
  to right, the given frames framed in red (`video_io.filmstrip`)."""
  shown = slice(0, max_rows)
  given = np.zeros(samples.videos.shape[:2], bool)
  given[np.arange(len(given))[:, None], samples.context_slots] = True
  return video_io.filmstrip(samples.videos[shown], samples.lengths[shown], given[shown])


def sample(trained: inference.TrainedModel, task: str = 'generate', context=None, *,
           num_videos: int, seed: int = 0, label: int | str | None = None,
           sampler_overrides: dict | None = None,
           mesh: jax.sharding.Mesh | None = None) -> TaskSamples:
  """Samples `num_videos` videos of `task` from a loaded model (`inference.load`) once; see
  `TaskSampler` for the arguments and to sample several times without recompiling."""
  return TaskSampler(trained, num_videos, sampler_overrides, mesh)(task, context, seed=seed,
                                                                   label=label)
