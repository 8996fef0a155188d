"""Prepared folders of videos (or latents): the on-disk form, its writer, and its source.

A folder holds ArrayRecord shards `clips-NNNNN.array_record`, one record per video, and
`metadata.json`, written last, so a folder without it is incomplete. A record is a msgpack map
(`flax.serialization`):
  name:    str, where the video came from (for `prepare`, its path relative to the inputs' folder).
  label:   int, index into the metadata's `classes` (0 when there are none).
  frames:  list of N encoded images (PNG, lossless, or JPEG), each H x W RGB; for kind 'pixels'.
  latents: float16 or float32 [N, h, w, c], any channel count; for kind 'latents'.
`metadata.json` holds `kind`, `frame_shape` ([H, W, 3] or [h, w, c]), `codec`, `fps` (null if the
source rate was kept), `classes`, `shards`, the per-record `names`, `lengths` and `labels` (so a
record can be named and the length distribution known without reading it), the `skipped`
inputs with the reason, and `encoder`: for latents that `prepare --encoder` wrote, the autoencoder
that made them (`VideoAutoencoder.metadata`: its name, weights folder and architecture), from which
samples are decoded back to videos (`autoencoders.for_data`); null otherwise.

`python -m flowception_jax.prepare` writes folders from video files; `FolderWriter` writes them from
Python, e.g. from the latents of an autoencoder.
"""

import dataclasses
import glob
import io
import json
import os
from typing import Any

from array_record.python import array_record_module
from flax import serialization
import grain
import numpy as np
from PIL import Image

from flowception_jax.datasets import base
from flowception_jax.datasets import clips
from flowception_jax.storage import files

FORMAT = 'flowception_jax video folder'
VERSION = 1
METADATA = 'metadata.json'
KINDS = ('pixels', 'latents')
CODECS = ('png', 'jpeg')
_SHARD = 'clips-{:05d}.array_record'
_JPEG_QUALITY = 95


def _is_ours(name: str) -> bool:
  return name == METADATA or (name.startswith('clips-') and name.endswith('.array_record'))


class FolderWriter:
  """Writes a prepared folder, refusing to mix with an existing one unless `overwrite`.

  Use as a context manager; `metadata.json` is written only when the block ends without an
  exception, so an interrupted run leaves a folder that readers refuse (and that a new run refuses
  to extend without `overwrite`).

    with FolderWriter('/data/my_latents', kind='latents', classes=['cat', 'dog']) as writer:
      writer.add('video_0001', latents, label=1)  # float [N, h, w, c]
  """

  def __init__(self, directory: str, *, kind: str = 'pixels', classes=(), fps: float | None = None,
               codec: str = 'png', overwrite: bool = False, records_per_shard: int = 1000,
               encoder: dict[str, Any] | None = None):
    """`encoder` describes the autoencoder that made the latents (for kind 'latents')."""
    if kind not in KINDS or codec not in CODECS:
      raise ValueError(f'kind must be one of {KINDS} and codec one of {CODECS}, got {kind!r} and '
                       f'{codec!r}')
    if encoder is not None and kind != 'latents':
      raise ValueError('only latents have an encoder')
    self.directory = directory
    self.kind, self.codec, self.fps, self.encoder = kind, codec, fps, encoder
    self.classes = list(classes)
    self._per_shard = records_per_shard
    existing = sorted(n for n in os.listdir(directory) if _is_ours(n)) if os.path.isdir(
        directory) else []
    if existing and not overwrite:
      raise FileExistsError(
          f'{directory} already holds a prepared data set ({", ".join(existing[:3])}...); pass '
          '--overwrite to replace it, or choose another --output')
    os.makedirs(directory, exist_ok=True)
    # The metadata goes first, so an overwrite that is interrupted leaves a folder readers refuse.
    for name in sorted(existing, key=lambda n: n != METADATA):
      os.remove(os.path.join(directory, name))
    self.frame_shape: tuple[int, ...] | None = None
    self.names, self.lengths, self.labels, self.shards = [], [], [], []
    self.skipped: list[dict[str, str]] = []
    self._writer = None

  def add(self, name: str, video: np.ndarray, label: int = 0) -> None:
    """Adds one video: uint8 [N, H, W, 3] for 'pixels', float [N, h, w, c] for 'latents'."""
    video = np.asarray(video)
    if video.ndim != 4 or not len(video):
      raise ValueError(f'{name}: expected a video [N >= 1, H, W, C], got shape {video.shape}')
    if self.kind == 'pixels' and (video.dtype != np.uint8 or video.shape[-1] != 3):
      raise ValueError(f'{name}: pixels must be uint8 [N, H, W, 3], got {video.dtype} '
                       f'{video.shape}')
    if self.kind == 'latents' and not np.issubdtype(video.dtype, np.floating):
      raise ValueError(f'{name}: latents must be floating point, got {video.dtype}')
    if self.frame_shape is None:
      self.frame_shape = video.shape[1:]
    if video.shape[1:] != self.frame_shape:
      raise ValueError(f'{name}: frames of shape {video.shape[1:]} differ from the first '
                       f"video's {self.frame_shape}")
    if not 0 <= label < max(len(self.classes), 1):
      raise ValueError(f'{name}: label {label} is not an index into the {len(self.classes)} '
                       'classes')
    if self.kind == 'pixels':
      record = {'frames': [self._encode(frame) for frame in video]}
    else:
      record = {'latents': video if video.dtype == np.float16 else video.astype(np.float32)}
    record.update(name=name, label=int(label))
    if self._writer is None or len(self.names) % self._per_shard == 0:
      self._next_shard()
    self._writer.write(serialization.msgpack_serialize(record))
    self.names.append(name)
    self.lengths.append(len(video))
    self.labels.append(int(label))

  def skip(self, name: str, reason: str) -> None:
    """Records an input that could not be read; it is listed in the metadata."""
    self.skipped.append({'name': name, 'reason': reason})

  def _encode(self, frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    if self.codec == 'png':
      Image.fromarray(frame).save(out, format='PNG', compress_level=1)
    else:
      Image.fromarray(frame).save(out, format='JPEG', quality=_JPEG_QUALITY)
    return out.getvalue()

  def _next_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    name = _SHARD.format(len(self.shards))
    # One record per chunk, so random access reads only the record asked for; frames are already
    # compressed images (latents rarely compress), so chunks are stored uncompressed.
    self._writer = array_record_module.ArrayRecordWriter(
        os.path.join(self.directory, name), 'group_size:1,uncompressed')
    self.shards.append(name)

  def close(self, complete: bool = True) -> None:
    """Closes the last shard and, if `complete`, writes `metadata.json` atomically."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if not complete:
      return
    if not self.names:
      raise ValueError(f'no video was written to {self.directory} ({len(self.skipped)} skipped)')
    metadata = {
        'format': FORMAT, 'version': VERSION, 'kind': self.kind,
        'frame_shape': list(self.frame_shape),
        'codec': self.codec if self.kind == 'pixels' else None,
        'fps': self.fps, 'classes': self.classes, 'shards': self.shards, 'names': self.names,
        'lengths': self.lengths, 'labels': self.labels, 'skipped': self.skipped,
        'encoder': self.encoder,
    }
    files.write_bytes(os.path.join(self.directory, METADATA), json.dumps(metadata).encode())

  def __enter__(self) -> 'FolderWriter':
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(complete=exc_type is None)


def read_metadata(directory: str) -> dict[str, Any]:
  """The checked metadata of a prepared folder."""
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    found = 'shards but ' if glob.glob(os.path.join(directory, 'clips-*')) else ''
    raise FileNotFoundError(
        f'{directory} holds {found}no {METADATA}: it is not a prepared data set, or its '
        'preparation was interrupted. Prepare it with python -m flowception_jax.prepare '
        f'--videos=GLOB --output={directory} --size=S (add --overwrite to replace a partial one), '
        'or fix --config.data.data_dir')
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get('format') != FORMAT or metadata.get('version') != VERSION:
    raise ValueError(f'{path} is not version {VERSION} of the {FORMAT!r} format; prepare the data '
                     'again with this version of python -m flowception_jax.prepare')
  return metadata


@dataclasses.dataclass(frozen=True)
class VideoFolderSource(base.RandomClipSource):
  """Clips of the videos of a prepared folder (see `base.RandomClipSource` for the randomness).

  Records are `video` float32 [L, S, S, 3] in [0, 1] (the centred square of each stored frame,
  resized to `frame_shape` unless stored at that size) for kind 'pixels', or the stored latents as
  float32 [L, h, w, c] for kind 'latents'; and `label` int32.
  """
  records: Any  # grain.sources.ArrayRecordDataSource over the shards.
  names: tuple[str, ...]
  seed: int
  clip: clips.ClipSpec
  pixels: bool
  frame_shape: tuple[int, int, int]
  corrupt: clips.CorruptRecords

  def __len__(self) -> int:
    return len(self.names)

  def read(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range for a source of {len(self)} records')
    try:
      record = serialization.msgpack_restore(self.records[index])
      stored = record['frames' if self.pixels else 'latents']
      label = np.int32(record['label'])
      if not len(stored):
        raise ValueError('the record has no frames')
    except clips.CORRUPT_ERRORS as error:
      return self.corrupt.handle(index, self.names[index], error)
    chosen = self.clip.choose(len(stored), rng)
    try:
      if self.pixels:
        video = clips.decode_frames([stored[i] for i in chosen], self.frame_shape[0])
      else:
        video = np.asarray(stored[chosen], np.float32)
        if video.shape[1:] != self.frame_shape:
          raise ValueError(f'latents of shape {video.shape[1:]}, not {self.frame_shape}')
    except clips.CORRUPT_ERRORS as error:
      return self.corrupt.handle(index, self.names[index], error)
    return {'video': video, 'label': label}


def make(data_config) -> tuple[VideoFolderSource, base.SourceInfo]:
  """The source of the prepared folder `data.data_dir` and its facts.

  Frames of 'pixels' folders are read at `data.image_size` (resized if stored at another size);
  latents keep their stored shape.
  """
  directory = data_config.get('data_dir', '')
  if not directory:
    raise ValueError('set --config.data.data_dir to a folder written by python -m '
                     'flowception_jax.prepare --videos=GLOB --output=DIR --size=S')
  metadata = read_metadata(directory)
  paths = [os.path.join(directory, shard) for shard in metadata['shards']]
  fix = (f'Prepare {directory} again (python -m flowception_jax.prepare ... --output={directory} '
         '--overwrite)')
  try:
    records = grain.sources.ArrayRecordDataSource(paths)
  except (RuntimeError, OSError) as error:
    raise ValueError(f'cannot open the shards of {directory}: {error}. {fix}') from error
  if len(records) != len(metadata['names']):
    raise ValueError(f'{directory} holds {len(records)} records but its metadata lists '
                     f'{len(metadata["names"])}. {fix}')
  pixels = metadata['kind'] == 'pixels'
  if pixels:
    size = data_config.get('image_size', 64)
    frame_shape = (size, size, 3)
  else:
    frame_shape = tuple(metadata['frame_shape'])
  clip = clips.ClipSpec.from_config(data_config)
  source = VideoFolderSource(
      records=records, names=tuple(metadata['names']), seed=data_config.get('seed', 0), clip=clip,
      pixels=pixels, frame_shape=frame_shape,
      corrupt=clips.CorruptRecords(policy=data_config.get('on_corrupt', 'stop'), where=directory,
                                   fix=fix, num_records=len(records)))
  info = base.SourceInfo(frame_shape=frame_shape, max_frames=clip.max_frames,
                         num_classes=len(metadata['classes']), pixels=pixels)
  return source, info
