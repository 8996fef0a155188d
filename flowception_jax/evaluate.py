"""Task metrics for generated videos; the coloring task has an exact rule to check samples against.

`COLORING_TOL` is the largest per-pixel error (in [0, 1] units, about 25 of 255 grey levels) at
which a sampled colour still counts as right. It forgives the integration error of a few-step
sampler, yet stays well below the 0.375 by which a wrong stride misses on the training data (see
`datasets.COLORING_MIN_CONTRAST`), so strides cannot be confused.
"""

from collections.abc import Sequence

import numpy as np

from flowception_jax import datasets

COLORING_TOL = 0.1


def length_histogram(lengths: Sequence[int] | np.ndarray) -> dict[int, float]:
  """Share of videos per length, keys in increasing order. `lengths`: int [B], B >= 1."""
  values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
  if not counts.size:
    raise ValueError('length_histogram needs at least one length')
  return {int(v): float(c) / counts.sum() for v, c in zip(values, counts)}


def _length_tv(histogram: dict[int, float], support: Sequence[int]) -> float:
  """Total variation distance between `histogram` and the uniform distribution on `support`."""
  target = {length: 1.0 / len(support) for length in support}
  keys = set(histogram) | set(target)
  return 0.5 * sum(abs(histogram.get(k, 0.0) - target.get(k, 0.0)) for k in keys)


def _rule_accuracy(videos: np.ndarray, lengths: np.ndarray, tol: float) -> float:
  """Share of consecutive frame pairs that follow `rotate_ring` with one best stride per video."""
  prev, nxt = videos[:, :-1], videos[:, 1:]
  pair_mask = np.arange(videos.shape[1] - 1)[None, :] < lengths[:, None] - 1  # [B, N-1]
  fits = np.stack([
      np.abs(datasets.rotate_ring(prev, s) - nxt).max(axis=(-3, -2, -1)) <= tol
      for s in datasets.COLORING_STRIDES])  # [S, B, N-1]
  best = (fits & pair_mask).sum(axis=-1).max(axis=0)  # [B]
  total = pair_mask.sum()
  return float(best.sum() / total) if total else 0.0


def _palette_ok(frames: np.ndarray, tol: float) -> np.ndarray:
  """Which frames [M, 3, 3, 3] hold a coloring palette: bool [M].

  A frame passes if, for some ring offset, the 8 ring colours in clockwise order followed by the
  centre lie within `tol` of 9 evenly spaced points on a line (least-squares fit), and the line's
  end points are at least the data's minimum contrast apart (less `tol`), so a frame collapsed to
  a single colour fails.
  """
  rows, cols = np.array(datasets.COLORING_RING).T
  ring = frames[:, rows, cols]  # [M, 8, 3]
  centre = frames[:, datasets.COLORING_CENTRE[0], datasets.COLORING_CENTRE[1]]  # [M, 3]
  order = (np.arange(8)[None, :] + np.arange(8)[:, None]) % 8  # [offsets, 8]
  palettes = np.concatenate(
      [ring[:, order], np.broadcast_to(centre[:, None, None], (len(frames), 8, 1, 3))],
      axis=2)  # [M, offsets, 9, 3]
  steps = np.arange(9) - 4.0
  slope = np.einsum('j,mojc->moc', steps, palettes) / np.sum(steps**2)
  fitted = palettes.mean(axis=2, keepdims=True) + steps[:, None] * slope[:, :, None]
  on_line = np.abs(palettes - fitted).max(axis=(2, 3)) <= tol
  spread = np.abs(8 * slope).max(axis=-1) >= datasets.COLORING_MIN_CONTRAST - tol
  return (on_line & spread).any(axis=1)


def coloring_metrics(videos: np.ndarray, lengths: np.ndarray,
                     tol: float = COLORING_TOL) -> dict[str, float]:
  """Scores coloring samples against the task's rules.

  Args:
    videos: float [B, N_max, 3, 3, 3] in [0, 1]; slots at or past a video's length are ignored.
    lengths: int [B] frames per video.
    tol: largest per-pixel error that still counts as right.

  Returns:
    length_tv: total variation distance between the length histogram and uniform over
      `COLORING_LENGTHS` (lengths off that set count as mass off its support); 0 is perfect.
    valid_length_share: share of videos whose length is in `COLORING_LENGTHS`.
    mean_length: mean length.
    rule_accuracy: share of consecutive frame pairs (within lengths) that follow `rotate_ring` with
      the single stride per video that fits most of its pairs (0 if no video has two frames). It is
      blind to frames collapsed to one colour, which `palette_accuracy` catches.
    palette_accuracy: share of frames (within lengths) whose colours form a coloring palette.
  """
  videos = np.asarray(videos, np.float32)
  lengths = np.asarray(lengths, np.int64)
  if videos.ndim != 5 or videos.shape[2:] != (3, 3, 3) or lengths.shape != videos.shape[:1]:
    raise ValueError(f'expected videos [B, N, 3, 3, 3] and lengths [B], got {videos.shape} and '
                     f'{lengths.shape}')
  if not lengths.size:
    raise ValueError('coloring_metrics needs at least one video')
  histogram = length_histogram(lengths)
  alive = np.minimum(lengths, videos.shape[1])
  frame_mask = np.arange(videos.shape[1])[None, :] < alive[:, None]
  frames = videos[frame_mask]
  return {
      'length_tv': float(_length_tv(histogram, datasets.COLORING_LENGTHS)),
      'valid_length_share': float(np.isin(lengths, datasets.COLORING_LENGTHS).mean()),
      'mean_length': float(lengths.mean()),
      'rule_accuracy': _rule_accuracy(videos, alive, tol),
      'palette_accuracy': float(_palette_ok(frames, tol).mean()) if len(frames) else 0.0,
  }


# Datasets with a rule that samples can be scored against, and their metric.
_TASK_METRICS = {'coloring': coloring_metrics}


def task_metrics(dataset: str, videos: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
  """The task metrics of `dataset` for videos [B, N, H, W, C] in [0, 1]; {} if it has none."""
  metric = _TASK_METRICS.get(dataset)
  return metric(videos, lengths) if metric else {}
