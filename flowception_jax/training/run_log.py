"""What a run prints: its own lines by default, the libraries' logs only when asked (`--verbose`).

By default a run shows the lines of this package (config summary, progress, checkpoints, samples)
and the metric lines of clu's logging writer, with a short time prefix. The libraries' records
(Orbax save internals, Grain, JAX backend probing, TensorFlow start-up notes) are hidden, and an
exception raised by this package's own checks (naming the problem and the fix), or an
operating-system error, ends the run with its one-line message instead of a traceback. `Progress` times training between blocking fetches
of step outputs, so steps/s and the ETA count computation, not asynchronous dispatch.
"""

import contextlib
import logging as python_logging
import os
import sys
import time
import traceback

from absl import flags
from absl import logging

from flowception_jax.training import input_pipeline

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # flowception_jax/
_CLU_SCALARS = '[%d]%s %s'  # The template of clu's LoggingWriter.write_scalars lines.


def _is_own_file(path: str) -> bool:
  return os.path.abspath(path).startswith(_PACKAGE_DIR + os.sep)


class _OwnLines(python_logging.Filter):
  """Passes this package's records and clu's metric lines; drops every other library's."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if _is_own_file(record.pathname):
      return True
    return (record.pathname.endswith(os.path.join('metric_writers', 'logging_writer.py'))
            and record.msg == _CLU_SCALARS)


class _ShortFormatter(python_logging.Formatter):
  """`HH:MM:SS message`, with the level named when it is not INFO."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')

  def format(self, record: python_logging.LogRecord) -> str:
    line = super().format(record)
    if record.levelno != python_logging.INFO:
      time_part, message = line.split(' ', 1)
      line = f'{time_part} {record.levelname}: {message}'
    return line


def setup(verbose: bool = False) -> None:
  """Routes Python logging through absl at INFO, showing only this run's lines unless `verbose`.

  Safe to call again (e.g. from a notebook) to switch modes. TensorFlow's C++ logs are lowered to
  errors for a TensorFlow imported afterwards (an explicit `TF_CPP_MIN_LOG_LEVEL` wins). Outside
  `app.run` (notebooks) the absl flags are marked parsed, as libraries that read them expect.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _OwnLines)]:
    handler.removeFilter(old)
  if verbose:
    handler.setFormatter(logging.PythonFormatter())
    sys.unraisablehook = sys.__unraisablehook__
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  handler.addFilter(_OwnLines())
  handler.setFormatter(_ShortFormatter())
  # Orbax leaves failed asynchronous writes and reads as coroutines that are garbage-collected
  # later; Python prints each one as "Exception ignored in ...". The failure itself is raised.
  sys.unraisablehook = lambda unraisable: None


@contextlib.contextmanager
def one_line_errors(enabled: bool = True):
  """Ends the process with exit code 1 and the message of an exception this package raised.

  The package's checks raise exceptions whose message names the problem and the fix, and an
  operating-system error names the error and the file, so their traceback is noise; any other
  exception raised inside a library (a bug, or a failure the package does not know) keeps its full
  traceback. Disabled, every exception propagates unchanged.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    frames = traceback.extract_tb(e.__traceback__)
    own = bool(frames) and _is_own_file(frames[-1].filename)
    if not enabled or not (own or isinstance(e, OSError)):
      raise
    logging.error('%s (--verbose shows the traceback and the libraries\' logs)', e)
    sys.exit(1)


@contextlib.contextmanager
def native_output_silenced(enabled: bool = True):
  """Sends what native libraries write straight to the stderr file descriptor to /dev/null.

  For imports whose C++ start-up notes (TensorFlow's oneDNN notice, printed whatever
  `TF_CPP_MIN_LOG_LEVEL` says) bypass Python logging. Errors raised inside still propagate.
  """
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, 'w') as devnull:
    os.dup2(devnull.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def format_duration(seconds: float) -> str:
  """`1h 02m`, `3m 05s` or `12s`."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h {minutes:02d}m'
  if minutes:
    return f'{minutes}m {seconds:02d}s'
  return f'{seconds}s'


class Progress:
  """Training progress (steps/s, ETA) timed between blocking fetches of step outputs.

  JAX dispatches steps asynchronously, so the Python loop runs ahead of the device and a clock read
  at dispatch measures dispatch. Call `update(step)` right after a blocking fetch of step `step`'s
  outputs, when every step up to it has finished. Steps/s counts the time between two updates minus
  the time spent in `paused()` (sampling, the blocking part of a checkpoint save), so it is the
  training speed; the ETA divides the remaining steps by the wall-clock pace since the first update,
  pauses included, so it allows for the samples and checkpoints still to come. The first update
  reports the time since construction, which includes compilation.
  """

  def __init__(self, total_steps: int, first_step: int, clock=time.monotonic):
    self._total_steps = total_steps
    self._clock = clock
    self._start = (first_step, clock())
    self._first: tuple[int, float] | None = None
    self._last: tuple[int, float] | None = None
    self._paused = 0.0

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count towards steps/s."""
    start = self._clock()
    try:
      yield
    finally:
      self._paused += self._clock() - start

  def update(self, step: int) -> dict[str, float]:
    """Logs a progress line for `step`; returns `{'steps_per_sec': ...}` once a rate is known."""
    now = self._clock()
    done = f'step {step}/{self._total_steps} ({100 * step // max(self._total_steps, 1)}%)'
    if self._last is None:
      start_step, start_time = self._start
      logging.info('%s: %d steps in %s, compilation included', done, step - start_step,
                   format_duration(now - start_time))
      self._first = self._last = (step, now)
      self._paused = 0.0
      return {}
    last_step, last_time = self._last
    busy = now - last_time - self._paused
    if step <= last_step or busy <= 0:
      return {}
    rate = (step - last_step) / busy
    first_step, first_time = self._first
    pace = (step - first_step) / (now - first_time)
    logging.info('%s: %.3g steps/s, ETA %s', done, rate,
                 format_duration((self._total_steps - step) / pace))
    self._last = (step, now)
    self._paused = 0.0
    return {'steps_per_sec': rate}


def config_summary(config, info, num_params: int, evaluations: dict[str, int]) -> list[str]:
  """Three lines that say what a run trains: data, model, schedule and its evaluators
  (`evaluations` maps each one's name to its steps between runs, 0 for the end only)."""
  h, w, c = info.frame_shape
  classes = f'{info.num_classes} classes' if info.num_classes else 'unconditional'
  evaluated = ', '.join(f'{name} every {every} steps' if every else f'{name} at the end'
                        for name, every in evaluations.items()) or 'no evaluations'
  return [
      f'data: {config.data.name}, clips of up to {info.max_frames} frames of {h}x{w}x{c}, '
      f'{classes}, ' +
      (f'packed rows of {input_pipeline.max_slots(config.data, config.method)} slots'
       if config.data.get('packing', False) else f'buckets {tuple(config.data.buckets)}'),
      f'model: DiT {config.model.size}, {num_params / 1e6:.2f}M parameters, patch '
      f'{config.model.patch_size}, {config.model.dtype} activations, kappa {config.flow.kappa}',
      f'training: {config.total_steps} steps of batch {config.batch_size}, peak learning rate '
      f'{config.optim.learning_rate:g}; checkpoints every {config.checkpoint_every} steps, '
      f'{evaluated}',
  ]
