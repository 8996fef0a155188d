r"""Learning curves: named config variants, each trained for one budget and scored as it learns.

  python -m flowception_jax.research.study --config=configs/shapes.py --output=/tmp/study \
      --variant=base --variant='heun sampler.solver=heun' \
      --variant='lr1e-3 optim.learning_rate=1e-3' --minutes=10 --evals=8 --num_videos=128 \
      --seeds=0,1

A variant is `NAME [FIELD=VALUE ...]`: overrides of the config (applied after any `--config.*`
flag), values read as Python literals (`data.buckets=(4,8)`, `flow.kappa=cosine`). Each (variant,
seed) run trains through `train.train_and_evaluate` in `OUTPUT/runs/NAME/seed_S` with `config.seed =
S`. At `--evals` steps (the last at the end; `--eval_spacing=log` halves the step from each to the
one before) the EMA weights sample `--num_videos` videos from the same noise in every run, scored
by the data set's exact metrics (`datasets.task_metrics`); a GIF of them goes to the run's workdir.

Time is training time: wall-clock seconds between blocking fetches of the train state, from the
end of the first step, with evaluation and JAX compilation (as `jax.monitoring` reports it) taken
out; the machine's core count and load averages are recorded with it. With `--minutes`, each
variant first trains `--calibration_steps` steps to time a step, and then runs the step count that
fills the budget, so that its learning-rate schedule ends with it; otherwise runs last `--steps`
(or each config's `total_steps`).

Writes `OUTPUT/study.json` after every evaluation and, at the end, `OUTPUT/<metric>.png` per metric:
its mean over seeds against training minutes per variant, the seeds' range shaded.
`--replot` redraws the figures of an existing study.
"""

import ast
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from matplotlib import figure
import ml_collections
from ml_collections import config_flags
import numpy as np

from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.storage import files
from flowception_jax.storage import video_io
from flowception_jax.training import train

# Metrics plotted by default, per data set (others: every metric their evaluation returns).
HEADLINE_METRICS = {
    'shapes': ('pass_share', 'clean_pixel_share', 'length_tv'),
    'coloring': ('rule_accuracy', 'palette_accuracy', 'length_tv'),
}
TIME_NOTE = ('training wall-clock seconds between blocking fetches of the train state, from the '
             'end of the first step, evaluation and JAX compilation excluded')
_GIF_VIDEOS = 16  # Videos in the GIF written at each evaluation.


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named set of config overrides: dotted field name -> value."""
  name: str
  overrides: dict[str, Any]


def parse_variant(text: str) -> Variant:
  """Reads `NAME [FIELD=VALUE ...]`; values are Python literals, or else strings."""
  name, *assignments = text.split()
  overrides = {}
  for assignment in assignments:
    field, sep, value = assignment.partition('=')
    if not sep or not field:
      raise ValueError(f'variant {name!r}: expected FIELD=VALUE, got {assignment!r}; write '
                       "--variant='NAME field.name=value other.field=value'")
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value
  return Variant(name, overrides)


def apply_overrides(config: ml_collections.ConfigDict,
                    variant: Variant) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's overrides; every field must exist already."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in variant.overrides.items():
    *parents, leaf = field.split('.')
    parent = config
    for part in parents:
      parent = parent.get(part)
      if not isinstance(parent, ml_collections.ConfigDict):
        break
    if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
      raise ValueError(f'variant {variant.name!r}: the config has no field {field!r} (see '
                       'flowception_jax/training/config.py)')
    try:
      parent[leaf] = value
    except TypeError as error:
      raise ValueError(f'variant {variant.name!r}: {field}={value!r} has the wrong type for that '
                       f'field ({error})') from error
  return config


EVAL_SPACINGS = ('linear', 'log')


def eval_steps(total_steps: int, evals: int, spacing: str = 'linear') -> tuple[int, ...]:
  """`evals` steps in [1, total_steps], the last one `total_steps`: evenly spaced ('linear'), or
  each twice the one before ('log', so early learning and late convergence both show)."""
  if spacing == 'log':
    steps = np.round(total_steps * 2.0 ** (np.arange(evals) - evals + 1)).astype(int)
  elif spacing == 'linear':
    steps = np.round(np.linspace(0, total_steps, evals + 1)[1:]).astype(int)
  else:
    raise ValueError(f'unknown evaluation spacing {spacing!r}; set --eval_spacing to one of '
                     f'{", ".join(EVAL_SPACINGS)}')
  return tuple(int(s) for s in np.unique(np.maximum(steps, 1)))


def _study_config(config: ml_collections.ConfigDict, total_steps: int, seed: int):
  """`config` set up for a timed run: its budget, its seed, one checkpoint at the end."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.total_steps = total_steps
  config.seed = seed
  config.checkpoint_every = total_steps
  config.keep_checkpoints = 1
  return config


class _Clock:
  """Wall-clock seconds without JAX compilation: the durations of the compile events JAX reports
  (`jax.monitoring`) while the clock is open are taken out. Use as a context manager."""

  def __init__(self):
    self.compile_seconds = 0.0

  def _on_event(self, name: str, seconds: float, **kwargs) -> None:
    del kwargs
    if name.startswith('/jax/core/compile/'):
      self.compile_seconds += seconds

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def now(self) -> float:
    return time.perf_counter() - self.compile_seconds


class _StepTimer:
  """Step hook that times steps 2 .. `last` (compilation excluded) and then ends the run."""

  def __init__(self, clock: _Clock, last: int):
    self.clock, self.last = clock, last
    self.start = None
    self.seconds_per_step = None

  def __call__(self, step: int, state) -> bool:
    if self.start is None:
      jax.block_until_ready(state)
      self.start, self.first = self.clock.now(), step
    if step == self.last:
      jax.block_until_ready(state)
      self.seconds_per_step = (self.clock.now() - self.start) / (self.last - self.first)
      return True
    return False


def seconds_per_step(config: ml_collections.ConfigDict, steps: int) -> float:
  """Wall-clock seconds per training step of `config` (compilation excluded), timed over `steps`
  steps after the first."""
  with tempfile.TemporaryDirectory() as workdir, _Clock() as clock:
    timer = _StepTimer(clock, 1 + steps)
    # One step more than timed, so that the run stops before its only checkpoint.
    train.train_and_evaluate(_study_config(config, steps + 2, config.seed), workdir,
                             step_hook=timer)
  return timer.seconds_per_step


class _Curve:
  """Step hook of one run: times training between blocking fetches, evaluates at `steps`, and
  ends the run after the last evaluation (whose step is the run's last, already saved)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, steps: tuple[int, ...],
               num_videos: int, eval_seed: int, clock: _Clock, on_point):
    source, self.info = datasets.make_source(config.data)
    self.config = train.resolve(config, source, self.info)
    self.workdir = workdir
    self.steps = steps
    self.num_videos = num_videos
    self.eval_seed = eval_seed
    self.clock = clock
    self.on_point = on_point
    self.sampler = None
    self.start = None
    self.train_seconds = 0.0
    self.points = []

  def evaluate(self, step: int, params) -> dict[str, float]:
    """The data set's metrics of `num_videos` videos sampled from `params`, from the same noise
    at every evaluation; their GIF goes to the workdir."""
    if self.sampler is None:
      model = model_lib.build_for(self.config, self.info)
      self.sampler = inference.VideoSampler(model, self.config, self.info,
                                            batch_size=self.num_videos)
    out = self.sampler(params, jax.random.key(self.eval_seed), self.num_videos)
    lengths = np.asarray(out.lengths)
    videos = inference.to_pixels(out.frames, lengths)
    if jax.process_index() == 0:
      video_io.write_gif(os.path.join(self.workdir, f'samples_{step:06d}.gif'),
                         video_io.video_grid(videos[:_GIF_VIDEOS], lengths[:_GIF_VIDEOS]))
    metrics = datasets.task_metrics(self.config.data.name, videos, lengths, self.config.data)
    metrics['mean_length'] = float(lengths.mean())
    return {name: float(value) for name, value in metrics.items()}

  def __call__(self, step: int, state) -> bool:
    if self.start is None:  # The clock starts once the first step is done.
      jax.block_until_ready(state)
      self.start = self.clock.now()
    if step not in self.steps:
      return False
    jax.block_until_ready(state)
    self.train_seconds += self.clock.now() - self.start
    evaluate_start = time.perf_counter()
    metrics = self.evaluate(step, state.ema_params)
    self.points.append({'step': step, 'train_seconds': self.train_seconds,
                        'eval_seconds': time.perf_counter() - evaluate_start, 'metrics': metrics})
    logging.info('step %d, %.2f training minutes: %s', step, self.train_seconds / 60, metrics)
    self.on_point()
    self.start = self.clock.now()
    return step == self.steps[-1]


def _write_json(path: str, value) -> None:
  """Writes `value` as JSON atomically, from process 0 only."""
  if jax.process_index() == 0:
    files.write_json(path, value)


def run_study(config: ml_collections.ConfigDict, variants: list[Variant], seeds: list[int],
              output: str, *, minutes: float | None = None, steps: int | None = None,
              evals: int = 5, num_videos: int = 64, calibration_steps: int = 30,
              eval_seed: int = 0, eval_spacing: str = 'linear') -> dict:
  """Trains every variant with every seed; returns the study and writes it to OUTPUT/study.json.

  See the module docstring for the budget, the timing and the evaluations.
  """
  if minutes is not None and steps is not None:
    raise ValueError('give a budget in --minutes or in --steps, not both')
  if epath.Path(output).is_dir() and any(epath.Path(output).iterdir()):
    raise FileExistsError(f'{output} is not empty; a study starts from scratch: pass a new '
                          '--output (or --replot to redraw its figures)')
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise ValueError(f'variant names must differ, got {names}')
  configs = [apply_overrides(config, v) for v in variants]  # Every typo fails before any run.
  study = {'config': config.to_dict(), 'budget': {'minutes': minutes, 'steps': steps},
           'evals': evals, 'num_videos': num_videos, 'eval_seed': eval_seed,
           'time': TIME_NOTE, 'cpu_count': os.cpu_count(), 'runs': []}
  path = os.path.join(output, 'study.json')
  for variant, variant_config in zip(variants, configs):
    total_steps = steps or variant_config.total_steps
    calibration = None
    if minutes is not None:
      calibration = seconds_per_step(variant_config, calibration_steps)
      total_steps = max(1, int(minutes * 60 / calibration))
      logging.info('%s: %.3f s per step, %d steps in %.1f minutes', variant.name, calibration,
                   total_steps, minutes)
    for seed in seeds:
      run = {'variant': variant.name, 'overrides': variant.overrides, 'seed': seed,
             'total_steps': total_steps, 'calibrated_seconds_per_step': calibration,
             'load_average_before': os.getloadavg(), 'points': []}
      study['runs'].append(run)
      workdir = os.path.join(output, 'runs', variant.name, f'seed_{seed}')
      with _Clock() as clock:
        curve = _Curve(_study_config(variant_config, total_steps, seed), workdir,
                       eval_steps(total_steps, evals, eval_spacing), num_videos, eval_seed, clock,
                       on_point=lambda: _write_json(path, study))
        run['points'] = curve.points
        train.train_and_evaluate(curve.config, workdir, step_hook=curve)
      run['load_average_after'] = os.getloadavg()
      _write_json(path, study)
  return study


def curves(study: dict, metric: str) -> dict[str, dict[str, list[float]]]:
  """Per variant, at each evaluation: training minutes and the metric's mean, min and max over
  seeds (the seeds of a variant run the same steps)."""
  grouped = {}
  for run in study['runs']:
    grouped.setdefault(run['variant'], []).append(run['points'])
  out = {}
  for variant, runs in grouped.items():
    count = min(len(points) for points in runs)
    if not count:
      continue
    minutes = [np.mean([p[i]['train_seconds'] for p in runs]) / 60 for i in range(count)]
    values = np.array([[p[i]['metrics'][metric] for i in range(count)] for p in runs])
    out[variant] = {'minutes': minutes, 'mean': values.mean(axis=0).tolist(),
                    'min': values.min(axis=0).tolist(), 'max': values.max(axis=0).tolist(),
                    'seeds': len(runs)}
  return out


def plot_study(study: dict, output: str, metrics=None) -> list[str]:
  """Writes `OUTPUT/<metric>.png` for each metric (default: the data set's headline metrics, or
  all of them); returns the paths."""
  points = [p for run in study['runs'] for p in run['points']]
  if not points:
    return []
  name = study['config']['data']['name']
  metrics = metrics or HEADLINE_METRICS.get(name) or sorted(points[0]['metrics'])
  paths = []
  for metric in metrics:
    fig = figure.Figure(figsize=(6, 4), layout='constrained')
    ax = fig.add_subplot()
    for variant, curve in curves(study, metric).items():
      line, = ax.plot(curve['minutes'], curve['mean'], marker='o',
                      label=f'{variant} ({curve["seeds"]} seed{"s" * (curve["seeds"] > 1)})')
      if curve['seeds'] > 1:
        ax.fill_between(curve['minutes'], curve['min'], curve['max'], color=line.get_color(),
                        alpha=0.2)
    ax.set_xlabel(f'training minutes (wall clock, {study["cpu_count"]} cores, evaluation excluded)')
    ax.set_ylabel(metric)
    ax.set_title(f'{name}: {metric} of {study["num_videos"]} samples (EMA weights)')
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(output, f'{metric}.png')
    files.write_with(path, lambda f: fig.savefig(f, format='png', dpi=120))
    paths.append(path)
  return paths


def _define_flags() -> None:
  """The command line's flags. They are defined only when this module runs as a program, so that
  the library imports beside other entry points that use the same names (`sample.py`)."""
  config_flags.DEFINE_config_file('config', None, 'Base experiment config file.',
                                  lock_config=True)
  flags.DEFINE_string('output', None, 'Directory for run workdirs, study.json and plots.')
  flags.DEFINE_multi_string('variant', ['base'],
                            "A variant 'NAME [FIELD=VALUE ...]' (repeat the flag for more).")
  flags.DEFINE_list('seeds', ['0'], 'Training seeds of every variant.')
  flags.DEFINE_float('minutes', None, 'Training budget per run in wall-clock minutes.')
  flags.DEFINE_integer('steps', None,
                       "Training budget per run in steps (default: each config's total_steps).")
  flags.DEFINE_integer('evals', 5, 'Evaluations per run (the last at its end).')
  flags.DEFINE_enum('eval_spacing', 'linear', EVAL_SPACINGS,
                    'Evaluation steps evenly spaced, or each twice the one before.')
  flags.DEFINE_integer('num_videos', 64, 'Videos sampled at each evaluation.')
  flags.DEFINE_integer('calibration_steps', 30, 'Steps timed per variant to fit --minutes.')
  flags.DEFINE_integer('eval_seed', 0, 'Seed of the evaluation noise.')
  flags.DEFINE_list('metrics', None, 'Metrics to plot (default: the headline ones).')
  flags.DEFINE_bool('replot', False, 'Only redraw the figures of OUTPUT/study.json.')
  flags.mark_flag_as_required('output')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if args.replot:
    study = json.loads(files.read_bytes(os.path.join(args.output, 'study.json')))
    print('\n'.join(plot_study(study, args.output, args.metrics)))
    return
  if args.config is None:
    raise app.UsageError('--config is required')
  study = run_study(
      args.config, [parse_variant(v) for v in args.variant], [int(s) for s in args.seeds],
      args.output, minutes=args.minutes, steps=args.steps, evals=args.evals,
      num_videos=args.num_videos, calibration_steps=args.calibration_steps,
      eval_seed=args.eval_seed, eval_spacing=args.eval_spacing)
  plot_study(study, args.output, args.metrics)
  for run in study['runs']:
    last = run['points'][-1] if run['points'] else {}
    print(json.dumps({'variant': run['variant'], 'seed': run['seed'],
                      'steps': run['total_steps'], **last}))


if __name__ == '__main__':
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
