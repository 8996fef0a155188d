"""Data sources behind one interface: `make_source(data_config) -> (source, SourceInfo)`.

A source is a Grain random-access data source (`__len__`, `__getitem__`), picklable so reader
threads and processes can hold copies. Record `i` is a dict
  video: float32 [N, H, W, C] in [0, 1], `N` varying per record (1 <= N <= SourceInfo.max_frames).
         For a source of latents (`SourceInfo.pixels` False) it holds float32 latents of any range
         and channel count instead, which the pipeline passes to the model unscaled.
  label: int32 scalar class (0 for unconditional sources); `SourceInfo.class_names` names the
    classes where the data set knows them (`sample --class=NAME`).
Sources may add keys (`camera` records keep their photo and camera path).
The built-in sources (`shapes`, `coloring`, `camera`) are procedural: record `i` is a pure function
of `(data.seed, i)`, so no files are needed and every process sees the same clips. Sources of stored
videos (`ucf101`, `videos`) are `RandomClipSource`s: the pipeline cuts a new random clip at every
draw of a video, and `source[i]` is one such clip, None if an unreadable record is skipped. Each
data set is one module (the shapes set a folder) holding its source and its `make(data_config)`
factory, and, where samples can be scored exactly, a metrics function (`coloring.metrics`;
`shapes/metrics.py`, built on the reusable `shapes/tracker.py`; `camera.metrics`); `_DATASETS` below
registers them by name. The tasks with given frames are scored exactly on shapes by
`shapes/tasks.py` (continuation and interpolation, against the clips the frames were cut from).
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import numpy as np

from flowception_jax.datasets.base import RandomClipSource
from flowception_jax.datasets.base import SourceInfo
from flowception_jax.datasets import camera
from flowception_jax.datasets import coloring
from flowception_jax.datasets.shapes import metrics as shapes_metrics
from flowception_jax.datasets.shapes import source as shapes
from flowception_jax.datasets import ucf101
from flowception_jax.datasets import video_folder


@dataclasses.dataclass(frozen=True)
class _Dataset:
  make: Callable[[Any], tuple[Any, SourceInfo]]
  # `metrics(videos [B, N, H, W, C] in [0, 1], lengths [B], data_config) -> {name: value}`, None
  # if unscored.
  metrics: Callable[[np.ndarray, np.ndarray, Any], dict[str, float]] | None = None


_DATASETS = {
    # The camera and coloring rules do not depend on the config.
    'camera': _Dataset(camera.make, lambda videos, lengths, _: camera.metrics(videos, lengths)),
    'coloring': _Dataset(coloring.make, lambda videos, lengths, _: coloring.metrics(videos, lengths)),
    'shapes': _Dataset(shapes.make, shapes_metrics.metrics),
    'ucf101': _Dataset(ucf101.make),
    'videos': _Dataset(video_folder.make),
}


def _get(name: str) -> _Dataset:
  if name not in _DATASETS:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{sorted(_DATASETS)}')
  return _DATASETS[name]


def make_source(data_config) -> tuple[Any, SourceInfo]:
  """The source named by `data_config.name` and its `SourceInfo`, checked against what the config
  expects of it (`check_expected`).

  Args:
    data_config: the `config.data` ConfigDict (or any mapping with `.get`); fields a source does not
      find take the defaults of `config.base_config`.
  """
  source, info = _get(data_config.get('name')).make(data_config)
  check_expected(info, data_config)
  return source, info


def check_expected(info: SourceInfo, data_config) -> None:
  """Refuses data that is not what the config says it trains on (`data.latent_shape`,
  `data.num_classes`)."""
  latent_shape = tuple(data_config.get('latent_shape', ()))
  where = data_config.get('data_dir') or data_config.get('name')
  if latent_shape and (info.pixels or tuple(info.frame_shape) != latent_shape):
    held = 'pixels' if info.pixels else 'latents of {}x{}x{}'.format(*info.frame_shape)
    raise ValueError(
        f'the config trains on latents of {"x".join(map(str, latent_shape))} '
        f'(data.latent_shape) but {where} holds {held}; prepare the videos with python -m '
        'flowception_jax.prepare --encoder=ltx --encoder_weights=DIR (256 px videos give 8x8x128 '
        'latents), or train on what it holds: a pixel variant of the config, or '
        '--config.data.latent_shape=()')
  expected = data_config.get('num_classes', 0)
  if expected and info.num_classes != expected:
    raise ValueError(f'the config expects {expected} classes (data.num_classes) but {where} has '
                     f'{info.num_classes}; check the labels of the prepared data, or set '
                     f'--config.data.num_classes={info.num_classes} (0 takes any count)')


def task_metrics(name: str, videos: np.ndarray, lengths: np.ndarray,
                 data_config=None) -> dict[str, float]:
  """The exact metrics of data set `name` for videos [B, N, H, W, C] in [0, 1]; {} if it has none.

  `data_config` is the `config.data` the videos are meant to follow; `shapes` needs it (its frame
  counts and shapes per clip are settings), `coloring` does not.
  """
  metric = _get(name).metrics
  return metric(videos, lengths, data_config) if metric else {}
