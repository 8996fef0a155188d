"""Shared by the sources of stored videos: choosing a clip, resizing frames, unreadable records.

Frames are resized the same way everywhere (by `prepare`, by the sources, and by tests that check
them): the centred square of the short side is cropped, then resampled to `size x size` with PIL's
antialiased bicubic filter.
"""

import dataclasses
import io

from absl import logging
import numpy as np
from PIL import Image

# Errors that mean a stored record (not the code reading it) is broken: a failed checksum or read
# (RuntimeError, OSError), undecodable bytes (PIL's UnidentifiedImageError is an OSError; msgpack
# raises ValueError subclasses), or a record without the expected fields or shapes.
CORRUPT_ERRORS = (RuntimeError, OSError, ValueError, KeyError, TypeError, EOFError)

ON_CORRUPT = ('stop', 'skip')


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """How a clip is cut from a video of `T` frames.

  The clip takes every `stride`-th frame from a random start; its length is uniform over
  `[min_frames, max_frames]`, capped by what the video holds at that stride (a video shorter than
  `min_frames` strided frames gives all it has).
  """
  min_frames: int
  max_frames: int
  stride: int

  def __post_init__(self):
    if not 1 <= self.min_frames <= self.max_frames:
      raise ValueError(f'clips need 1 <= min_frames <= max_frames, got {self.min_frames} and '
                       f'{self.max_frames}; fix --config.data.min_frames or '
                       '--config.data.max_frames')
    if self.stride < 1:
      raise ValueError(f'frame_stride must be >= 1, got {self.stride}; fix '
                       '--config.data.frame_stride')

  @classmethod
  def from_config(cls, data_config) -> 'ClipSpec':
    return cls(min_frames=data_config.get('min_frames', 6),
               max_frames=data_config.get('max_frames', 16),
               stride=data_config.get('frame_stride', 1))

  def choose(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Indices int64 [L] of a clip's frames in a video of `num_frames >= 1` frames."""
    available = (num_frames - 1) // self.stride + 1
    high = min(self.max_frames, available)
    length = int(rng.integers(min(self.min_frames, high), high + 1))
    span = (length - 1) * self.stride + 1
    start = int(rng.integers(0, num_frames - span + 1))
    return start + self.stride * np.arange(length)


def resize_crop(image: Image.Image, size: int) -> np.ndarray:
  """The centred square of `image`'s short side resampled to uint8 [size, size, 3]."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.convert('RGB').crop((left, top, left + side, top + side))
  if side != size:
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def decode_frames(encoded: list[bytes], size: int) -> np.ndarray:
  """Encoded images (PNG, JPEG) to float32 [N, size, size, 3] in [0, 1], by `resize_crop`."""
  frames = [resize_crop(Image.open(io.BytesIO(data)), size) for data in encoded]
  return np.stack(frames).astype(np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class CorruptRecords:
  """What a source does with a record it cannot read, as `data.on_corrupt` says.

  'stop' raises one error naming the record and the fix; 'skip' logs the record (index and name)
  with the running count of distinct skipped records when it is first met, and the pipeline drops
  it (a skipped read returns None, which Grain filters out).
  """
  policy: str
  where: str  # The data set, for messages.
  fix: str  # How to rewrite the data set, for messages.
  num_records: int
  skipped: set[int] = dataclasses.field(default_factory=set, compare=False)

  def __post_init__(self):
    if self.policy not in ON_CORRUPT:
      raise ValueError(f'unknown data.on_corrupt {self.policy!r}; set --config.data.on_corrupt '
                       f'to one of {", ".join(ON_CORRUPT)}')

  def handle(self, index: int, name: str, error: Exception) -> None:
    """Raises for 'stop'; for 'skip' logs and counts record `index` and returns None."""
    if self.policy == 'stop':
      raise ValueError(
          f'record {index} ({name}) of {self.where} cannot be read: {error}. {self.fix}; or set '
          '--config.data.on_corrupt=skip to skip unreadable records (each is logged and counted)'
      ) from error
    if index not in self.skipped:
      self.skipped.add(index)
      logging.warning('skipped unreadable record %d (%s) of %s: %s; %d distinct records skipped '
                      'so far: %s', index, name, self.where, error, len(self.skipped),
                      sorted(self.skipped)[:20])
    if len(self.skipped) == self.num_records:
      raise ValueError(f'no record of {self.where} can be read ({self.num_records} skipped). '
                       f'{self.fix}')
    return None
