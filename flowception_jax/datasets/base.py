"""What every data source provides: the record form, `SourceInfo`, and per-record randomness."""

import abc
import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Static facts about a source that the model and sampler are built from."""
  frame_shape: tuple[int, int, int]  # (H, W, C).
  max_frames: int  # Longest clip; the sampler's frame capacity.
  num_classes: int  # 0 for unconditional sources.
  class_names: tuple[str, ...] = ()  # Class names by label id, where the data set knows them.
  # True: `video` holds pixels in [0, 1], which the pipeline maps to [-1, 1]. False: it holds
  # latents of an external autoencoder, which pass through unscaled (and samples stay latents).
  pixels: bool = True


def record_rng(seed: int, index: int, num_records: int) -> np.random.Generator:
  """The generator of record `index`: a pure function of the data seed and the index."""
  index = int(index)
  if not 0 <= index < num_records:
    raise IndexError(f'record {index} out of range for a source of {num_records} records')
  return np.random.default_rng([int(seed), index])


def num_records(data_config) -> int:
  """The nominal size of a procedural source, checked."""
  count = data_config.get('num_records', 1_000_000)
  if count < 1:
    raise ValueError(f'a source needs at least one record, got {count}; raise '
                     '--config.data.num_records')
  return count


class RandomClipSource(abc.ABC):
  """A source of clips cut at random from longer stored videos, a new clip at every draw.

  The training pipeline shuffles and repeats record indices and calls `read(index, rng)` through
  Grain's `random_map`, whose generator is a pure function of the pipeline seed and the position in
  the repeated stream. So a video drawn in two epochs gives two different clips (start, length),
  yet the stream is reproducible and a restored iterator recomputes exactly the clips it had read.
  The clip is chosen inside the source rather than cut from a decoded record by a later transform,
  so that only the clip's frames are decoded and resized. Indexing (`source[i]`) reads the clip of
  `record_rng(seed, i)`: evaluation and length statistics see the training distribution.
  """
  seed: int

  @abc.abstractmethod
  def __len__(self) -> int:
    """The number of stored videos."""

  @abc.abstractmethod
  def read(self, index: int, rng: np.random.Generator) -> dict[str, Any] | None:
    """A clip of video `index` drawn with `rng`, in the record form; None if the video cannot be
    read and the source skips such videos (`data.on_corrupt='skip'`)."""

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    return self.read(index, record_rng(self.seed, index, len(self)))
