"""Data sources behind one interface: `make_source(data_config) -> (source, SourceInfo)`.

A source is a Grain random-access data source (`__len__`, `__getitem__`), picklable so reader
threads and processes can hold copies. Record `i` is a dict
  video: float32 [N, H, W, C] in [0, 1], `N` varying per record (1 <= N <= SourceInfo.max_frames).
  label: int32 scalar class (0 for unconditional sources).
The built-in sources are procedural: record `i` is a pure function of `(data.seed, i)`, so no files
are needed and every process sees the same clips. A new source (for example a TFDS video set) is a
factory `data_config -> (source, SourceInfo)` registered in `_SOURCES`.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import numpy as np

# ---- coloring ---------------------------------------------------------------------------------
# The 8 boundary pixels of a 3x3 frame, clockwise from the top-left corner.
COLORING_RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))
COLORING_CENTRE = (1, 1)
COLORING_LENGTHS = (15, 20, 25, 30)
COLORING_STRIDES = (1, 2, 3)
# Smallest L-inf distance between the palette's end colours. It keeps the stride identifiable: a
# wrong stride (off by 1 or 2 ring steps) misplaces the palette's wrap point by at least 6/8 of the
# end-colour distance, so by at least 0.375 in some pixel.
COLORING_MIN_CONTRAST = 0.5

# ---- shapes -----------------------------------------------------------------------------------
SHAPE_KINDS = ('disc', 'square', 'triangle')
_SHAPE_RADIUS = (0.12, 0.25)  # Half-extent of a shape as a fraction of the image size.
_SHAPE_CONTRAST = 0.35  # Smallest L-inf distance between a shape's colour and the background.
_PATH_OFFSET = 0.2  # Largest distance of the primary path from the frame centre, in image sizes.
_SUPERSAMPLE = 2  # Sub-pixel samples per axis for anti-aliased edges.


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Static facts about a source that the model and sampler are built from."""
  frame_shape: tuple[int, int, int]  # (H, W, C).
  max_frames: int  # Longest clip; the sampler's frame capacity.
  num_classes: int  # 0 for unconditional sources.


def rotate_ring(frame: np.ndarray, stride: int) -> np.ndarray:
  """Moves every ring colour `stride` steps clockwise; the centre is unchanged.

  Args:
    frame: [..., 3, 3, C] one or more 3x3 frames.
    stride: ring steps (any integer; negative rotates anticlockwise).

  Returns:
    [..., 3, 3, C] frames where ring position `k` holds the colour of position `k - stride`.
  """
  rows, cols = np.array(COLORING_RING).T
  out = np.array(frame, copy=True)
  out[..., rows, cols, :] = np.roll(frame[..., rows, cols, :], stride, axis=-2)
  return out


@dataclasses.dataclass(frozen=True)
class ColoringSource:
  """3x3 clips whose 9-colour palette sits on a line and whose ring rotates by a per-clip stride.

  Palette entry `j` is `c0 + (c1 - c0) * j / 8`; entry 8 is the centre and entries 0-7 lie on the
  ring in clockwise order from a random offset. Each frame is `rotate_ring(previous, stride)` with
  the stride drawn from `COLORING_STRIDES`; the length is uniform over `COLORING_LENGTHS`.
  """
  seed: int
  num_records: int

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = _record_rng(self.seed, index, self.num_records)
    length = int(rng.choice(COLORING_LENGTHS))
    stride = int(rng.choice(COLORING_STRIDES))
    offset = int(rng.integers(len(COLORING_RING)))
    c0, c1 = rng.uniform(size=(2, 3))
    while np.abs(c1 - c0).max() < COLORING_MIN_CONTRAST:
      c0, c1 = rng.uniform(size=(2, 3))
    palette = c0 + (c1 - c0) * np.arange(9)[:, None] / 8  # [9, 3]
    # Ring position k of frame t holds entry (k - offset - stride * t) mod 8.
    entries = (np.arange(8)[None, :] - offset - stride * np.arange(length)[:, None]) % 8
    video = np.empty((length, 3, 3, 3), np.float32)
    rows, cols = np.array(COLORING_RING).T
    video[:, rows, cols] = palette[entries]
    video[:, COLORING_CENTRE[0], COLORING_CENTRE[1]] = palette[8]
    return {'video': video, 'label': np.int32(0)}


@dataclasses.dataclass(frozen=True)
class ShapesSource:
  """RGB clips of one or two shapes crossing a uniform background at constant velocity.

  The length comes from the content: `L` is drawn uniformly from `[min_frames, max_frames]`, then
  the primary shape's velocity is set so that it is just outside one side of the frame at time -1
  and just outside the other side at time `L`. Frames 0 and `L - 1` thus show it entering and
  leaving, and slow shapes make long clips. An optional second shape moves at its own velocity, may
  be only partly visible and is drawn below the primary one.
  """
  seed: int
  num_records: int
  image_size: int
  min_frames: int
  max_frames: int
  max_shapes: int

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f'shapes frames must be at least 8 pixels, got {self.image_size}; '
                       'raise --config.data.image_size')
    if not 1 <= self.min_frames <= self.max_frames:
      raise ValueError(f'shapes needs 1 <= min_frames <= max_frames, got {self.min_frames} and '
                       f'{self.max_frames}; fix --config.data.min_frames or '
                       '--config.data.max_frames')
    if self.max_shapes not in (1, 2):
      raise ValueError(f'shapes draws 1 or 2 shapes per clip, got {self.max_shapes}; set '
                       '--config.data.max_shapes to 1 or 2')

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = _record_rng(self.seed, index, self.num_records)
    size = float(self.image_size)
    length = int(rng.integers(self.min_frames, self.max_frames + 1))
    num_shapes = int(rng.integers(1, self.max_shapes + 1))
    background = rng.uniform(size=3)
    times = np.arange(length, dtype=np.float64)

    # Primary shape: a straight path through the central region, from just outside to just outside.
    radius = rng.uniform(*_SHAPE_RADIUS) * size
    direction = _unit(rng.uniform(0, 2 * np.pi))
    normal = np.array([-direction[1], direction[0]])
    through = size / 2 + normal * rng.uniform(-_PATH_OFFSET, _PATH_OFFSET) * size
    start = through - direction * _exit_distance(through, -direction, radius, size)
    end = through + direction * _exit_distance(through, direction, radius, size)
    velocity = (end - start) / (length + 1)
    layers = [(start + velocity * (times[:, None] + 1), radius)]

    if num_shapes == 2:  # Secondary shape: anywhere, any direction, a speed primaries also have.
      radius2 = rng.uniform(*_SHAPE_RADIUS) * size
      first = rng.uniform(-radius2, size + radius2, size=2)
      speed = rng.uniform(size / (self.max_frames + 1), 2 * size / (self.min_frames + 1))
      velocity2 = _unit(rng.uniform(0, 2 * np.pi)) * speed
      layers.insert(0, (first + velocity2 * times[:, None], radius2))

    video = np.broadcast_to(background, (length, self.image_size, self.image_size, 3))
    for centres, r in layers:
      kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
      colour = _contrasting_colour(rng, background)
      alpha = _coverage(kind, centres, r, self.image_size)[..., None]
      video = video * (1 - alpha) + colour * alpha
    return {'video': video.astype(np.float32), 'label': np.int32(0)}


def _record_rng(seed: int, index: int, num_records: int) -> np.random.Generator:
  """The generator of record `index`: a pure function of the data seed and the index."""
  index = int(index)
  if not 0 <= index < num_records:
    raise IndexError(f'record {index} out of range for a source of {num_records} records')
  return np.random.default_rng([int(seed), index])


def _unit(angle: float) -> np.ndarray:
  """The (x, y) unit vector at `angle` radians."""
  return np.array([np.cos(angle), np.sin(angle)])


def _exit_distance(point: np.ndarray, direction: np.ndarray, radius: float, size: float) -> float:
  """Distance along unit `direction` from `point` (x, y) until a box of half-side `radius` centred
  there is fully outside the frame `[0, size]^2`."""
  with np.errstate(divide='ignore'):
    far = np.where(direction > 0, size + radius, -radius)
    steps = np.where(direction != 0, (far - point) / direction, np.inf)
  return float(steps.min())


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
  """A random RGB colour at least `_SHAPE_CONTRAST` (L-inf) away from `background`."""
  while True:
    colour = rng.uniform(size=3)
    if np.abs(colour - background).max() >= _SHAPE_CONTRAST:
      return colour


def _coverage(kind: str, centres: np.ndarray, radius: float, image_size: int) -> np.ndarray:
  """Anti-aliased coverage float [T, S, S] in [0, 1] of a shape at `centres` [T, 2] (x, y).

  Pixel `(row, col)` covers `[col, col + 1] x [row, row + 1]`; coverage is the share of its
  `_SUPERSAMPLE^2` sub-pixel samples inside the shape (half-extent `radius` pixels).
  """
  k = _SUPERSAMPLE
  samples = (np.arange(image_size * k) + 0.5) / k
  xs, ys = np.meshgrid(samples, samples)  # [S k, S k], ys indexes rows.
  dx = (xs[None] - centres[:, 0, None, None]) / radius
  dy = (ys[None] - centres[:, 1, None, None]) / radius
  if kind == 'disc':
    inside = dx**2 + dy**2 <= 1
  elif kind == 'square':
    inside = np.maximum(np.abs(dx), np.abs(dy)) <= 1
  else:  # Triangle: apex at the top centre of the box, base along its bottom side.
    inside = (dy <= 1) & (np.abs(dx) <= (dy + 1) / 2)
  t = centres.shape[0]
  return inside.reshape(t, image_size, k, image_size, k).mean(axis=(2, 4))


# ---- Registry ---------------------------------------------------------------------------------
def _make_coloring(data_config) -> tuple[ColoringSource, SourceInfo]:
  max_frames = data_config.get('max_frames', max(COLORING_LENGTHS))
  if max_frames < max(COLORING_LENGTHS):
    raise ValueError(f'coloring clips have up to {max(COLORING_LENGTHS)} frames but max_frames is '
                     f'{max_frames}; set --config.data.max_frames={max(COLORING_LENGTHS)}')
  source = ColoringSource(seed=data_config.get('seed', 0),
                          num_records=_num_records(data_config))
  return source, SourceInfo(frame_shape=(3, 3, 3), max_frames=max_frames, num_classes=0)


def _make_shapes(data_config) -> tuple[ShapesSource, SourceInfo]:
  source = ShapesSource(
      seed=data_config.get('seed', 0), num_records=_num_records(data_config),
      image_size=data_config.get('image_size', 32), min_frames=data_config.get('min_frames', 6),
      max_frames=data_config.get('max_frames', 16), max_shapes=data_config.get('max_shapes', 2))
  info = SourceInfo(frame_shape=(source.image_size, source.image_size, 3),
                    max_frames=source.max_frames, num_classes=0)
  return source, info


def _num_records(data_config) -> int:
  num_records = data_config.get('num_records', 1_000_000)
  if num_records < 1:
    raise ValueError(f'a source needs at least one record, got {num_records}; raise '
                     '--config.data.num_records')
  return num_records


_SOURCES: dict[str, Callable[[Any], tuple[Any, SourceInfo]]] = {
    'coloring': _make_coloring,
    'shapes': _make_shapes,
}


def make_source(data_config) -> tuple[Any, SourceInfo]:
  """The source named by `data_config.name` and its `SourceInfo`.

  Args:
    data_config: the `config.data` ConfigDict (or any mapping with `.get`); fields a source does not
      find take the defaults of `config.base_config`.
  """
  name = data_config.get('name')
  if name not in _SOURCES:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{sorted(_SOURCES)}')
  return _SOURCES[name](data_config)
