"""Grain input pipeline: extended-time samples, compacted and padded to a bucket, batched per bucket.

Each example is a video `[N, H, W, C]` from a source in `datasets/`. `ExtendedTimeTransform` draws its
start frames, delays and global time, keeps the visible frames in order (left-aligned) and pads the
frame axis to the smallest configured bucket that holds them. `BucketBatchIterDataset` then forms
batches of examples that share a bucket, so the model only ever computes on visible frames plus a
little padding, and every bucket size compiles once.

A batch is a dict of NumPy arrays, `F` the bucket size:
  frames:         float32 [B, F, H, W, C] clean visible frames in [-1, 1] (latents as the source
                  gives them), zeros in padding.
  frame_times:    float32 [B, F] per-frame flow time `clip(tau_i, 0, 1)`, 0 in padding.
  positions:      int32   [B, F] slot index in the compacted sequence.
  frame_mask:     bool    [B, F] real (visible) frames.
  flow_mask:      bool    [B, F] frames in flow (`0 <= tau_i < 1`), not context: the velocity loss.
  rate_mask:      bool    [B, F] frames that may insert (not passive, not padding): the rate loss.
  insert_targets: int32   [B, F] invisible frames between a frame and the next visible one.
  context_mask:   bool    [B, F] clean conditioning frames.
  label:          int32   [B] class label (0 for unlabelled sources).
  length:         int32   [B] the full clip's number of frames.
Noise is not drawn here: the train step draws it from a key folded with the step.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from flowception_jax import datasets
from flowception_jax import flowception


def bucket_for(num_frames: int, buckets: Sequence[int]) -> int:
  """The smallest bucket size that holds `num_frames` frames."""
  for size in sorted(buckets):
    if num_frames <= size:
      return size
  raise ValueError(f'{num_frames} frames do not fit in the largest bucket {max(buckets)}')


def check_buckets(buckets: Sequence[int], max_frames: int) -> tuple[int, ...]:
  """Validates the bucket list against the longest clip of the source."""
  buckets = tuple(sorted(int(b) for b in buckets))
  if not buckets or buckets[0] < 1:
    raise ValueError(f'data.buckets must be positive frame counts, got {buckets}')
  if buckets[-1] < max_frames:
    raise ValueError(f'the largest bucket ({buckets[-1]}) cannot hold the longest clip ({max_frames} '
                     f'frames); add a bucket >= {max_frames} to --config.data.buckets')
  return buckets


@dataclasses.dataclass(frozen=True)
class ExtendedTimeTransform(grain.transforms.RandomMap):
  """Turns a clip into one compacted, bucket-padded extended-time training example."""
  kappa: str
  num_start_frames: int
  tau_distribution: str
  buckets: tuple[int, ...]
  pixels: bool = True  # Pixels in [0, 1] go to [-1, 1]; latents (False) pass through unscaled.

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    video = np.asarray(element['video'], np.float32)
    n = video.shape[0]
    ext = flowception.sample_extended_time(
        rng, n, kappa=flowception.get_kappa(self.kappa), num_start_frames=self.num_start_frames,
        tau_distribution=self.tau_distribution)
    visible = ext.visible
    size = bucket_for(int(visible.sum()), self.buckets)
    index = flowception.compact(visible, size)
    real = np.arange(size) < visible.sum()

    def gather(values, fill=0):
      picked = values[index]
      return np.where(real.reshape((size,) + (1,) * (picked.ndim - 1)), picked, fill)

    context = np.zeros(n, bool)
    return {
        'frames': gather(video * 2.0 - 1.0 if self.pixels else video).astype(np.float32),
        'frame_times': gather(ext.times).astype(np.float32),
        'positions': np.arange(size, dtype=np.int32),
        'frame_mask': real,
        'flow_mask': gather(ext.in_flow & ~context, False),
        'rate_mask': real.copy(),
        'insert_targets': gather(flowception.insertion_targets(visible)).astype(np.int32),
        'context_mask': gather(context, False),
        'label': np.int32(element['label']),
        'length': np.int32(n),
    }


class _BucketBatchIterator(grain.DatasetIterator):
  """Buffers examples per bucket size and emits a batch whenever one bucket is full.

  The state is the parent's position plus the record indices waiting in each bucket; on restore the
  waiting examples are recomputed from the (deterministic) map dataset, so resumption is exact.
  """

  def __init__(self, parent, records: grain.MapDataset, batch_size: int):
    super().__init__(parent)
    self._records = records
    self._batch_size = batch_size
    self._pending: dict[int, list[tuple[int, dict]]] = {}

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      index, example = next(self._parent)
      waiting = self._pending.setdefault(example['frames'].shape[0], [])
      waiting.append((index, example))
      if len(waiting) == self._batch_size:
        del self._pending[example['frames'].shape[0]]
        return jax.tree.map(lambda *xs: np.stack(xs), *[e for _, e in waiting])

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(),
            'pending': {str(size): [i for i, _ in waiting] for size, waiting in self._pending.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._pending = {int(size): [(i, self._records[i][1]) for i in indices]
                     for size, indices in state['pending'].items() if indices}


class BucketBatchIterDataset(grain.IterDataset):
  """Batches `(record_index, example)` pairs of `records` by the example's frame-axis size."""

  def __init__(self, records: grain.MapDataset, batch_size: int,
               read_options: grain.ReadOptions | None = None):
    super().__init__(records.to_iter_dataset(read_options))
    self._records = records
    self._batch_size = batch_size

  def __iter__(self) -> _BucketBatchIterator:
    return _BucketBatchIterator(self._parent.__iter__(), self._records, self._batch_size)


def _with_index(index: int, example: dict) -> tuple[int, dict]:
  return index, example


def make_train_dataset(source, data_config, flow_config, *, batch_size: int, seed: int,
                       max_frames: int, pixels: bool = True) -> grain.IterDataset:
  """The training pipeline over `source` for this process's share of the data.

  `batch_size` is per process. Shuffling and the extended-time draws are seeded by `seed` and the
  record index, so the stream is a pure function of the seed and the position in it. A
  `datasets.RandomClipSource` is read through `random_map`, so each draw of a video cuts a new
  clip; records it skips as unreadable (None) are dropped. `pixels` is `SourceInfo.pixels`.
  """
  buckets = check_buckets(data_config.buckets, max_frames)
  transform = ExtendedTimeTransform(
      kappa=flow_config.kappa, num_start_frames=flow_config.num_start_frames,
      tau_distribution=flow_config.tau_distribution, buckets=buckets, pixels=pixels)
  clips = isinstance(source, datasets.RandomClipSource)
  records = (
      (grain.MapDataset.range(len(source)) if clips else grain.MapDataset.source(source))
      .seed(seed)
      [jax.process_index()::jax.process_count()]
      .shuffle()
      .repeat())
  if clips:
    records = records.random_map(source.read)
  records = records.random_map(transform).map_with_index(_with_index)
  read_options = grain.ReadOptions(num_threads=data_config.num_threads,
                                   prefetch_buffer_size=data_config.prefetch)
  return BucketBatchIterDataset(records, batch_size, read_options)
