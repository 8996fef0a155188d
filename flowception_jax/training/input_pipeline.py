"""Grain input pipeline: extended-time samples, compacted, then packed into rows or batched per bucket.

Each example is a video `[N, H, W, C]` from a source in `datasets/`. `ExtendedTimeTransform` draws its
start frames, delays and global time, keeps the visible frames in order (left-aligned) and pads the
frame axis to the smallest configured bucket that holds them. Then either (`data.packing`):
- packed rows: the visible frames of several clips share a row of `data.pack_frames` slots, each
  clip its own segment (Grain's first-fit packing). One compiled shape, and every batch mixes clips
  of every phase of the process; attention stays within a clip (`train.frame_attention_of`).
- bucketed batches: `BucketBatchIterDataset` forms batches of examples that share a bucket, so
  every bucket size compiles once; a batch's clips are all in a similar phase.
Either way the model only computes on visible frames plus a little padding.

A batch is a dict of NumPy arrays, `F` the bucket size or the packed row's slots:
  frames:         float32 [B, F, H, W, C] clean visible frames in [-1, 1] (latents as the source
                  gives them), zeros in padding.
  frame_times:    float32 [B, F] per-frame flow time `clip(tau_i, 0, 1)`, 0 in padding.
  positions:      int32   [B, F] slot index in the compacted sequence (autoregressive: frame index).
  frame_mask:     bool    [B, F] real (visible) frames.
  flow_mask:      bool    [B, F] frames in flow (`0 <= tau_i < 1`), not context: the velocity loss.
  rate_mask:      bool    [B, F] frames that may insert (not passive, not padding): the rate loss.
  insert_targets: int32   [B, F] invisible frames between a frame and the next visible one.
  context_mask:   bool    [B, F] clean conditioning frames at t = 1 (patterns: `context.py`).
  segment_ids:    int32   [B, F] the clip of each slot (1, 2, ... within a row; 0 for padding).
  label:          int32   [B] class label (0 for unlabelled sources); [B, F] per slot if packed.
  length:         int32   [B] the full clip's number of frames; [B, F] per slot if packed.
Positions (and so rotary slot indices and insertion gaps) restart at 0 in every clip.
Noise is not drawn here: the train step draws it from a key folded with the step.

The baselines (`config.method`) fill the same keys with their own examples: `FullSequenceTransform`
(every frame visible and in flow at one shared time), `AutoregressiveTransform` (teacher forcing:
clean frames followed by a noisy copy of each, `2 F` slots) and `NoncausalAutoregressiveTransform`
(a clean prefix and the one noisy frame after it).
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from flowception_jax.core import baselines
from flowception_jax.core import context as context_lib
from flowception_jax.core import flowception
from flowception_jax import datasets
from flowception_jax.training import input_shards


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
  tau_loc: float = 0.0
  tau_scale: float = 1.0
  pixels: bool = True  # Pixels in [0, 1] go to [-1, 1]; latents (False) pass through unscaled.
  context: context_lib.ContextPatterns = context_lib.ContextPatterns()

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    video = np.asarray(element['video'], np.float32)
    n = video.shape[0]
    context, passive = self.context.draw(rng, n)
    ext = flowception.sample_extended_time(
        rng, n, kappa=flowception.get_kappa(self.kappa), num_start_frames=self.num_start_frames,
        tau_distribution=self.tau_distribution, tau_loc=self.tau_loc, tau_scale=self.tau_scale,
        context=context, passive=passive)
    visible = ext.visible
    size = bucket_for(int(visible.sum()), self.buckets)
    index = flowception.compact(visible, size)
    real = np.arange(size) < visible.sum()

    def gather(values, fill=0):
      picked = values[index]
      return np.where(real.reshape((size,) + (1,) * (picked.ndim - 1)), picked, fill)

    return {
        'frames': gather(_model_space(video, self.pixels)).astype(np.float32),
        'frame_times': gather(ext.times).astype(np.float32),
        'positions': np.arange(size, dtype=np.int32),
        'frame_mask': real,
        'flow_mask': gather(ext.in_flow & ~context, False),
        'rate_mask': gather(~passive, False),
        'insert_targets': gather(flowception.insertion_targets(visible)).astype(np.int32),
        'context_mask': gather(context, False),
        'segment_ids': real.astype(np.int32),
        'label': np.int32(element['label']),
        'length': np.int32(n),
    }


def _model_space(video: np.ndarray, pixels: bool) -> np.ndarray:
  """Pixels in [0, 1] to [-1, 1]; latents (`pixels` False) pass through unscaled."""
  return video * 2.0 - 1.0 if pixels else video


def _pad(values: np.ndarray, size: int) -> np.ndarray:
  """values [N, ...] zero-padded along the first axis to [size, ...]."""
  return np.pad(values, [(0, size - values.shape[0])] + [(0, 0)] * (values.ndim - 1))


@dataclasses.dataclass(frozen=True)
class _WholeClipTransform(grain.transforms.RandomMap):
  """What the baselines' transforms share: every frame of the clip, times drawn like the global
  ratio of extended time (`flow.tau_distribution`, `tau_loc`, `tau_scale`)."""
  tau_distribution: str
  buckets: tuple[int, ...]
  tau_loc: float = 0.0
  tau_scale: float = 1.0
  pixels: bool = True

  def _clip(self, element: dict[str, Any],
            shown: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(frames [F, H, W, C] in model space, the first `shown` (default: all) of the clip's N
    frames zero-padded to their bucket F, N, real bool [F]: the first `shown` slots)."""
    video = np.asarray(element['video'], np.float32)
    n = video.shape[0]
    shown = n if shown is None else shown
    size = bucket_for(shown, self.buckets)
    return _pad(_model_space(video[:shown], self.pixels), size), n, np.arange(size) < shown

  def _times(self, rng: np.random.Generator, size: int | None = None):
    return flowception.sample_global_ratio(rng, self.tau_distribution, size=size,
                                           loc=self.tau_loc, scale=self.tau_scale)


@dataclasses.dataclass(frozen=True)
class FullSequenceTransform(_WholeClipTransform):
  """Turns a clip into a full-sequence example: every frame visible, in flow at one shared time.

  No frame may insert (`rate_mask` is empty): this baseline takes its lengths from the data's
  distribution. Given frames (`context`: the first-frame and prefix patterns) stay clean, at time
  1, in the context channel, and outside the loss, as the sampler treats them.
  """
  context: context_lib.ContextPatterns = context_lib.ContextPatterns()

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames, n, real = self._clip(element)
    size = real.shape[0]
    given = _pad(self.context.draw(rng, n)[0], size)
    return {
        'frames': frames,
        'frame_times': np.where(given, 1.0, np.where(real, self._times(rng), 0.0)
                                ).astype(np.float32),
        'positions': np.arange(size, dtype=np.int32),
        'frame_mask': real,
        'flow_mask': real & ~given,
        'rate_mask': np.zeros(size, bool),
        'insert_targets': np.zeros(size, np.int32),
        'context_mask': given,
        'segment_ids': real.astype(np.int32),
        'label': np.int32(element['label']),
        'length': np.int32(n),
    }


@dataclasses.dataclass(frozen=True)
class AutoregressiveTransform(_WholeClipTransform):
  """Turns a clip into a teacher-forcing example of `2 F` slots, `F` the clip's bucket.

  Slots `[0, F)` hold the clip clean (t = 1); slots `[F, 2F)` a noisy copy of every frame (the
  `flow_mask`), each at its own time. Both halves carry positions `0..F-1`. Under
  `model.causal_attention(positions, noisy=flow_mask)` the noisy copy of frame i sees the clean
  frames before it and itself, as when the sampler makes frame i, so one pass trains the denoising
  of every frame from its clean past. The clean frames decide where the video ends: `rate_mask`
  marks them and `insert_targets` counts the frames after each (0 on the last one).
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames, n, real = self._clip(element)
    size = real.shape[0]
    none = np.zeros(size, bool)
    noisy_times = self._times(rng, size)
    return {
        'frames': np.concatenate([frames, frames]),
        'frame_times': np.concatenate([real, np.where(real, noisy_times, 0.0)]).astype(np.float32),
        'positions': np.tile(np.arange(size, dtype=np.int32), 2),
        'frame_mask': np.concatenate([real, real]),
        'flow_mask': np.concatenate([none, real]),
        'rate_mask': np.concatenate([real, none]),
        'insert_targets': np.concatenate([np.where(real, n - 1 - np.arange(size), 0),
                                          np.zeros(size)]).astype(np.int32),
        'context_mask': np.concatenate([none, none]),
        'segment_ids': np.concatenate([real, real]).astype(np.int32),
        'label': np.int32(element['label']),
        'length': np.int32(n),
    }


@dataclasses.dataclass(frozen=True)
class NoncausalAutoregressiveTransform(_WholeClipTransform):
  """Turns a clip into an example of the non-causal autoregressive baseline: one frame to make.

  The frame to make, k, is uniform in 0..N: frames 0..k-1 clean (t = 1), frame k noisy at its own
  time (`flow_mask`), none after, padded to the bucket of the frames shown. Under
  `model.noncausal_attention(flow_mask)` this is the sequence of the sampler when it makes frame
  k. The last clean frame, k - 1, decides where the video ends (`rate_mask`, for k >= 1):
  `insert_targets` counts the frames after it, 0 when k = N (the whole clip is clean, no frame to
  make).
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = np.asarray(element['video']).shape[0]
    k = int(rng.integers(0, n + 1))
    frames, _, real = self._clip(element, min(k + 1, n))
    slots = np.arange(real.shape[0])
    made = (slots == k) & real
    return {
        'frames': frames,
        'frame_times': np.where(made, self._times(rng), (slots < k).astype(np.float32)
                                ).astype(np.float32),
        'positions': slots.astype(np.int32),
        'frame_mask': real,
        'flow_mask': made,
        'rate_mask': slots == k - 1,
        'insert_targets': np.where(slots == k - 1, n - k, 0).astype(np.int32),
        'context_mask': np.zeros(real.shape, bool),
        'segment_ids': real.astype(np.int32),
        'label': np.int32(element['label']),
        'length': np.int32(n),
    }


def make_transform(method: str, flow_config, buckets: tuple[int, ...], context_config=None,
                   pixels: bool = True) -> grain.transforms.RandomMap:
  """The per-example transform of `method` ('flowception' or a baseline, see `baselines.METHODS`).

  `context_config` (`config.context`, None for none) sets the context patterns of Flowception and
  of the full-sequence baseline (first frame and prefix only, `baselines.check_context_patterns`); the
  autoregressive baselines already train every frame from its clean past. `pixels` is
  `SourceInfo.pixels`.
  """
  times = dict(tau_distribution=flow_config.tau_distribution, buckets=buckets,
               tau_loc=flow_config.get('tau_loc', 0.0), tau_scale=flow_config.get('tau_scale', 1.0),
               pixels=pixels)
  context = (context_lib.ContextPatterns() if context_config is None
             else context_lib.from_config(context_config))
  if method == 'flowception':
    return ExtendedTimeTransform(kappa=flow_config.kappa,
                                 num_start_frames=flow_config.num_start_frames, context=context,
                                 **times)
  if method == 'full_sequence':
    return FullSequenceTransform(context=context, **times)
  if method == 'autoregressive':
    return AutoregressiveTransform(**times)
  if method == 'autoregressive_noncausal':
    return NoncausalAutoregressiveTransform(**times)
  raise ValueError(f'unknown method {method!r}; set --config.method to one of '
                   f'{", ".join(baselines.METHODS)}')


def slot_counts(method: str, buckets: tuple[int, ...]) -> tuple[int, ...]:
  """The frame-axis sizes of `method`'s examples, one per bucket (teacher forcing doubles them)."""
  return tuple((2 if method == 'autoregressive' else 1) * b for b in buckets)


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


def pack_size(data_config, method: str) -> int:
  """Slots of a packed row: `data.pack_frames`, or (0) the largest example of `method`."""
  largest = max(slot_counts(method, tuple(data_config.buckets)))
  size = data_config.get('pack_frames', 0) or largest
  if size < largest:
    raise ValueError(f'data.pack_frames={size} cannot hold the largest example ({largest} slots); '
                     f'set --config.data.pack_frames to at least {largest} (or 0)')
  return size


def max_slots(data_config, method: str) -> int:
  """The frame-axis size of `method`'s largest batch: the packed row, or the largest bucket."""
  if data_config.get('packing', False):
    return pack_size(data_config, method)
  return max(slot_counts(method, tuple(data_config.buckets)))


def _real_slots(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An example's real slots only, its label and length repeated per slot, for packing."""
  real = example['frame_mask']
  out = {k: v[real] for k, v in example.items() if k not in ('label', 'length', 'segment_ids')}
  for k in ('label', 'length'):
    out[k] = np.full(int(real.sum()), example[k], np.int32)
  return out


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain's packed row with the batch keys: its segment ids, and the mask of real slots."""
  out = {k: v for k, v in row.items() if not k.endswith(('_segment_ids', '_positions'))}
  out['segment_ids'] = row['frames_segment_ids'].astype(np.int32)
  out['frame_mask'] = out['segment_ids'] > 0
  return out


def _packed_batches(records: grain.MapDataset, data_config, *, batch_size: int, seed: int,
                    method: str, read_options: grain.ReadOptions) -> grain.IterDataset:
  """Batches of `batch_size` rows, each row the real slots of several examples packed first-fit."""
  size = pack_size(data_config, method)
  keys = ('frames', 'frame_times', 'positions', 'frame_mask', 'flow_mask', 'rate_mask',
          'insert_targets', 'context_mask', 'label', 'length')
  rows = grain.experimental.FirstFitPackIterDataset(
      records.map(_real_slots).to_iter_dataset(read_options),
      length_struct={k: size for k in keys}, num_packing_bins=batch_size, seed=seed)
  return rows.map(_packed_row).batch(batch_size, drop_remainder=True)


def make_train_dataset(source, data_config, flow_config, *, batch_size: int, seed: int,
                       max_frames: int, method: str = 'flowception',
                       shard: tuple[int, int] | None = None,
                       context_config=None, pixels: bool = True) -> grain.IterDataset:
  """The training pipeline over `source` for one data shard.

  Shuffling and the extended-time draws are seeded by `seed` and the position in the global stream,
  so the stream is a pure function of the seed. `shard = (index, count)` (default: one shard per
  process, `sharding.data_shard` gives it for a mesh) reads block `index` of every `count` blocks
  of `batch_size` examples (`batch_size` is the shard's share of a global batch). Packed rows
  (`data.packing`) have one shape everywhere; otherwise one shard batches greedily by bucket, and
  several follow one bucket sequence so that all agree (`input_shards`).
  `method` chooses the examples (`make_transform`); `context_config` (`config.context`) sets the
  context patterns of Flowception examples, None trains without context; `pixels` is
  `SourceInfo.pixels`. A `datasets.RandomClipSource` is read through `random_map`, so each draw of
  a video cuts a new clip; records it skips as unreadable (None) are dropped.
  """
  index, count = (jax.process_index(), jax.process_count()) if shard is None else shard
  buckets = check_buckets(data_config.buckets, max_frames)
  transform = make_transform(method, flow_config, buckets, context_config, pixels)
  clips = isinstance(source, datasets.RandomClipSource)
  stream = (grain.MapDataset.range(len(source)) if clips else grain.MapDataset.source(source))
  stream = stream.seed(seed).shuffle().repeat()
  if clips:
    stream = stream.random_map(source.read)
  stream = stream.random_map(transform)
  records = input_shards.ShardBlocks(stream, batch_size, index, count) if count > 1 else stream
  read_options = grain.ReadOptions(num_threads=data_config.num_threads,
                                   prefetch_buffer_size=data_config.prefetch)
  if data_config.get('packing', False):
    return _packed_batches(records, data_config, batch_size=batch_size, seed=seed + index,
                           method=method, read_options=read_options)
  records = records.map_with_index(_with_index)
  if count == 1:
    return BucketBatchIterDataset(records, batch_size, read_options)
  sizes = slot_counts(method, buckets)
  schedule = input_shards.BucketSchedule.estimate(
      stream, sizes, largest=sizes[buckets.index(bucket_for(max_frames, buckets))], seed=seed)
  return input_shards.ScheduledBatchIterDataset(records, batch_size, schedule, read_options)
