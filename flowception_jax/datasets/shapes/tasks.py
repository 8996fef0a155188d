"""Exact metrics of the tasks on `shapes`: does a video continue, or connect, its given frames.

A shape moves at constant velocity, so the frames given to a task fix what must follow them.
  continuation (image-to-video, extension): the video is compared with the clip its given frames
    were cut from, at the same slots after the given ones: where the shape is (`position_error`,
    pixels), how fast it moves (`velocity_error`, pixels per frame), whether background and shape
    keep their colours (`colour_error`, L-inf in [0, 1] units) and when the clip ends
    (`length_error`, frames); a perfect continuation scores 0 on all four. `tracked` says whether
    the video shows a shape at all (the other scores but the length need one).
  interpolation: the shape moves at constant velocity through the whole video, key frames included
    (`motion_residual`, pixels), the key frames stay first, in order and last (`keys_in_place`), and
    each gap between key frames holds as many frames as the clip had there (`gap_error`, frames).
Shapes are tracked with `tracker.py` (fitted box centres, exact even where a shape is cut by the
frame border); contexts for these scores come from clips of one shape. Scores are per video (NaN
where undefined, e.g. when a video shows its shape in fewer frames than a fit needs), so callers can
report their spread (`summarize`).
"""

import numpy as np

from flowception_jax.datasets.shapes import tracker


def _track(video: np.ndarray) -> tracker.Tracks | None:
  """The tracks of one video's single shape, None if it shows no shape."""
  tracks = tracker.track(video, max_shapes=1)
  return tracks if len(tracks.colours) else None


def _path(tracks: tracker.Tracks | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """The shape's constant-velocity path: the frames [T] where it is seen, its box centre (x, y) at
  frame 0 and its velocity per frame; None without tracks or with fewer than 2 such frames."""
  seen = np.flatnonzero(tracks.present[:, 0]) if tracks else np.zeros(0)
  if seen.size < 2:
    return None
  return (seen, *tracker.fit_line(tracks, 0))


def continuation_scores(videos: np.ndarray, lengths: np.ndarray, reference: np.ndarray,
                        reference_lengths: np.ndarray, num_context: int) -> dict[str, np.ndarray]:
  """Per-video continuation scores, float [B] each (NaN where undefined).

  Args:
    videos: float [B, N, H, W, C] in [0, 1], generated from the first `num_context` frames of
      `reference` (or, for a baseline, without them).
    lengths: int [B].
    reference: float [B, L, H, W, C] in [0, 1], the clips the given frames were cut from.
    reference_lengths: int [B].
    num_context: K, the given frames, at slots 0..K-1; the scores look at slots from K on.
  """
  scores = {name: np.full(len(videos), np.nan) for name in
            ('tracked', 'position_error', 'velocity_error', 'colour_error', 'length_error')}
  for b, (video, length, clip, clip_length) in enumerate(
      zip(videos, lengths, reference, reference_lengths)):
    scores['length_error'][b] = abs(int(length) - int(clip_length))
    made, true = _track(video[:length]), _track(clip[:clip_length])
    scores['tracked'][b] = float(made is not None)
    if made is None or true is None:
      continue
    slots = np.arange(num_context, min(length, clip_length))
    both = slots[made.present[slots, 0] & true.present[slots, 0]]
    if both.size:
      scores['position_error'][b] = np.mean(
          np.linalg.norm(made.centres[both, 0] - true.centres[both, 0], axis=-1))
    made_path, true_path = _path(made), _path(true)
    if made_path and true_path:
      scores['velocity_error'][b] = np.linalg.norm(made_path[2] - true_path[2])
    scores['colour_error'][b] = max(
        np.abs(np.median(made.background, axis=0) - np.median(true.background, axis=0)).max(),
        np.abs(made.colours[0] - true.colours[0]).max())
  return scores


def interpolation_scores(videos: np.ndarray, lengths: np.ndarray, context_slots: np.ndarray,
                         key_indices: np.ndarray) -> dict[str, np.ndarray]:
  """Per-video interpolation scores, float [B] each (NaN where undefined).

  Args:
    videos: float [B, N, H, W, C] in [0, 1].
    lengths: int [B].
    context_slots: int [B, K], where each key frame ended up in each video.
    key_indices: int [B, K], the frame index of each key frame in its clip.
  """
  scores = {name: np.full(len(videos), np.nan) for name in
            ('motion_residual', 'keys_in_place', 'gap_error', 'frames_between')}
  for b, (video, length, slots, keys) in enumerate(zip(videos, lengths, context_slots,
                                                       key_indices)):
    tracks = _track(video[:length])
    path = _path(tracks)
    if path and path[0].size >= 3:  # Two points always lie on a line.
      seen, start, velocity = path
      off_path = tracks.centres[seen, 0] - (start + seen[:, None] * velocity)
      scores['motion_residual'][b] = np.sqrt(np.mean(np.sum(off_path**2, axis=-1)))
    scores['keys_in_place'][b] = float(slots[0] == 0 and slots[-1] == length - 1
                                       and np.all(np.diff(slots) > 0))
    scores['gap_error'][b] = np.mean(np.abs(np.diff(slots) - np.diff(keys)))
    scores['frames_between'][b] = int(length) - len(slots)
  return scores


def summarize(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean, standard error and count of each score over the videos where it is defined."""
  summary = {}
  for name, values in scores.items():
    values = values[np.isfinite(values)]
    summary[name] = float(values.mean()) if values.size else float('nan')
    summary[f'{name}_se'] = (float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1
                             else float('nan'))
    summary[f'{name}_count'] = int(values.size)
  return summary
