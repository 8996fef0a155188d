"""Exact metrics of the shapes set: does a sampled clip look like one the generator could make?

`check` runs every check on one video through the tracker (`tracker.py`), `metrics` scores a
batch of samples. Tolerances come from the generator's constants (see the tracker), plus:
- `TIME_TOL`: half a frame; a clip's first and last frames are the nearest frames to when its
  primary shape's box enters and leaves.
- the shape check allows a mean outline displacement of half a sub-pixel sample spacing (the L1
  coverage error of a misdrawn outline is its displaced area, i.e. perimeter x mean displacement).
"""

import dataclasses

import numpy as np
from scipy import ndimage

from flowception_jax.datasets import metrics as metrics_lib
from flowception_jax.datasets.shapes import source as shapes
from flowception_jax.datasets.shapes import tracker

TIME_TOL = 0.5
# Perimeter of each kind over its half-extent.
_PERIMETER = {'disc': 2 * np.pi, 'square': 8.0, 'triangle': 2 + 2 * np.sqrt(5)}
_FRAME_CHECKS = ('clean', 'connected', 'background_constant', 'colour_constant', 'shape', 'motion')


@dataclasses.dataclass(frozen=True)
class Checks:
  """Which frames of one video look like data, check by check (bool [N] each), and its timing.

  clean: every pixel is a palette mix (`Tracks.clean`).
  connected: the foreground (shape or unclean pixels) has no more 8-connected pieces than there
    are shapes in the frame: no speckle, no shape in pieces.
  background_constant: the frame's background is the video's (its median over frames).
  colour_constant: every fully visible shape has the video's colour for it.
  shape: the frame shows a shape, and every shape is the video's kind and radius (`Tracks.kinds`,
    `radii`), its outline off by half a sample spacing on average at most (`Tracks.fit_error` over
    the perimeter).
  motion: every shape is on its constant-velocity path (`tracker.fit_line`): within
    `POSITION_TOL` of it, or a placement that close explains the frame as well as the best one,
    up to one sub-pixel sample of coverage (a sliver of a shape is placed ambiguously).
  starts_on_time, ends_on_time: some shape's box enters the frame one frame before the first and
    has left it one frame after the last (to `TIME_TOL`), as the primary shape of every clip does.
  """
  clean: np.ndarray
  connected: np.ndarray
  background_constant: np.ndarray
  colour_constant: np.ndarray
  shape: np.ndarray
  motion: np.ndarray
  starts_on_time: bool
  ends_on_time: bool

  @property
  def passed(self) -> bool:
    """Whether every frame passes every check and the clip starts and ends on time."""
    frames = np.all([getattr(self, name) for name in _FRAME_CHECKS], axis=0)
    return bool(frames.all() and self.starts_on_time and self.ends_on_time)


def _box_times(start: np.ndarray, velocity: np.ndarray, radius: float,
               size: int) -> tuple[float, float]:
  """When a box of half-side `radius`, centred at `start` (x, y) at frame 0 and moving at
  `velocity` per frame, starts to overlap the frame `[0, size]^2` and stops (+-inf if never)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    near = np.where(velocity > 0, -radius, size + radius)
    far = np.where(velocity > 0, size + radius, -radius)
    enter = np.where(velocity != 0, (near - start) / velocity, -np.inf)
    leave = np.where(velocity != 0, (far - start) / velocity, np.inf)
  return float(enter.max()), float(leave.min())


def check(video: np.ndarray, max_shapes: int = 2,
          tracks: tracker.Tracks | None = None) -> Checks:
  """Runs every check on `video` float [N, S, S, C] in [0, 1] (its valid frames only).

  `tracks`, if given, must be `tracker.track(video, max_shapes)` (it is computed otherwise).
  """
  tracks = tracker.track(video, max_shapes) if tracks is None else tracks
  n, k, _, size = tracks.coverage.shape
  pieces = np.array([ndimage.label(f, np.ones((3, 3), bool))[1] for f in tracks.foreground])
  background_error = np.abs(tracks.background - np.median(tracks.background, axis=0)).max(axis=-1)
  colour_error = np.abs(tracks.frame_colours - tracks.colours[None]).max(axis=-1)  # [N, K]
  outline = np.array([_PERIMETER[kind] * r for kind, r in zip(tracks.kinds, tracks.radii)])

  on_path = np.ones((n, k), bool)
  timing = [(np.inf, np.inf)]  # |enter + 1| and |leave - N| of each shape seen twice or more.
  for j in range(k):
    start, velocity = tracker.fit_line(tracks, j)
    for t in np.flatnonzero(tracks.present[:, j]):
      position = start + t * velocity
      if np.abs(position - tracks.centres[t, j]).max() > tracker.POSITION_TOL:
        error = tracker.placement_error(tracks, t, j, position, tracker.POSITION_TOL)
        on_path[t, j] = error <= tracks.fit_error[t, j] + 1.0 / shapes.SUPERSAMPLE**2
    if tracks.present[:, j].sum() >= 2:
      enter, leave = _box_times(start, velocity, tracks.radii[j], size)
      timing.append((abs(enter + 1), abs(leave - n)))
  enter_error, leave_error = min(timing, key=max)
  with np.errstate(invalid='ignore'):  # NaN errors (shape absent) pass.
    return Checks(
        clean=tracks.clean.all(axis=(1, 2)),
        connected=pieces <= tracks.present.sum(axis=1),
        background_constant=background_error <= tracker.COLOUR_TOL,
        colour_constant=~(colour_error > tracker.COLOUR_TOL).any(axis=1),
        shape=tracks.present.any(axis=1) & ~(tracks.fit_error > outline * tracker.POSITION_TOL / 2
                                             ).any(axis=1),
        motion=on_path.all(axis=1),
        starts_on_time=bool(enter_error <= TIME_TOL),
        ends_on_time=bool(leave_error <= TIME_TOL))


def metrics(videos: np.ndarray, lengths: np.ndarray, data_config) -> dict[str, float]:
  """Scores shapes samples against the generator's model.

  Args:
    videos: float [B, N_max, S, S, 3] in [0, 1]; slots at or past a video's length are ignored.
    lengths: int [B] frames per video.
    data_config: the `config.data` of the data set (frame counts, shapes per clip).

  Returns:
    pass_share: share of videos that pass every check in every frame and start and end on time.
    clean_pixel_share: share of pixels (within lengths) that are palette mixes.
    `<check>_share` for each frame check of `Checks`: share of frames (within lengths) passing it.
    starts_on_time, ends_on_time: share of videos that start and end on time.
    length_tv: total variation distance between the length histogram and the data's (uniform on
      `[min_frames, max_frames]`); valid_length_share: share of lengths in that range;
    mean_length: mean length.
  """
  videos = np.asarray(videos, np.float32)
  lengths = np.asarray(lengths, np.int64)
  if videos.ndim != 5 or videos.shape[2] != videos.shape[3] or lengths.shape != videos.shape[:1]:
    raise ValueError(f'expected videos [B, N, S, S, C] and lengths [B], got {videos.shape} and '
                     f'{lengths.shape}')
  if not lengths.size:
    raise ValueError('shapes metrics need at least one video')
  if data_config is None:
    raise ValueError('shapes metrics need the data config (frame counts, shapes per clip): pass '
                     'data_config=config.data to datasets.task_metrics')
  max_shapes = data_config.get('max_shapes', 2)
  support = range(data_config.get('min_frames', 6), data_config.get('max_frames', 16) + 1)
  frames = {name: [] for name in _FRAME_CHECKS}
  clean_pixels, starts, ends, passed = [], [], [], []
  for video, length in zip(videos, np.minimum(lengths, videos.shape[1])):
    if length < 1:  # An empty video fails everything it can.
      starts.append(False)
      ends.append(False)
      passed.append(False)
      continue
    tracks = tracker.track(video[:length], max_shapes)
    checks = check(video[:length], max_shapes, tracks)
    for name in _FRAME_CHECKS:
      frames[name].append(getattr(checks, name))
    clean_pixels.append(tracks.clean.ravel())
    starts.append(checks.starts_on_time)
    ends.append(checks.ends_on_time)
    passed.append(checks.passed)
  share = lambda parts: float(np.concatenate(parts).mean()) if parts else 0.0
  return {
      'pass_share': float(np.mean(passed)),
      'clean_pixel_share': share(clean_pixels),
      **{f'{name}_share': share(frames[name]) for name in _FRAME_CHECKS},
      'starts_on_time': float(np.mean(starts)),
      'ends_on_time': float(np.mean(ends)),
      'length_tv': float(metrics_lib.total_variation(metrics_lib.length_histogram(lengths),
                                                     metrics_lib.uniform_histogram(support))),
      'valid_length_share': float(np.isin(lengths, support).mean()),
      'mean_length': float(lengths.mean()),
  }
