"""UCF-101 through TFDS: class-conditional clips cut at random from 13,320 action videos.

The TFDS `ucf101` builder is read with `tfds.data_source`, which needs the data prepared as
ArrayRecord (`tfds build` writes TFRecord unless told otherwise). Frames are stored as JPEG; the
source reads them undecoded and decodes only the frames of the clip it draws, resized and centre
cropped on the host to `data.image_size`. Labels are the 101 action classes, for guidance.
"""

import dataclasses
from typing import Any

import numpy as np

from flowception_jax.datasets import base
from flowception_jax.datasets import clips


def prepare_command(tfds_name: str, data_dir: str) -> str:
  """The command that prepares `tfds_name` in `data_dir` in a form `tfds.data_source` reads."""
  return f'tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record'


@dataclasses.dataclass(frozen=True)
class Ucf101Source(base.RandomClipSource):
  """Clips of the videos of one TFDS split (see `base.RandomClipSource` for the randomness)."""
  examples: Any  # The TFDS data source: {'video': list of JPEG bytes, 'label': int}.
  seed: int
  clip: clips.ClipSpec
  image_size: int
  corrupt: clips.CorruptRecords

  def __len__(self) -> int:
    return len(self.examples)

  def read(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range for a source of {len(self)} records')
    try:
      example = self.examples[index]
      encoded, label = example['video'], int(example['label'])
      if not encoded:
        raise ValueError('the video has no frames')
    except clips.CORRUPT_ERRORS as error:
      return self.corrupt.handle(index, f'example {index}', error)
    chosen = self.clip.choose(len(encoded), rng)
    try:
      video = clips.decode_frames([encoded[i] for i in chosen], self.image_size)
    except clips.CORRUPT_ERRORS as error:
      return self.corrupt.handle(index, f'example {index}', error)
    return {'video': video, 'label': np.int32(label)}


def _open(tfds_name: str, split: str, data_dir: str):
  """The undecoded TFDS data source, or one error that says how to prepare the data.

  Missing data is detected from the `tfds.data_source` call itself: `builder.is_prepared()` is
  False under `tfds.testing.mock_data`, which mocks only the data source. With `download=False`
  nothing is written when the data are missing.
  """
  # TFDS (and, through the ucf101 builder, TensorFlow) is imported only by the sets that use it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir or None, download=False,
                            decoders={'video': tfds.decode.SkipDecoding()})
  except Exception as error:  # pylint: disable=broad-except
    failure = error
  builder = tfds.builder(tfds_name, data_dir=data_dir or None)
  root = data_dir or tfds.core.constants.get_default_data_dir()
  command = prepare_command(tfds_name, root)
  if builder.is_prepared():
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise FileNotFoundError(
          f'{tfds_name} in {root} is prepared as {builder.info.file_format.value}, which '
          f'tfds.data_source cannot read. Prepare it as ArrayRecord (in a new --config.data.'
          f'data_dir, or after deleting {builder.data_dir}): {command}') from failure
    raise ValueError(f'cannot read split {split!r} of {tfds_name} in {root}: {failure}; fix '
                     '--config.data.split') from failure
  raise FileNotFoundError(
      f'{tfds_name} is not prepared in {root} (--config.data.data_dir). Prepare it once with\n'
      f'  {command}\n'
      'The tfds command needs apache_beam (pip install apache_beam) and building UCF-101 needs '
      'the ffmpeg program on the PATH (e.g. apt-get install ffmpeg); it downloads about 6.5 GB. '
      'Then run the same command again.') from failure


def make(data_config) -> tuple[Ucf101Source, base.SourceInfo]:
  """The UCF-101 source of `config.data` and its facts."""
  image_size = data_config.get('image_size', 64)
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}; fix '
                     '--config.data.image_size')
  tfds_name = data_config.get('tfds_name', 'ucf101')
  split = data_config.get('split', 'train')
  examples = _open(tfds_name, split, data_config.get('data_dir', ''))
  clip = clips.ClipSpec.from_config(data_config)
  corrupt = clips.CorruptRecords(
      policy=data_config.get('on_corrupt', 'stop'), where=f'{tfds_name} split {split!r}',
      fix=f'Prepare it again ({prepare_command(tfds_name, "DIR")})', num_records=len(examples))
  source = Ucf101Source(examples=examples, seed=data_config.get('seed', 0), clip=clip,
                        image_size=image_size, corrupt=corrupt)
  num_classes = examples.dataset_info.features['label'].num_classes
  info = base.SourceInfo(frame_shape=(image_size, image_size, 3), max_frames=clip.max_frames,
                         num_classes=num_classes)
  return source, info
