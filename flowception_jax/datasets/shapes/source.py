"""The shapes set: one or two anti-aliased shapes crossing a flat background at constant velocity.

The clip's length follows from its content: the primary shape enters on the first frame and has left
after the last, so a model must learn when a video ends.
"""

import dataclasses

import numpy as np

from flowception_jax.datasets import base

KINDS = ('disc', 'square', 'triangle')
SHAPE_RADIUS = (0.12, 0.25)  # Half-extent of a shape as a fraction of the image size.
SHAPE_CONTRAST = 0.35  # Smallest L-inf distance between a shape's colour and the background.
_PATH_OFFSET = 0.2  # Largest distance of the primary path from the frame centre, in image sizes.
SUPERSAMPLE = 2  # Sub-pixel samples per axis for anti-aliased edges.


@dataclasses.dataclass(frozen=True)
class ShapesSource:
  """RGB clips of one or two shapes crossing a uniform background at constant velocity.

  The length comes from the content: `L` is drawn uniformly from `[min_frames, max_frames]`, then
  the primary shape's velocity is set so that it is just outside one side of the frame at time -1
  and just outside the other side at time `L`. Frames 0 and `L - 1` thus show it entering and
  leaving, and slow shapes make long clips. An optional second shape moves at its own velocity, may
  be only partly visible and is drawn below the primary one. With `kind_labels` a clip's label is
  its primary shape's kind (an index into `KINDS`), for class-conditional training; otherwise 0.
  """
  seed: int
  num_records: int
  image_size: int
  min_frames: int
  max_frames: int
  max_shapes: int
  kind_labels: bool = False

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
    rng = base.record_rng(self.seed, index, self.num_records)
    size = float(self.image_size)
    length = int(rng.integers(self.min_frames, self.max_frames + 1))
    num_shapes = int(rng.integers(1, self.max_shapes + 1))
    background = rng.uniform(size=3)
    times = np.arange(length, dtype=np.float64)

    # Primary shape: a straight path through the central region, from just outside to just outside.
    radius = rng.uniform(*SHAPE_RADIUS) * size
    direction = _unit(rng.uniform(0, 2 * np.pi))
    normal = np.array([-direction[1], direction[0]])
    through = size / 2 + normal * rng.uniform(-_PATH_OFFSET, _PATH_OFFSET) * size
    start = through - direction * _exit_distance(through, -direction, radius, size)
    end = through + direction * _exit_distance(through, direction, radius, size)
    velocity = (end - start) / (length + 1)
    layers = [(start + velocity * (times[:, None] + 1), radius)]

    if num_shapes == 2:  # Secondary shape: anywhere, any direction, a speed primaries also have.
      radius2 = rng.uniform(*SHAPE_RADIUS) * size
      first = rng.uniform(-radius2, size + radius2, size=2)
      speed = rng.uniform(size / (self.max_frames + 1), 2 * size / (self.min_frames + 1))
      velocity2 = _unit(rng.uniform(0, 2 * np.pi)) * speed
      layers.insert(0, (first + velocity2 * times[:, None], radius2))

    video = np.broadcast_to(background, (length, self.image_size, self.image_size, 3))
    for centres, r in layers:
      kind = KINDS[rng.integers(len(KINDS))]
      colour = _contrasting_colour(rng, background)
      alpha = coverage(kind, centres, r, self.image_size)[..., None]
      video = video * (1 - alpha) + colour * alpha
    label = KINDS.index(kind) if self.kind_labels else 0  # The primary shape is drawn last.
    return {'video': video.astype(np.float32), 'label': np.int32(label)}


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
  """A random RGB colour at least `SHAPE_CONTRAST` (L-inf) away from `background`."""
  while True:
    colour = rng.uniform(size=3)
    if np.abs(colour - background).max() >= SHAPE_CONTRAST:
      return colour


def coverage(kind: str, centres: np.ndarray, radius: float, image_size: int) -> np.ndarray:
  """Anti-aliased coverage float [T, S, S] in [0, 1] of a shape at `centres` [T, 2] (x, y).

  Pixel `(row, col)` covers `[col, col + 1] x [row, row + 1]`; coverage is the share of its
  `SUPERSAMPLE^2` sub-pixel samples inside the shape (half-extent `radius` pixels).
  """
  k = SUPERSAMPLE
  samples = (np.arange(image_size * k) + 0.5) / k
  # Offsets of the samples from each centre in radii: dx [T, 1, S k] by column, dy [T, S k, 1].
  dx = (samples[None, None, :] - centres[:, 0, None, None]) / radius
  dy = (samples[None, :, None] - centres[:, 1, None, None]) / radius
  if kind == 'disc':
    inside = dx**2 + dy**2 <= 1
  elif kind == 'square':
    inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
  else:  # Triangle: apex at the top centre of the box, base along its bottom side.
    inside = (dy <= 1) & (np.abs(dx) <= (dy + 1) / 2)
  counts = sum(inside[:, i::k, j::k].astype(np.uint8) for i in range(k) for j in range(k))
  return counts / k**2


def make(data_config) -> tuple[ShapesSource, base.SourceInfo]:
  """The shapes source of `config.data` and its facts."""
  source = ShapesSource(
      seed=data_config.get('seed', 0), num_records=base.num_records(data_config),
      image_size=data_config.get('image_size', 32), min_frames=data_config.get('min_frames', 6),
      max_frames=data_config.get('max_frames', 16), max_shapes=data_config.get('max_shapes', 2),
      kind_labels=data_config.get('kind_labels', False))
  info = base.SourceInfo(frame_shape=(source.image_size, source.image_size, 3),
                         max_frames=source.max_frames,
                         num_classes=len(KINDS) if source.kind_labels else 0,
                         class_names=KINDS if source.kind_labels else ())
  return source, info

