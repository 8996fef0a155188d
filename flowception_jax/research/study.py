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
by the data set's exact metrics (`datasets.task_metrics`) and by `data_length_tv`, the total
variation between their length histogram and the data's (`config.evals.samples.num_data_videos`
clips); a GIF of them goes to the run's workdir.
`--task=i2v` scores image-to-video instead (shapes and camera): each video continues the first
frame of a held-out clip (`task_eval.held_out_clips`, the same clips at every evaluation), scored by
the same metrics, which on camera include the motion from the given frame on, with
`data_length_tv` against the lengths of those held-out clips; on shapes the continuation scores
(`datasets/shapes/tasks.py`, as `i2v_<score>`) join them. Variants then train for it, e.g.
`context.p_none=0.0 context.p_first=1.0`.

Time is training time: wall-clock seconds between blocking fetches of the train state, from the
end of the first step, with evaluation and JAX compilation (as `jax.monitoring` reports it) taken
out; the machine's core count and load averages are recorded with it. With `--minutes`, each
variant first trains `--calibration_steps` steps to time a step, and then runs the step count that
fills the budget, so that its learning-rate schedule ends with it; otherwise runs last `--steps`
(or each config's `total_steps`).

Writes `OUTPUT/study.json` when it starts, when a run starts and after every evaluation (whole
or not at all) and, at the end, `OUTPUT/<metric>.png` per metric: its mean over seeds against
training minutes per variant, the seeds' range shaded. `--replot` redraws the figures of an
existing study.

A stopped study resumes: the same command again keeps the results in `study.json`, skips the runs
whose evaluations are all there, and continues the others from the checkpoint in their workdir (a
SIGTERM saves the step it lands on; every evaluated step is saved), re-evaluating what was not
recorded; a variant keeps the step count it was given. A resumed run adds the training time it
had when it stopped (`stopped_at`, its last save included) and, as a run does, starts its clock
after its first step. A rerun whose definition differs (config, variants, seeds, budget,
evaluations) is refused, naming the differences.
"""

import ast
import dataclasses
import functools
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
from flowception_jax.core import tasks
from flowception_jax import datasets
from flowception_jax.datasets import metrics as metrics_lib
from flowception_jax.datasets.shapes import tasks as shapes_tasks
from flowception_jax.evaluation import evaluators
from flowception_jax.research import task_eval
from flowception_jax.storage import files
from flowception_jax.storage import video_io
from flowception_jax.training import checkpoint
from flowception_jax.training import train

# Metrics plotted by default, per data set (others: every metric their evaluation returns).
HEADLINE_METRICS = {
    'shapes': ('pass_share', 'clean_pixel_share', 'length_tv'),
    'coloring': ('rule_accuracy', 'palette_accuracy', 'length_tv'),
}
TIME_NOTE = ('training wall-clock seconds between blocking fetches of the train state, from the '
             'end of the first step, evaluation and JAX compilation excluded')
_GIF_VIDEOS = 16  # Videos in the GIF written at each evaluation.
EVAL_TASKS = ('generate', 'i2v')  # What the evaluations sample (`--task`).


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
  """Step hook that times steps 2 .. `last` (compilation excluded) and then ends the run;
  `seconds_per_step` stays None if the run stops (SIGTERM) before."""

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


def seconds_per_step(config: ml_collections.ConfigDict, steps: int) -> float | None:
  """Wall-clock seconds per training step of `config` (compilation excluded), timed over `steps`
  steps after the first; None if a SIGTERM stopped the timing."""
  with tempfile.TemporaryDirectory() as workdir, _Clock() as clock:
    timer = _StepTimer(clock, 1 + steps)
    # One step more than timed, so that the run stops before its only checkpoint.
    train.train_and_evaluate(_study_config(config, steps + 2, config.seed), workdir,
                             step_hook=timer)
  return timer.seconds_per_step


def _complete(points: list[dict], steps: tuple[int, ...]) -> bool:
  """Whether `points` hold the evaluations of every one of `steps`."""
  return [p['step'] for p in points] == list(steps)


class _Curve:
  """Step hook of one run: times training between blocking fetches, evaluates at `steps`, and
  ends the run after the last evaluation (whose step is the run's last, already saved).

  A resumed run passes the `points` it has recorded (the list is extended in place) and the
  `train_seconds` it had trained.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, steps: tuple[int, ...],
               num_videos: int, eval_seed: int, clock: _Clock, on_point,
               points: list[dict] | None = None, train_seconds: float = 0.0,
               task: str = 'generate'):
    source, self.info = datasets.make_source(config.data)
    self.config = train.resolve(config, source, self.info)
    self.workdir = workdir
    self.steps = steps
    self.num_videos = num_videos
    self.eval_seed = eval_seed
    self.task = task
    self.clock = clock
    self.on_point = on_point
    self.sampler = None
    self.start = None
    self.train_seconds = train_seconds
    self.points = [] if points is None else points

  @functools.cached_property
  def held_out(self) -> tuple[np.ndarray, np.ndarray]:
    """The held-out clips (and lengths) whose first frames i2v continues, read once."""
    return task_eval.held_out_clips(self.config.data, self.num_videos, 2)

  @functools.cached_property
  def data_lengths(self) -> np.ndarray:
    """int [M] lengths of the data's first clips, which generated lengths face, read once."""
    return evaluators.data_reference(self.config.data,
                                     self.config.evals.samples.num_data_videos).lengths

  def evaluate(self, step: int, params) -> dict[str, float]:
    """The data set's metrics of `num_videos` videos sampled from `params`, from the same noise
    (and, for i2v, the same first frames) at every evaluation; their GIF goes to the workdir."""
    if self.sampler is None:
      model = model_lib.build_for(self.config, self.info)
      self.sampler = inference.VideoSampler(model, self.config, self.info,
                                            batch_size=self.num_videos)
    inputs = None
    if self.task == 'i2v':
      clips, reference_lengths = self.held_out
      inputs = tasks.sampler_inputs('i2v', clips[:, :1], self.num_videos, self.info.max_frames,
                                    self.config.flow.num_start_frames,
                                    np.random.default_rng(self.eval_seed))
    else:
      reference_lengths = self.data_lengths
    out = self.sampler(params, jax.random.key(self.eval_seed), self.num_videos, inputs=inputs)
    lengths = np.asarray(out.lengths)
    videos = inference.to_pixels(out.frames, lengths)
    if jax.process_index() == 0:
      video_io.write_gif(os.path.join(self.workdir, f'samples_{step:06d}.gif'),
                         video_io.video_grid(videos[:_GIF_VIDEOS], lengths[:_GIF_VIDEOS]))
    metrics = datasets.task_metrics(self.config.data.name, videos, lengths, self.config.data)
    metrics['mean_length'] = float(lengths.mean())
    metrics['data_length_tv'] = metrics_lib.length_statistics(
        lengths, reference_lengths)['data_length_tv']
    if self.task == 'i2v' and self.config.data.name == 'shapes':
      scores = shapes_tasks.continuation_scores(videos, lengths, clips, reference_lengths, 1)
      metrics.update({f'i2v_{name}': value for name, value in shapes_tasks.summarize(
          scores).items() if not name.endswith(('_se', '_count'))})
    return {name: float(value) for name, value in metrics.items()}

  def record(self, step: int, params) -> None:
    """Evaluates `params` at `step` and records the point, in place of any at or after `step`
    (a run resumed from an earlier checkpoint than its records evaluates those steps again)."""
    evaluate_start = time.perf_counter()
    metrics = self.evaluate(step, params)
    self.points[:] = [p for p in self.points if p['step'] < step]
    self.points.append({'step': step, 'train_seconds': self.train_seconds,
                        'eval_seconds': time.perf_counter() - evaluate_start, 'metrics': metrics})
    logging.info('step %d, %.2f training minutes: %s', step, self.train_seconds / 60, metrics)
    self.on_point()

  def elapsed(self) -> float:
    """Training seconds so far, the part since the last evaluation included."""
    return self.train_seconds + (0.0 if self.start is None else self.clock.now() - self.start)

  def __call__(self, step: int, state) -> bool:
    if self.start is None:  # The clock starts once the first step is done.
      jax.block_until_ready(state)
      self.start = self.clock.now()
    if step not in self.steps:
      return False
    jax.block_until_ready(state)
    self.train_seconds += self.clock.now() - self.start
    self.record(step, state.ema_params)
    self.start = self.clock.now()
    return step == self.steps[-1]


def _saved_step(workdir: str) -> int:
  """The step of the latest checkpoint in `workdir`, where training there resumes (0: none)."""
  if not epath.Path(workdir, 'checkpoints').exists():
    return 0
  manager = checkpoint.make_manager(workdir, read_only=True)
  step = manager.latest_step()
  manager.close()
  return step or 0


def _resumed_seconds(run: dict, step: int) -> float:
  """The training seconds `run` had at its saved `step`: those of its stop there, else those of
  its last evaluation (at `step` when it was saved for it)."""
  stopped = run.get('stopped_at')
  if stopped and stopped['step'] == step:
    return stopped['train_seconds']
  return run['points'][-1]['train_seconds'] if run['points'] else 0.0


def _train_run(run: dict, config: ml_collections.ConfigDict, workdir: str,
               steps: tuple[int, ...], num_videos: int, eval_seed: int, on_point,
               task: str = 'generate') -> bool:
  """Trains the run `run` records in `workdir`, from its checkpoint if it has one, evaluating at
  `steps` into `run['points']`; whether it is complete (False: a SIGTERM stopped it, and
  `run['stopped_at']` holds the step and the training seconds it had)."""
  saved = _saved_step(workdir)
  run['points'] = [p for p in run['points'] if p['step'] <= saved]
  if saved:
    run['resumed_from'].append(saved)
  with _Clock() as clock:
    curve = _Curve(config, workdir, steps, num_videos, eval_seed, clock, on_point,
                   points=run['points'], train_seconds=_resumed_seconds(run, saved), task=task)
    if saved in steps and not any(p['step'] == saved for p in run['points']):
      curve.record(saved, inference.load(workdir, step=saved).params)  # Stopped evaluating it.
    if not _complete(run['points'], steps):
      state = train.train_and_evaluate(curve.config, workdir, step_hook=curve, save_steps=steps)
      if not _complete(run['points'], steps):
        run['stopped_at'] = {'step': int(state.step), 'train_seconds': curve.elapsed()}
        return False
  run.pop('stopped_at', None)
  return True


def _write_json(path: str, value) -> None:
  """Writes `value` as JSON atomically, from process 0 only."""
  if jax.process_index() == 0:
    files.write_json(path, value)


def _as_json(value):
  """`value` as JSON reads it back (tuples as lists), so saved and new values compare equal."""
  return json.loads(json.dumps(value))


def study_definition(config: ml_collections.ConfigDict, variants: list[Variant], seeds: list[int],
                     *, minutes: float | None, steps: int | None, evals: int, num_videos: int,
                     calibration_steps: int, eval_seed: int, eval_spacing: str,
                     task: str = 'generate') -> dict:
  """What a study's results depend on (the arguments of `run_study`), as JSON values."""
  return _as_json({
      'config': config.to_dict(),
      'variants': [{'name': v.name, 'overrides': v.overrides} for v in variants],
      'seeds': list(seeds), 'budget': {'minutes': minutes, 'steps': steps}, 'evals': evals,
      'eval_spacing': eval_spacing, 'num_videos': num_videos, 'eval_seed': eval_seed, 'task': task,
      'calibration_steps': None if minutes is None else calibration_steps})


def _differences(saved, current, path: str = '', added: list[str] | None = None) -> list[str]:
  """Where two JSON values differ, one line per dotted field (dicts are compared field by
  field, other values whole). With `added`, fields only in `current` go there instead."""
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return [] if saved == current else [f'{path}: {saved!r} in study.json, {current!r} now']
  lines = []
  for key in sorted(saved.keys() | current.keys()):
    field = f'{path}.{key}' if path else key
    if key not in current:
      lines.append(f'{field}: only in study.json')
    elif key not in saved:
      if added is None:
        lines.append(f'{field}: not in study.json')
      else:
        added.append(field)
    else:
      lines += _differences(saved[key], current[key], field, added)
  return lines


def _saved_study(output: str, definition: dict) -> dict | None:
  """The study in `OUTPUT/study.json` to resume, None if `output` is new or empty.

  Refuses a saved study of another definition, naming the differences, and an output that holds
  files but no study. Config fields the saved study predates are not differences.
  """
  path = os.path.join(output, 'study.json')
  if files.exists(path):
    study = json.loads(files.read_bytes(path))
    others = lambda d: {k: v for k, v in d.items() if k != 'config'}
    # Config fields added to the code since the study was saved: their defaults keep what the code
    # did before they existed, so the study resumes (other differences refuse it).
    added = []
    differences = (_differences(others({k: study[k] for k in definition if k in study}),
                                others(definition))
                   + _differences(study.get('config'), definition['config'], 'config', added))
    if added:
      logging.warning('%s predates the config fields %s; resuming with their values now', path,
                      ', '.join(added))
    if differences:
      raise ValueError(f'{path} holds a study of another definition ({"; ".join(differences)}); '
                       'run the command that started it to resume it, or pass a new --output')
    return study
  if epath.Path(output).is_dir() and any(epath.Path(output).iterdir()):
    raise FileExistsError(f'{output} holds files but no study.json; pass a new --output')
  return None


def _variant_budget(study: dict, variant: Variant, config: ml_collections.ConfigDict,
                    minutes: float | None, steps: int | None,
                    calibration_steps: int) -> tuple[int, float | None] | None:
  """(total steps, calibrated seconds per step or None) of a variant's runs: those its recorded
  runs have (a resumed run keeps its schedule), else `steps`, the config's, or what fills
  `minutes`; None if a SIGTERM stopped the calibration."""
  recorded = [run for run in study['runs'] if run['variant'] == variant.name]
  if recorded:
    return recorded[0]['total_steps'], recorded[0]['calibrated_seconds_per_step']
  if minutes is None:
    return steps or config.total_steps, None
  calibration = seconds_per_step(config, calibration_steps)
  if calibration is None:
    return None
  total_steps = max(1, int(minutes * 60 / calibration))
  logging.info('%s: %.3f s per step, %d steps in %.1f minutes', variant.name, calibration,
               total_steps, minutes)
  return total_steps, calibration


def run_study(config: ml_collections.ConfigDict, variants: list[Variant], seeds: list[int],
              output: str, *, minutes: float | None = None, steps: int | None = None,
              evals: int = 5, num_videos: int = 64, calibration_steps: int = 30,
              eval_seed: int = 0, eval_spacing: str = 'linear', task: str = 'generate') -> dict:
  """Trains every variant with every seed; returns the study and writes it to OUTPUT/study.json.

  Resumes the study saved in `output` (its definition must be the same); a SIGTERM ends it early,
  its state saved. See the module docstring for the budget, the timing, the evaluations and the
  resumption.
  """
  if minutes is not None and steps is not None:
    raise ValueError('give a budget in --minutes or in --steps, not both')
  if task not in EVAL_TASKS:
    raise ValueError(f'unknown --task {task!r}; choose one of {", ".join(EVAL_TASKS)}')
  if task == 'i2v' and config.data.name not in task_eval.HELD_OUT_SETS:
    raise ValueError(f'--task=i2v continues held-out clips of '
                     f'{" or ".join(task_eval.HELD_OUT_SETS)} only, not of {config.data.name!r}; '
                     'use --config=configs/shapes.py or configs/camera.py, or --task=generate')
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise ValueError(f'variant names must differ, got {names}')
  configs = [apply_overrides(config, v) for v in variants]  # Every typo fails before any run.
  definition = study_definition(config, variants, seeds, minutes=minutes, steps=steps,
                                evals=evals, num_videos=num_videos,
                                calibration_steps=calibration_steps, eval_seed=eval_seed,
                                eval_spacing=eval_spacing, task=task)
  study = _saved_study(output, definition) or dict(definition, time=TIME_NOTE,
                                                   cpu_count=os.cpu_count(), runs=[])
  write = functools.partial(_write_json, os.path.join(output, 'study.json'), study)
  write()
  for variant, variant_config in zip(variants, configs):
    budget = _variant_budget(study, variant, variant_config, minutes, steps, calibration_steps)
    if budget is None:
      logging.warning('SIGTERM: stopped calibrating %s; the same command resumes the study',
                      variant.name)
      return study
    total_steps, calibration = budget
    evaluated = eval_steps(total_steps, evals, eval_spacing)
    for seed in seeds:
      run = next((r for r in study['runs'] if (r['variant'], r['seed']) == (variant.name, seed)),
                 None)
      if run is None:
        run = {'variant': variant.name, 'overrides': variant.overrides, 'seed': seed,
               'total_steps': total_steps, 'calibrated_seconds_per_step': calibration,
               'load_average_before': os.getloadavg(), 'resumed_from': [], 'points': []}
        study['runs'].append(run)
        write()
      if _complete(run['points'], evaluated):
        continue
      workdir = os.path.join(output, 'runs', variant.name, f'seed_{seed}')
      if not _train_run(run, _study_config(variant_config, total_steps, seed), workdir, evaluated,
                        num_videos, eval_seed, write, task):
        write()
        logging.warning('SIGTERM: stopped %s seed %d at step %d; the same command resumes the '
                        'study', variant.name, seed, run['stopped_at']['step'])
        return study
      run['load_average_after'] = os.getloadavg()
      write()
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
  flags.DEFINE_string('output', None, 'Directory for run workdirs, study.json and plots; the same '
                      'command again resumes the study there.')
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
  flags.DEFINE_enum('task', 'generate', EVAL_TASKS,
                    'What evaluations sample: plain generation, or image-to-video from held-out '
                    'first frames (shapes).')
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
      eval_seed=args.eval_seed, eval_spacing=args.eval_spacing, task=args.task)
  plot_study(study, args.output, args.metrics)
  for run in study['runs']:
    last = run['points'][-1] if run['points'] else {}
    print(json.dumps({'variant': run['variant'], 'seed': run['seed'],
                      'steps': run['total_steps'], **last}))


if __name__ == '__main__':
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
