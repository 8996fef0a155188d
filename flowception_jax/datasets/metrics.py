"""Metrics shared by every data set: the distribution of generated lengths against the data's."""

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


def length_statistics(lengths: Sequence[int] | np.ndarray,
                      data_lengths: Sequence[int] | np.ndarray) -> dict:
  """Generated lengths int [B] against the data's int [M]: moments, histograms, total variation.

  Returns `mean_length`, `std_length`, `min_length`, `max_length`, `data_mean_length`,
  `data_length_tv` (total variation between the two length histograms; 0 is a perfect match),
  `length_histogram` and `data_length_histogram` ({length: share}).
  """
  lengths = np.asarray(lengths, np.int64)
  data_lengths = np.asarray(data_lengths, np.int64)
  histogram, data_histogram = length_histogram(lengths), length_histogram(data_lengths)
  return {
      'mean_length': float(lengths.mean()),
      'std_length': float(lengths.std()),
      'min_length': int(lengths.min()),
      'max_length': int(lengths.max()),
      'data_mean_length': float(data_lengths.mean()),
      'data_length_tv': total_variation(histogram, data_histogram),
      'length_histogram': histogram,
      'data_length_histogram': data_histogram,
  }
