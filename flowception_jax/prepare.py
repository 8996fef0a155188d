r"""Prepares a folder of videos (or of pre-encoded latents) for training.

  python -m flowception_jax.prepare --videos='/data/taichi/**/*.mp4' --output=/data/taichi_256 \
      --size=256 --fps=16

Videos (any container PyAV decodes: mp4, avi, webm, ...) are decoded, optionally resampled to
`--fps`, resized (short side to `--size`, centred square crop) and written as lossless PNG frames
to ArrayRecord shards with their lengths and labels (see `datasets/video_folder.py`). Files that
cannot be decoded are skipped, counted and named at the end. An output that already holds a
prepared set is refused unless `--overwrite` replaces it. Train on the folder with
`--config.data.data_dir=DIR` (e.g. `configs/videos.py`).

Labels: `--labels=CSV` with a header row naming the columns `video` (a file's path relative to the
common folder of the inputs, or its base name) and `label` (any class name), or `--label_from_dir`
(a video's class is the name of its folder). Classes are numbered in sorted order.

Latents: `--latents=GLOB` takes `.npy` files of float [N, h, w, c] written by an external encoder
and stores them unchanged (no resize), for `--config.data.data_dir` training in latent space. Or
`--encoder=ltx --encoder_weights=DIR` encodes the videos itself (`autoencoders/`): each video's
first `1 + 8k` frames (the longest such prefix) become `1 + k` latent frames of `size/32` square,
normalised per channel, and the folder records the autoencoder, so that `sample` and `evaluate`
decode the model's latents back to videos. `--size` must then be a multiple of 32 (256 px: 8x8
latents).
"""

import contextlib
import csv
import dataclasses
import glob
import multiprocessing
import os

from absl import app
from absl import flags
import av
import numpy as np
import tqdm

from flowception_jax import autoencoders
from flowception_jax.datasets import clips
from flowception_jax.datasets import video_folder

# What a video file that cannot be decoded raises (PyAV's errors are FFmpegError subclasses;
# a file without a video stream raises IndexError).
_UNREADABLE = (av.error.FFmpegError, OSError, ValueError, IndexError)
# Videos are encoded padded to a multiple of this many latent frames (the encoder is causal, so the
# padding changes nothing), so that one compilation serves several lengths.
_ENCODE_BUCKET = 4


def at_rate(frames, fps: float):
  """The frames nearest to the times 0, 1/fps, 2/fps, ... after the first frame's time.

  `frames` is an iterable of PyAV video frames in presentation order; frames are repeated when
  `fps` exceeds the video's rate. With `fps == 0` every frame is kept.
  """
  if not fps:
    yield from frames
    return
  previous, previous_time, start, count = None, 0.0, None, 0
  for frame in frames:
    if frame.time is None:
      raise ValueError('frames without timestamps; prepare without --fps')
    start = frame.time if start is None else start
    time = frame.time - start
    while time >= count / fps:
      target = count / fps
      closer_before = previous is not None and target - previous_time < time - target
      yield previous if closer_before else frame
      count += 1
    previous, previous_time = frame, time


def decode_video(path: str, size: int, fps: float = 0.0, max_frames: int = 0) -> np.ndarray:
  """The frames of the video file at `path`, uint8 [N, size, size, 3] (`clips.resize_crop`)."""
  frames = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    for frame in at_rate(container.decode(stream), fps):
      frames.append(clips.resize_crop(frame.to_image(), size))
      if max_frames and len(frames) == max_frames:
        break
  if not frames:
    raise ValueError('no video frames decoded')
  return np.stack(frames)


def load_latents(path: str, max_frames: int = 0) -> np.ndarray:
  """The latents float [N, h, w, c] stored in the .npy file at `path`."""
  latents = np.load(path, allow_pickle=False)
  if latents.ndim != 4 or not len(latents) or not np.issubdtype(latents.dtype, np.floating):
    raise ValueError(f'expected float latents [N >= 1, h, w, c], got {latents.dtype} '
                     f'{latents.shape}')
  return latents[:max_frames] if max_frames else latents


def encode_video(autoencoder: autoencoders.VideoAutoencoder, video: np.ndarray) -> np.ndarray:
  """The latents float32 [1 + k, h, w, c] of the longest prefix of `1 + f k` frames of the
  uint8 video [N, H, W, 3]."""
  frames = autoencoder.cropped_length(len(video))
  latent_frames = autoencoder.latent_length(frames)
  padded = autoencoder.pixel_length(-(-latent_frames // _ENCODE_BUCKET) * _ENCODE_BUCKET)
  clip = video[:frames].astype(np.float32) / 255.0
  clip = np.concatenate([clip, np.repeat(clip[-1:], padded - frames, axis=0)])
  latents, _ = autoencoder.encode(clip[None], lengths=np.array([frames]))
  return latents[0]


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Reads one input file in a worker: (array, None) or (None, the reason it is unreadable)."""
  latents: bool
  size: int
  fps: float
  max_frames: int

  def __call__(self, path: str):
    try:
      if self.latents:
        return load_latents(path, self.max_frames), None
      return decode_video(path, self.size, self.fps, self.max_frames), None
    except _UNREADABLE as error:
      return None, f'{type(error).__name__}: {error}'


def _label_table(names: list[str], paths: list[str], labels_csv: str | None,
                 from_dir: bool) -> tuple[list[str], list[int]]:
  """(classes, label of each input) from a CSV or folder names; ([], zeros) when unlabelled."""
  if labels_csv and from_dir:
    raise app.UsageError('pass --labels or --label_from_dir, not both')
  if from_dir:
    per_input = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
  elif labels_csv:
    with open(labels_csv, newline='') as f:
      reader = csv.DictReader(f)
      if not {'video', 'label'} <= set(reader.fieldnames or ()):
        raise ValueError(f'{labels_csv} needs a header row with the columns video and label, got '
                         f'{reader.fieldnames}')
      table = {row['video']: row['label'] for row in reader}
    per_input = [table.get(n, table.get(os.path.basename(n))) for n in names]
    missing = [n for n, label in zip(names, per_input) if label is None]
    if missing:
      raise ValueError(f'{len(missing)} videos have no row in {labels_csv}, e.g. {missing[:5]}; '
                       'add them or narrow --videos')
  else:
    return [], [0] * len(names)
  classes = sorted(set(per_input))
  index = {c: i for i, c in enumerate(classes)}
  return classes, [index[c] for c in per_input]


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a preparation wrote."""
  output: str
  num_videos: int
  num_frames: int
  classes: list[str]
  skipped: list[dict[str, str]]
  unit: str = 'frames'  # What `num_frames` counts: 'frames' or 'latent frames'.

  def __str__(self) -> str:
    lines = [f'wrote {self.num_videos} videos ({self.num_frames} {self.unit}, '
             f'{len(self.classes)} classes) to {self.output}; skipped {len(self.skipped)}']
    lines += [f'  skipped {s["name"]}: {s["reason"]}' for s in self.skipped]
    return '\n'.join(lines)


def prepare(*, output: str, videos: str | None = None, latents: str | None = None,
            size: int | None = None, labels: str | None = None, label_from_dir: bool = False,
            max_frames: int = 0, fps: float = 0.0, codec: str = 'png', overwrite: bool = False,
            num_workers: int = 1, records_per_shard: int = 1000, encoder: str | None = None,
            encoder_weights: str | None = None) -> Summary:
  """Writes the inputs matched by `videos` (or `latents`) to the prepared folder `output`; with
  `encoder`, the latents of the videos by that autoencoder (weights `encoder_weights`)."""
  if (videos is None) == (latents is None):
    raise app.UsageError('pass exactly one of --videos and --latents')
  if videos is not None and not (size and size > 0):
    raise app.UsageError('--size (frame side in pixels) is required with --videos')
  if encoder is not None and (videos is None or not encoder_weights):
    raise app.UsageError('--encoder encodes --videos and needs --encoder_weights=DIR')
  autoencoder = None
  if encoder is not None:
    autoencoder = autoencoders.load(encoder, encoder_weights)
    autoencoder.check_frame_size(size, size)
  paths = sorted(p for p in glob.glob(videos or latents, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'no file matches {videos or latents!r}')
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  names = [os.path.relpath(os.path.abspath(p), root) for p in paths]
  if len(set(names)) != len(names):
    raise ValueError('the inputs have duplicate names')
  classes, label_ids = _label_table(names, paths, labels, label_from_dir)
  reader = _Reader(latents=latents is not None, size=size or 0, fps=fps, max_frames=max_frames)
  num_frames = 0
  with contextlib.ExitStack() as stack:
    writer = stack.enter_context(video_folder.FolderWriter(
        output, kind='pixels' if videos is not None and autoencoder is None else 'latents',
        classes=classes, fps=fps or None, codec=codec, overwrite=overwrite,
        records_per_shard=records_per_shard,
        encoder=autoencoder.metadata() if autoencoder else None))
    if num_workers > 1:
      pool = stack.enter_context(multiprocessing.get_context('spawn').Pool(num_workers))
      results = pool.imap(reader, paths)
    else:
      results = map(reader, paths)
    progress = stack.enter_context(tqdm.tqdm(total=len(paths), unit='video'))
    for name, label, (array, reason) in zip(names, label_ids, results):
      if array is not None and autoencoder is not None:
        array = encode_video(autoencoder, array)
      if array is not None:
        try:
          writer.add(name, array, label)
          num_frames += len(array)
        except ValueError as error:  # E.g. latents whose shape differs from the first file's.
          reason = str(error)
      if reason is not None:
        writer.skip(name, reason)
      progress.update()
      progress.set_postfix(skipped=len(writer.skipped))
  return Summary(output=output, num_videos=len(writer.names), num_frames=num_frames,
                 classes=classes, skipped=writer.skipped,
                 unit='frames' if videos is not None and autoencoder is None else 'latent frames')


def _define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  beside other entry points (which also define `--output`) cannot clash."""
  flags.DEFINE_string('videos', None, 'Glob of video files (** recurses).')
  flags.DEFINE_string('latents', None, 'Glob of .npy latents [N, h, w, c] (instead of --videos).')
  flags.DEFINE_string('output', None, 'Folder to write.')
  flags.DEFINE_integer('size', None, 'Frame side in pixels (videos only).')
  flags.DEFINE_string('labels', None, 'CSV with columns video,label.')
  flags.DEFINE_bool('label_from_dir', False, "Class = name of the video's folder.")
  flags.DEFINE_integer('max_frames', 0, 'Keep at most this many frames per video (0: all).')
  flags.DEFINE_float('fps', 0.0, 'Resample videos to this frame rate (0: keep theirs).')
  flags.DEFINE_enum('codec', 'png', video_folder.CODECS,
                    'Frame encoding: png (lossless) or jpeg (quality 95, about 5x smaller).')
  flags.DEFINE_bool('overwrite', False, 'Replace a prepared set already in --output.')
  flags.DEFINE_integer('num_workers', 1, 'Processes decoding videos in parallel.')
  flags.DEFINE_integer('records_per_shard', 1000, 'Videos per ArrayRecord shard.')
  flags.DEFINE_enum('encoder', None, sorted(autoencoders.ENCODERS),
                    'Write the latents of the videos by this autoencoder (see autoencoders/).')
  flags.DEFINE_string('encoder_weights', None, "The --encoder's weights folder (diffusers "
                      'layout: config.json and diffusion_pytorch_model.safetensors).')
  flags.mark_flags_as_required(['output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(prepare(output=f.output, videos=f.videos, latents=f.latents, size=f.size,
                labels=f.labels, label_from_dir=f.label_from_dir, max_frames=f.max_frames,
                fps=f.fps, codec=f.codec, overwrite=f.overwrite, num_workers=f.num_workers,
                records_per_shard=f.records_per_shard, encoder=f.encoder,
                encoder_weights=f.encoder_weights))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
