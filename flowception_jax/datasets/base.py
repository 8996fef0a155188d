"""What every data source provides: the record form, `SourceInfo`, and per-record randomness."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Static facts about a source that the model and sampler are built from."""
  frame_shape: tuple[int, int, int]  # (H, W, C).
  max_frames: int  # Longest clip; the sampler's frame capacity.
  num_classes: int  # 0 for unconditional sources.
  class_names: tuple[str, ...] = ()  # Class names by label id, where the data set knows them.


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
