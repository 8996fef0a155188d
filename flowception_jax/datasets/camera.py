"""The camera set: a virtual camera pans, zooms and rolls over real photographs.

The photographs are scikit-image's sample images that ship inside its wheel, all public domain or
CC0 (see `PHOTOS`); some are held out for evaluation (`split='test'`). A clip starts at a random view
(a square window inside the photo) and moves along a smooth path: constant speed on a slowly
turning heading, a steady zoom and a gentle roll. It ends when the next view would leave the photo
or the zoom range, or at `max_frames`, so a clip's length follows from its path. Each record keeps
its photo and camera path, so the motion between frames is known exactly (`relative_motion`).

`metrics` asks of any video how well each frame is the previous one seen by a moving camera: the
best similarity transform between consecutive frames, what it leaves unexplained, and how smoothly
the motion changes (`datasets/motion.py`).
"""

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage
import skimage.data

from flowception_jax.datasets import base
from flowception_jax.datasets import motion

# scikit-image sample photographs in the wheel, with their licences (from their docstrings).
# Training shows four well-known colour photographs; the others are held out for evaluation.
PHOTOS = {
    'train': (
        'astronaut',  # Eileen Collins, NASA: public domain.
        'chelsea',  # A cat, Stefan van der Walt: CC0.
        'coffee',  # A coffee cup, Rachel Michetti: CC0.
        'rocket',  # DSCOVR launch, SpaceX: public domain.
    ),
    'test': (
        'camera',  # A cameraman (grey), Lav Varshney: CC0.
        'clock',  # A wall clock (grey), Stefan van der Walt: public domain.
        'coins',  # Greek coins (grey), Brooklyn Museum: no known copyright restrictions.
        'hubble_deep_field',  # NASA: public domain.
        'immunohistochemistry',  # Microscopy, no known copyright restrictions.
        'retina',  # Fundus photograph, Mikael Haggstrom: CC0.
    ),
}
ZOOM = (1.2, 2.0)  # View side is the photo's short side over the zoom.
SPEED = (0.5, 1.5)  # Pan speed at the start, in output pixels per frame.
TURN = 0.05  # Largest change of heading, radians per frame.
ZOOM_RATE = 0.02  # Largest change of log zoom per frame.
ROLL = (0.15, 0.01)  # Largest start angle and change of angle per frame, radians.
_SUPERSAMPLE = 2  # Samples per output pixel and axis (with the zoom range, antialiases).
_MAX_TRIES = 100  # Paths drawn before a clip of at least `min_frames` frames is given up on.

# Metrics: a frame pair is explained by camera motion if the best similarity transform leaves an
# RMS error of at most `MOTION_TOL` (in [0, 1] units). On real clips of 16 to 32 pixels the exact
# transform leaves 0.02 (median) to 0.05 (largest): the detail lost by resampling a frame; noise of
# 0.1 added to the frames leaves over 0.1.
MOTION_TOL = 0.06


def _rotation(angle: np.ndarray) -> np.ndarray:
  """Rotation matrices [..., 2, 2] acting on (x, y)."""
  cos, sin = np.cos(angle), np.sin(angle)
  return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def load_photos(split: str, image_size: int) -> tuple[np.ndarray, ...]:
  """The photos of `split` as float32 [H, W, 3] in [0, 1], short side `image_size * ZOOM[1]`.

  At the largest zoom a view is then rendered at one photo pixel per output pixel; at the
  smallest, two per output pixel, which the 2x2 supersampling averages.
  """
  if split not in PHOTOS:
    raise ValueError(f'camera has splits {sorted(PHOTOS)}, got {split!r}; fix '
                     '--config.data.split')
  photos = []
  for name in PHOTOS[split]:
    image = Image.fromarray(getattr(skimage.data, name)()).convert('RGB')
    scale = image_size * ZOOM[1] / min(image.size)
    size = (round(image.size[0] * scale), round(image.size[1] * scale))
    photos.append(np.asarray(image.resize(size, Image.Resampling.LANCZOS), np.float32) / 255.0)
  return tuple(photos)


def _inside(camera: np.ndarray, photo_shape: tuple[int, int]) -> np.ndarray:
  """Whether each view (cx, cy, zoom, angle) [..., 4] lies inside the photo and the zoom range.

  Positions are in photo short-side units: the photo spans [0, W / S] x [0, H / S].
  """
  h, w = photo_shape
  short = min(h, w)
  half = 0.5 / camera[..., 2]
  corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], np.float64)  # [4, 2]
  offsets = np.einsum('...ij,kj->...ki', _rotation(camera[..., 3]), corners) * half[..., None, None]
  points = camera[..., None, :2] + offsets  # [..., 4, 2]
  inside = ((points >= 0) & (points <= np.array([w / short, h / short]))).all(axis=(-2, -1))
  return inside & (camera[..., 2] >= ZOOM[0]) & (camera[..., 2] <= ZOOM[1])


def camera_path(rng: np.random.Generator, photo_shape: tuple[int, int], image_size: int,
                max_frames: int) -> np.ndarray:
  """A random path float64 [L, 4] of views (cx, cy, zoom, angle), 1 <= L <= max_frames.

  The path runs while the view stays inside the photo and the zoom range.
  """
  h, w = photo_shape
  short = min(h, w)
  zoom = np.exp(rng.uniform(np.log(ZOOM[0]), np.log(ZOOM[1])))
  angle = rng.uniform(-ROLL[0], ROLL[0])
  margin = 0.5 / zoom * (abs(np.cos(angle)) + abs(np.sin(angle)))  # So the first view fits.
  centre = rng.uniform([margin, margin], [w / short - margin, h / short - margin])
  speed = rng.uniform(*SPEED) / (image_size * zoom)  # Photo units per frame.
  heading = rng.uniform(0, 2 * np.pi) + rng.uniform(-TURN, TURN) * np.arange(max_frames)
  steps = speed * np.stack([np.cos(heading), np.sin(heading)], -1)  # [T, 2]
  t = np.arange(max_frames)
  path = np.concatenate([
      centre + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)]),
      (zoom * np.exp(rng.uniform(-ZOOM_RATE, ZOOM_RATE) * t))[:, None],
      (angle + rng.uniform(-ROLL[1], ROLL[1]) * t)[:, None]], axis=-1)
  inside = _inside(path, photo_shape)
  length = int(np.argmin(inside)) if not inside.all() else max_frames
  return path[:length]


def render(photo: np.ndarray, path: np.ndarray, image_size: int) -> np.ndarray:
  """The views of `path` [L, 4] over `photo` [H, W, 3]: float32 [L, S, S, 3] in [0, 1]."""
  short = min(photo.shape[:2])
  k = _SUPERSAMPLE
  offsets = (np.arange(image_size * k) + 0.5) / k - image_size / 2  # Output pixels from centre.
  x, y = np.meshgrid(offsets, offsets)
  centre, zoom, angle = path[:, :2, None, None], path[:, 2, None, None], path[:, 3, None, None]
  cos, sin = np.cos(angle) / (zoom * image_size), np.sin(angle) / (zoom * image_size)
  # Photo pixel coordinates (pixel centres at integers) of every sub-sample, [L, S k, S k].
  col = (centre[:, 0] + cos * x - sin * y) * short - 0.5
  row = (centre[:, 1] + sin * x + cos * y) * short - 0.5
  samples = np.stack([ndimage.map_coordinates(photo[..., ch], [row, col], order=1,
                                              mode='nearest') for ch in range(3)], -1)
  frames = samples.reshape(len(path), image_size, k, image_size, k, 3).mean(axis=(2, 4))
  return np.clip(frames, 0.0, 1.0).astype(np.float32)


def relative_motion(path: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The exact similarity transforms between consecutive views of `path` [L, 4].

  Returns matrix [L-1, 2, 2] and shift [L-1, 2] such that frame `t + 1` at centred pixel `p` shows
  what frame `t` shows at `A p + b` (the convention of `motion.align`).
  """
  centre, zoom, angle = path[:, :2], path[:, 2], path[:, 3]
  matrix = (zoom[:-1] / zoom[1:])[:, None, None] * _rotation(angle[1:] - angle[:-1])
  shift = np.einsum('pij,pj->pi', _rotation(-angle[:-1]),
                    (centre[1:] - centre[:-1]) * (image_size * zoom[:-1])[:, None])
  return matrix, shift


@dataclasses.dataclass(frozen=True)
class CameraSource:
  """Clips of a camera moving over the photos of one split; record `i` is a function of (seed, i).

  Records: `video` float32 [L, S, S, 3] in [0, 1], `label` 0, `photo` int32 (index into
  `PHOTOS[split]`), `camera` float32 [L, 4] the view of each frame (centre x, centre y in photo
  short-side units from the top-left corner, zoom, angle in radians).
  """
  seed: int
  num_records: int
  photos: tuple[np.ndarray, ...]
  image_size: int
  min_frames: int
  max_frames: int

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f'camera frames must be at least 8 pixels, got {self.image_size}; raise '
                       '--config.data.image_size')
    if not 2 <= self.min_frames <= self.max_frames:
      raise ValueError(f'camera needs 2 <= min_frames <= max_frames, got {self.min_frames} and '
                       f'{self.max_frames}; fix --config.data.min_frames or '
                       '--config.data.max_frames')

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = base.record_rng(self.seed, index, self.num_records)
    photo = int(rng.integers(len(self.photos)))
    shape = self.photos[photo].shape[:2]
    for _ in range(_MAX_TRIES):
      path = camera_path(rng, shape, self.image_size, self.max_frames)
      if len(path) >= self.min_frames:
        break
    else:
      raise ValueError(f'no camera path of {self.min_frames} frames found in {_MAX_TRIES} tries; '
                       'lower --config.data.min_frames')
    return {'video': render(self.photos[photo], path, self.image_size), 'label': np.int32(0),
            'photo': np.int32(photo), 'camera': path.astype(np.float32)}


def metrics(videos: np.ndarray, lengths: np.ndarray, tol: float = MOTION_TOL) -> dict[str, float]:
  """How well consecutive frames are explained by a smooth camera motion of one another.

  Args:
    videos: float [B, N, H, W, C] in [0, 1]; slots at or past a video's length are ignored.
    lengths: int [B] frames per video.
    tol: largest RMS error left by the best similarity transform for a pair to count as explained.

  Returns:
    motion_rmse: mean over consecutive frame pairs of the RMS error left by the best similarity
      transform (pan, zoom, roll) from one frame to the next; about 0.02 on real clips.
    motion_explained: share of pairs whose error is at most `tol`.
    motion_jerk_px: mean change, between consecutive pairs, of how far the transform moves the
      frame corners (pixels); real paths change their motion slowly (about 0.1).
    mean_speed_px: mean corner displacement per frame (pixels); real clips move 0.5 to 2.5, a
      frozen video 0.
    mean_length: mean length.
  """
  videos = np.asarray(videos, np.float32)
  lengths = np.minimum(np.asarray(lengths, np.int64), videos.shape[1])
  if videos.ndim != 5 or lengths.shape != videos.shape[:1] or not lengths.size:
    raise ValueError(f'expected videos [B >= 1, N, H, W, C] and lengths [B], got {videos.shape} '
                     f'and {lengths.shape}')
  b, n, h, w, _ = videos.shape
  pairs = np.arange(n - 1)[None, :] < lengths[:, None] - 1  # [B, N-1]
  result = {'mean_length': float(lengths.mean())}
  if not pairs.any():
    return result | {'motion_rmse': 1.0, 'motion_explained': 0.0, 'motion_jerk_px': 0.0,
                     'mean_speed_px': 0.0}
  matrix, shift, rmse = motion.align(videos[:, :-1][pairs], videos[:, 1:][pairs])
  moved = motion.corner_displacement(matrix, shift, h, w)  # [P, 4, 2]
  per_pair = np.zeros((b, n - 1, 4, 2))
  per_pair[pairs] = moved
  triples = pairs[:, :-1] & pairs[:, 1:]
  jerk = np.linalg.norm(per_pair[:, 1:] - per_pair[:, :-1], axis=-1).mean(axis=-1)[triples]
  return result | {
      'motion_rmse': float(rmse.mean()),
      'motion_explained': float((rmse <= tol).mean()),
      'motion_jerk_px': float(jerk.mean()) if jerk.size else 0.0,
      'mean_speed_px': float(np.linalg.norm(moved, axis=-1).mean()),
  }


def make(data_config) -> tuple[CameraSource, base.SourceInfo]:
  """The camera source of `config.data` and its facts."""
  image_size = data_config.get('image_size', 32)
  source = CameraSource(
      seed=data_config.get('seed', 0), num_records=base.num_records(data_config),
      photos=load_photos(data_config.get('split', 'train'), max(image_size, 1)),
      image_size=image_size, min_frames=data_config.get('min_frames', 6),
      max_frames=data_config.get('max_frames', 16))
  info = base.SourceInfo(frame_shape=(image_size, image_size, 3), max_frames=source.max_frames,
                         num_classes=0)
  return source, info
