"""One global example stream read by several data shards (processes) that agree without talking.

The training stream is a pure function of the seed: example `j` of the shuffled, repeated,
extended-time stream. With `count` shards of `batch_size` examples each, shard `index` reads blocks
`index, index + count, ...` of `batch_size` consecutive examples (`ShardBlocks`), so that, where
batches are formed in stream order, the global batch of a step does not depend on how many
processes load it.

Every process must also run the same program at every step, i.e. pad its batch to the same frame
bucket. Greedy bucketing (emit whichever bucket fills first,
`input_pipeline.BucketBatchIterDataset`) would let shards disagree, and settling that each step
would cost a host round trip that also stalls asynchronous dispatch. Instead all shards follow one
`BucketSchedule`: the bucket of step `s` is a pure function of the seed and `s`, drawn with the
bucket frequencies of the data (estimated from the same leading examples of the global stream on
every shard, so every shard computes the same estimate) plus a margin towards larger buckets. A step
of bucket `b` takes the waiting examples that fit in `b`, largest first, and pads them to `b`;
examples of larger buckets wait for a step that fits them. The margin makes every queue drain faster
than it fills, so the waiting examples stay few. The price is some padding (about the margin) in
multi-shard runs only. """

import math
import sys
from typing import Any

import grain
import jax
import numpy as np

# Golden-ratio (Weyl) sequence: consecutive steps spread evenly over [0, 1), so each bucket's share
# of any window of steps stays within a few steps of its target, unlike independent draws.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
ESTIMATE_EXAMPLES = 256  # Leading examples of the global stream that estimate bucket frequencies.
_MARGIN = 0.1  # Relative excess of steps at or above each bucket over the data's need.


class ShardBlocks(grain.MapDataset):
  """Blocks `index, index + count, ...` of `block` consecutive elements of a (repeated) parent."""

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    if not 0 <= index < count:
      raise ValueError(f'data shard {index} out of range for {count} shards')
    self._block, self._index, self._count = block, index, count

  def __len__(self) -> int:
    parent = len(self._parent)
    if parent >= sys.maxsize // 2:  # Repeated forever.
      return parent
    return parent // (self._block * self._count) * self._block

  def __getitem__(self, position):
    if isinstance(position, slice):
      return self.slice(position)
    blocks, offset = divmod(position, self._block)
    return self._parent[(blocks * self._count + self._index) * self._block + offset]


class BucketSchedule:
  """The frame bucket of every training step, the same in every process.

  `shares[k]` is the estimated fraction of examples whose own bucket is `buckets[k]` (sorted). The
  share of steps at bucket `buckets[k]` or larger is that of the examples plus a margin (an upper
  confidence bound over `num_estimated` examples, plus 10% and 1 percentage point), so larger
  examples never pile up, even in a bucket the estimate did not see; buckets above `largest` (the
  bucket of the longest clip) get no steps.
  """

  def __init__(self, buckets, shares, *, largest: int, seed: int, num_estimated: int):
    self.buckets = tuple(int(b) for b in buckets)
    shares = np.asarray(shares, np.float64)
    tails = np.cumsum(shares[::-1])[::-1]  # Fraction of examples needing bucket k or larger.
    bound = tails + 3.0 * np.sqrt(tails * (1.0 - tails) / num_estimated)
    served = np.minimum(1.0, (1.0 + _MARGIN) * bound + 0.01)
    served = np.where(np.asarray(self.buckets) <= largest, served, 0.0)
    served[0] = 1.0
    served = np.minimum.accumulate(served)
    self.step_shares = served - np.append(served[1:], 0.0)
    self._edges = np.cumsum(self.step_shares)
    self._offset = np.random.default_rng([seed, 0x5C4ED]).uniform()

  @classmethod
  def estimate(cls, records: grain.MapDataset, buckets, *, largest: int, seed: int,
               num_examples: int = ESTIMATE_EXAMPLES) -> 'BucketSchedule':
    """The schedule of the bucket frequencies among the first examples of `records` (the stream).

    `buckets` are the frame-axis sizes examples come in, `largest` that of the longest clip.
    """
    buckets = tuple(sorted(buckets))
    sizes = [records[j]['frame_mask'].shape[0] for j in range(num_examples)]
    shares = [sizes.count(b) / num_examples for b in buckets]
    return cls(buckets, shares, largest=largest, seed=seed, num_estimated=num_examples)

  def bucket(self, step: int) -> int:
    """The bucket size of the `step`-th batch (counting from 0)."""
    u = (self._offset + step * _GOLDEN) % 1.0
    return self.buckets[min(int(np.searchsorted(self._edges, u, side='right')),
                            len(self.buckets) - 1)]


def pad_example(example: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads the frame axis (the leading axis of per-frame arrays) of one example to `size` slots.

  Padded slots are zeros (masks False); positions are padded like the rest, not renumbered, since
  teacher-forcing examples repeat them.
  """
  frames = example['frame_mask'].shape[0]
  if frames == size:
    return example
  return {k: np.pad(v, [(0, size - frames)] + [(0, 0)] * (v.ndim - 1))
          if v.ndim and v.shape[0] == frames else v for k, v in example.items()}


class _ScheduledBatchIterator(grain.DatasetIterator):
  """Emits the batch of each step in the schedule's bucket from the examples waiting per bucket.

  The state is the parent's position, the step and the record indices waiting per bucket; waiting
  examples are recomputed from the (deterministic) records on restore, so resumption is exact.
  """

  def __init__(self, parent, records: grain.MapDataset, batch_size: int, schedule: BucketSchedule):
    super().__init__(parent)
    self._records = records
    self._batch_size = batch_size
    self._schedule = schedule
    self._step = 0
    self._waiting: dict[int, list[tuple[int, dict]]] = {b: [] for b in schedule.buckets}

  def __next__(self) -> dict[str, np.ndarray]:
    size = self._schedule.bucket(self._step)
    fitting = [b for b in self._waiting if b <= size]
    while sum(len(self._waiting[b]) for b in fitting) < self._batch_size:
      index, example = next(self._parent)
      self._waiting[example['frame_mask'].shape[0]].append((index, example))
    batch = []
    for b in sorted(fitting, reverse=True):  # Largest first: they have the fewest chances.
      take = self._waiting[b][:self._batch_size - len(batch)]
      del self._waiting[b][:len(take)]
      batch += [pad_example(e, size) for _, e in take]
    self._step += 1
    return jax.tree.map(lambda *xs: np.stack(xs), *batch)

  def waiting(self) -> dict[int, int]:
    """How many examples wait in each bucket."""
    return {b: len(w) for b, w in self._waiting.items()}

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'step': self._step,
            'waiting': {str(b): [i for i, _ in w] for b, w in self._waiting.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._step = state['step']
    self._waiting = {b: [] for b in self._schedule.buckets}
    for b, indices in state['waiting'].items():
      self._waiting[int(b)] = [(i, self._records[i][1]) for i in indices]


class ScheduledBatchIterDataset(grain.IterDataset):
  """Batches `(record_index, example)` pairs of `records` in the buckets of `schedule`."""

  def __init__(self, records: grain.MapDataset, batch_size: int, schedule: BucketSchedule,
               read_options: grain.ReadOptions | None = None):
    super().__init__(records.to_iter_dataset(read_options))
    self._records = records
    self._batch_size = batch_size
    self._schedule = schedule

  def __iter__(self) -> _ScheduledBatchIterator:
    return _ScheduledBatchIterator(self._parent.__iter__(), self._records, self._batch_size,
                                   self._schedule)
