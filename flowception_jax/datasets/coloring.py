"""The coloring toy set: 3x3 frames whose ring of colours rotates by a per-clip stride.

Every sample can be scored exactly against the rule (`metrics`). `TOL` is the largest per-pixel error
(in [0, 1] units, about 25 of 255 grey levels) at which a sampled colour still counts as right: it
forgives the integration error of a few-step sampler, yet stays well below the 0.375 by which a wrong
stride misses (see `MIN_CONTRAST`), so strides cannot be confused.
"""

import dataclasses

import numpy as np

from flowception_jax.datasets import base
from flowception_jax.datasets import metrics as metrics_lib

# The 8 boundary pixels of a 3x3 frame, clockwise from the top-left corner.
RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))
CENTRE = (1, 1)
LENGTHS = (15, 20, 25, 30)
STRIDES = (1, 2, 3)
# Smallest L-inf distance between the palette's end colours. It keeps the stride identifiable: a
# wrong stride (off by 1 or 2 ring steps) misplaces the palette's wrap point by at least 6/8 of the
# end-colour distance, so by at least 0.375 in some pixel.
MIN_CONTRAST = 0.5

TOL = 0.1


def rotate_ring(frame: np.ndarray, stride: int) -> np.ndarray:
  """Moves every ring colour `stride` steps clockwise; the centre is unchanged.

  Args:
    frame: [..., 3, 3, C] one or more 3x3 frames.
    stride: ring steps (any integer; negative rotates anticlockwise).

  Returns:
    [..., 3, 3, C] frames where ring position `k` holds the colour of position `k - stride`.
  """
  rows, cols = np.array(RING).T
  out = np.array(frame, copy=True)
  out[..., rows, cols, :] = np.roll(frame[..., rows, cols, :], stride, axis=-2)
  return out


@dataclasses.dataclass(frozen=True)
class ColoringSource:
  """3x3 clips whose 9-colour palette sits on a line and whose ring rotates by a per-clip stride.

  Palette entry `j` is `c0 + (c1 - c0) * j / 8`; entry 8 is the centre and entries 0-7 lie on the
  ring in clockwise order from a random offset. Each frame is `rotate_ring(previous, stride)` with
  the stride drawn from `STRIDES`; the length is uniform over `LENGTHS`.
  """
  seed: int
  num_records: int

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = base.record_rng(self.seed, index, self.num_records)
    length = int(rng.choice(LENGTHS))
    stride = int(rng.choice(STRIDES))
    offset = int(rng.integers(len(RING)))
    c0, c1 = rng.uniform(size=(2, 3))
    while np.abs(c1 - c0).max() < MIN_CONTRAST:
      c0, c1 = rng.uniform(size=(2, 3))
    palette = c0 + (c1 - c0) * np.arange(9)[:, None] / 8  # [9, 3]
    # Ring position k of frame t holds entry (k - offset - stride * t) mod 8.
    entries = (np.arange(8)[None, :] - offset - stride * np.arange(length)[:, None]) % 8
    video = np.empty((length, 3, 3, 3), np.float32)
    rows, cols = np.array(RING).T
    video[:, rows, cols] = palette[entries]
    video[:, CENTRE[0], CENTRE[1]] = palette[8]
    return {'video': video, 'label': np.int32(0)}


def _rule_accuracy(videos: np.ndarray, lengths: np.ndarray, tol: float) -> float:
  """Share of consecutive frame pairs that follow `rotate_ring` with one best stride per video."""
  prev, nxt = videos[:, :-1], videos[:, 1:]
  pair_mask = np.arange(videos.shape[1] - 1)[None, :] < lengths[:, None] - 1  # [B, N-1]
  fits = np.stack([
      np.abs(rotate_ring(prev, s) - nxt).max(axis=(-3, -2, -1)) <= tol
      for s in STRIDES])  # [S, B, N-1]
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
  rows, cols = np.array(RING).T
  ring = frames[:, rows, cols]  # [M, 8, 3]
  centre = frames[:, CENTRE[0], CENTRE[1]]  # [M, 3]
  order = (np.arange(8)[None, :] + np.arange(8)[:, None]) % 8  # [offsets, 8]
  palettes = np.concatenate(
      [ring[:, order], np.broadcast_to(centre[:, None, None], (len(frames), 8, 1, 3))],
      axis=2)  # [M, offsets, 9, 3]
  steps = np.arange(9) - 4.0
  slope = np.einsum('j,mojc->moc', steps, palettes) / np.sum(steps**2)
  fitted = palettes.mean(axis=2, keepdims=True) + steps[:, None] * slope[:, :, None]
  on_line = np.abs(palettes - fitted).max(axis=(2, 3)) <= tol
  spread = np.abs(8 * slope).max(axis=-1) >= MIN_CONTRAST - tol
  return (on_line & spread).any(axis=1)


def metrics(videos: np.ndarray, lengths: np.ndarray, tol: float = TOL) -> dict[str, float]:
  """Scores coloring samples against the task's rules.

  Args:
    videos: float [B, N_max, 3, 3, 3] in [0, 1]; slots at or past a video's length are ignored.
    lengths: int [B] frames per video.
    tol: largest per-pixel error that still counts as right.

  Returns:
    length_tv: total variation distance between the length histogram and uniform over
      `LENGTHS` (lengths off that set count as mass off its support); 0 is perfect.
    valid_length_share: share of videos whose length is in `LENGTHS`.
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
    raise ValueError('coloring metrics need at least one video')
  histogram = metrics_lib.length_histogram(lengths)
  alive = np.minimum(lengths, videos.shape[1])
  frame_mask = np.arange(videos.shape[1])[None, :] < alive[:, None]
  frames = videos[frame_mask]
  return {
      'length_tv': metrics_lib.total_variation(histogram, metrics_lib.uniform_histogram(LENGTHS)),
      'valid_length_share': float(np.isin(lengths, LENGTHS).mean()),
      'mean_length': float(lengths.mean()),
      'rule_accuracy': _rule_accuracy(videos, alive, tol),
      'palette_accuracy': float(_palette_ok(frames, tol).mean()) if len(frames) else 0.0,
  }


def make(data_config) -> tuple[ColoringSource, base.SourceInfo]:
  """The coloring source of `config.data` and its facts."""
  max_frames = data_config.get('max_frames', max(LENGTHS))
  if max_frames < max(LENGTHS):
    raise ValueError(f'coloring clips have up to {max(LENGTHS)} frames but max_frames is '
                     f'{max_frames}; set --config.data.max_frames={max(LENGTHS)}')
  source = ColoringSource(seed=data_config.get('seed', 0),
                          num_records=base.num_records(data_config))
  return source, base.SourceInfo(frame_shape=(3, 3, 3), max_frames=max_frames, num_classes=0)
