"""Metrics shared by every data set: the distribution of generated lengths."""

from collections.abc import Mapping, Sequence

import numpy as np


def length_histogram(lengths: Sequence[int] | np.ndarray) -> dict[int, float]:
  """Share of videos per length, keys in increasing order. `lengths`: int [B], B >= 1."""
  values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
  if not counts.size:
    raise ValueError('length_histogram needs at least one length')
  return {int(v): float(c) / counts.sum() for v, c in zip(values, counts)}


def total_variation(p: Mapping[int, float], q: Mapping[int, float]) -> float:
  """Total variation distance between two histograms (missing keys have mass 0)."""
  return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def uniform_histogram(support: Sequence[int]) -> dict[int, float]:
  """The uniform distribution on `support` as a histogram."""
  return {int(k): 1.0 / len(support) for k in support}
