"""Data sources behind one interface: `make_source(data_config) -> (source, SourceInfo)`.

A source is a Grain random-access data source (`__len__`, `__getitem__`), picklable so reader
threads and processes can hold copies. Record `i` is a dict
  video: float32 [N, H, W, C] in [0, 1], `N` varying per record (1 <= N <= SourceInfo.max_frames).
  label: int32 scalar class (0 for unconditional sources).
The built-in sources are procedural: record `i` is a pure function of `(data.seed, i)`, so no files
are needed and every process sees the same clips. Each data set is one module holding its source, its
`make(data_config)` factory and, where samples can be scored exactly, its `metrics(videos, lengths)`;
`_DATASETS` below registers it by name.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import numpy as np

from flowception_jax.datasets import coloring
from flowception_jax.datasets import shapes
from flowception_jax.datasets.base import SourceInfo


@dataclasses.dataclass(frozen=True)
class _Dataset:
  make: Callable[[Any], tuple[Any, SourceInfo]]
  # `metrics(videos [B, N, H, W, C] in [0, 1], lengths [B]) -> {name: value}`, None if unscored.
  metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None


_DATASETS = {
    'coloring': _Dataset(coloring.make, coloring.metrics),
    'shapes': _Dataset(shapes.make),
}


def _get(name: str) -> _Dataset:
  if name not in _DATASETS:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{sorted(_DATASETS)}')
  return _DATASETS[name]


def make_source(data_config) -> tuple[Any, SourceInfo]:
  """The source named by `data_config.name` and its `SourceInfo`.

  Args:
    data_config: the `config.data` ConfigDict (or any mapping with `.get`); fields a source does not
      find take the defaults of `config.base_config`.
  """
  return _get(data_config.get('name')).make(data_config)


def task_metrics(name: str, videos: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
  """The exact metrics of data set `name` for videos [B, N, H, W, C] in [0, 1]; {} if it has none."""
  metric = _get(name).metrics
  return metric(videos, lengths) if metric else {}
