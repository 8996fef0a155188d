"""Pictures of what the generative process did: generated lengths against the data's, and when and
where each frame of a sampled video was inserted and how its time rose to 1.

Every figure is an RGB image uint8 [H, W, 3] drawn on matplotlib's Agg canvas (no display, no
global pyplot state), ready for a PNG file (`video_io.write_png`), TensorBoard
(`writer.write_images`) or a notebook (`PIL.Image.fromarray`).
"""

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from flowception_jax.datasets import metrics

GENERATED_COLOUR = '#1f77b4'
DATA_COLOUR = '#c7c7c7'
_NOT_INSERTED_COLOUR = '#f2f2f2'
_DPI = 80


def _to_image(figure: Figure) -> np.ndarray:
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def length_histogram_image(lengths: np.ndarray, data_lengths: np.ndarray,
                           max_frames: int | None = None) -> np.ndarray:
  """Bars of the share of generated videos per length over the data's, with their TV distance.

  Args:
    lengths: int [B] generated lengths.
    data_lengths: int [M] lengths of data clips (`evaluators.data_reference`).
    max_frames: the last length on the axis (default: the longest of both).
  """
  generated = metrics.length_histogram(lengths)
  data = metrics.length_histogram(data_lengths)
  last = max_frames or max(max(generated), max(data))
  support = np.arange(1, last + 1)
  figure = Figure(figsize=(6, 2.6), dpi=_DPI, layout='constrained')
  axes = figure.add_subplot()
  axes.bar(support, [data.get(k, 0.0) for k in support], width=0.9, color=DATA_COLOUR,
           label=f'data ({len(data_lengths)} clips, mean {np.mean(data_lengths):.1f})')
  axes.bar(support, [generated.get(k, 0.0) for k in support], width=0.45, color=GENERATED_COLOUR,
           label=f'generated ({len(lengths)} videos, mean {np.mean(lengths):.1f})')
  axes.set_xlim(0.4, last + 0.6)
  axes.set_xlabel('length (frames)')
  axes.set_ylabel('share of videos')
  axes.set_title(f'Lengths: total variation {metrics.total_variation(generated, data):.2f} '
                 'from the data', fontsize=10)
  axes.legend(fontsize=8, frameon=False)
  return _to_image(figure)


def frame_time_history(insert_step: np.ndarray, length: int, num_steps: int,
                       num_iterations: int, context: np.ndarray | None = None) -> np.ndarray:
  """Flow time of each frame of one sampled video after every sampler iteration.

  The sampler derives times from step counts: a frame that takes part from iteration `s` on
  (`SampleOutput.insert_step`, 0 for the start frames) has time `min((m - s) / num_steps, 1)`
  after `m` iterations; context frames are clean (1) throughout. Frames keep their order, so the
  frames alive after `m` iterations are exactly the final frames with `s <= m`, in final order.

  Args:
    insert_step: int [N] one video's insert steps; its first `length` slots are its frames.
    length: the video's length.
    num_steps: the sampler's steps per unit time.
    num_iterations: iterations the sampler ran (`SampleOutput.num_iterations`).
    context: bool [N] context frames of the video, if any.

  Returns:
    float32 [length, num_iterations + 1]; column `m` is the state after `m` iterations, NaN where
    the frame was not inserted yet.
  """
  steps = np.asarray(insert_step)[:length, None].astype(np.float32)
  after = np.arange(num_iterations + 1, dtype=np.float32)[None, :]
  times = np.where(after >= steps, np.minimum((after - steps) / num_steps, 1.0), np.nan)
  if context is not None:
    times = np.where(np.asarray(context)[:length, None], 1.0, times)
  return times.astype(np.float32)


def insertion_timeline(insert_step: np.ndarray, lengths: np.ndarray, num_steps: int,
                       num_iterations: int, context: np.ndarray | None = None,
                       max_videos: int = 4) -> np.ndarray:
  """One panel per sampled video: its frames (rows, final order) over sampler iterations.

  Each cell shows the frame's flow time (dark at 0, bright at 1; pale grey before the frame
  exists), so a row starts where its frame was inserted and brightens as it is denoised; dots mark
  frames inserted after the start. The dashed line is `t_g = 1`, after which nothing is inserted.

  Args:
    insert_step: int [B, N] (`SampleOutput.insert_step`).
    lengths: int [B].
    num_steps: the sampler's steps per unit time.
    num_iterations: iterations the sampler ran (`SampleOutput.num_iterations`).
    context: bool [B, N] context frames, if any.
    max_videos: the first this many videos are drawn.
  """
  insert_step, lengths = np.asarray(insert_step), np.asarray(lengths)
  count = min(max_videos, len(lengths))
  figure = Figure(figsize=(2.6 * count + 0.9, 3.0), dpi=_DPI, layout='constrained')
  panels = figure.subplots(1, count, squeeze=False)[0]
  colours = colormaps['viridis'].with_extremes(bad=_NOT_INSERTED_COLOUR)
  for b, axes in enumerate(panels):
    length = int(lengths[b])
    history = frame_time_history(insert_step[b], length, num_steps, num_iterations,
                                 None if context is None else context[b])
    image = axes.imshow(np.ma.masked_invalid(history), cmap=colours, vmin=0.0, vmax=1.0,
                        aspect='auto', interpolation='nearest',
                        extent=(-0.5, num_iterations + 0.5, length - 0.5, -0.5))
    inserted = np.flatnonzero(insert_step[b, :length] > 0)
    axes.scatter(insert_step[b, inserted], inserted, s=6, color='white', edgecolors='black',
                 linewidths=0.3)
    axes.axvline(num_steps, color='black', linestyle='--', linewidth=0.8)
    axes.set_title(f'video {b}: {length} frames', fontsize=9)
    axes.set_xlabel('sampler iteration', fontsize=8)
    axes.tick_params(labelsize=7)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if b == 0:
      axes.set_ylabel('frame (final order)', fontsize=8)
  figure.colorbar(image, ax=list(panels), label='frame time t', fraction=0.05)
  return _to_image(figure)


def sample_figures(insert_step: np.ndarray, lengths: np.ndarray, data_lengths: np.ndarray, *,
                   num_steps: int, num_iterations: int, max_frames: int) -> dict[str, np.ndarray]:
  """The figures of one batch of samples, by name: `length_histogram`, `insertion_timeline`."""
  return {
      'length_histogram': length_histogram_image(lengths, data_lengths, max_frames),
      'insertion_timeline': insertion_timeline(insert_step, lengths, num_steps, num_iterations),
  }
