"""The learning-curve study: variants and budgets, end to end on a tiny config, resumption, curves
and plots."""

import copy
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import camera as camera_config
from configs import shapes as shapes_config
from flowception_jax.core import inference
from flowception_jax import datasets
from flowception_jax.core import model as model_lib
from flowception_jax.research import study
from flowception_jax.storage import files


def test_variants_parse_and_override_existing_fields_only():
  variant = study.parse_variant(
      'heun sampler.solver=heun data.buckets=(4,8) optim.learning_rate=1e-3')
  assert variant == study.Variant('heun', {'sampler.solver': 'heun', 'data.buckets': (4, 8),
                                           'optim.learning_rate': 1e-3})
  base = shapes_config.get_config()
  config = study.apply_overrides(base, variant)
  assert (config.sampler.solver, config.data.buckets, config.optim.learning_rate) == (
      'heun', (4, 8), 1e-3)
  assert base.sampler.solver == 'euler'  # The base config is left alone.
  with pytest.raises(ValueError, match="no field 'optim.learning_rat'"):
    study.apply_overrides(base, study.parse_variant('typo optim.learning_rat=1e-3'))
  with pytest.raises(ValueError, match='wrong type'):
    study.apply_overrides(base, study.parse_variant('bad optim.learning_rate=fast'))
  with pytest.raises(ValueError, match='FIELD=VALUE'):
    study.parse_variant('bad learning_rate')
  assert study.eval_steps(10, 3) == (3, 7, 10) and study.eval_steps(2, 5) == (1, 2)
  assert study.eval_steps(1000, 4, 'log') == (125, 250, 500, 1000)
  assert study.eval_steps(4, 5, 'log') == (1, 2, 4)
  with pytest.raises(ValueError, match='--eval_spacing'):
    study.eval_steps(10, 3, 'cubic')


def _tiny_config() -> ml_collections.ConfigDict:
  config = shapes_config.get_config('tiny')
  config.data.num_threads = 1
  config.data.buckets = (12,)  # One train-step compilation.
  return config


@pytest.mark.e2e
def test_a_tiny_study_end_to_end(tmp_path):
  """One variant, two evaluations: they land in study.json, a GIF and the plots."""
  config = _tiny_config()
  variant = study.parse_variant('weighted flow.velocity_weighting=logit_normal')
  output = str(tmp_path / 'study')
  result = study.run_study(config, [variant], [3], output, steps=4, evals=2, num_videos=2)
  saved = json.load(open(os.path.join(output, 'study.json')))
  assert saved == json.loads(json.dumps(result))
  (run,) = saved['runs']
  assert (run['variant'], run['seed'], run['overrides'], run['total_steps']) == (
      'weighted', 3, variant.overrides, 4)
  assert [p['step'] for p in run['points']] == [2, 4]
  assert all(isinstance(p['train_seconds'], float) for p in run['points'])  # Not timed: no bounds.
  for point in run['points']:
    assert 0 <= point['metrics']['pass_share'] <= 1 and point['metrics']['mean_length'] >= 1
    assert 0 <= point['metrics']['data_length_tv'] <= 1
  workdir = os.path.join(output, 'runs', 'weighted', 'seed_3')
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['4']
  assert os.path.isfile(os.path.join(workdir, 'samples_000004.gif'))
  paths = study.plot_study(saved, output)
  assert sorted(os.path.basename(p) for p in paths) == [
      'clean_pixel_share.png', 'length_tv.png', 'pass_share.png']
  assert all(os.path.getsize(p) > 0 for p in paths)
  with pytest.raises(ValueError, match=re.escape('seeds: [3] in study.json, [0] now')):
    study.run_study(config, [variant], [0], output, steps=4, evals=2, num_videos=2)


def _rows(result: dict) -> list[tuple]:
  """What a study found, run by run: the run, and its evaluations' steps and metrics."""
  return [(run['variant'], run['seed'], run['overrides'], run['total_steps'],
           [(p['step'], p['metrics']) for p in run['points']]) for run in result['runs']]


@pytest.mark.e2e
def test_a_stopped_study_resumes_where_it_stopped(tmp_path, monkeypatch):
  """A SIGTERM stops the second run between its evaluations; the same command finishes the study,
  training only what was left. Both variants are the same config and seed, so the first run,
  uninterrupted, gives the rows the second must end with."""
  config, variants, seeds = _tiny_config(), [study.parse_variant('first'),
                                             study.parse_variant('second')], [0]
  flags = dict(steps=4, evals=2, num_videos=2)
  output = str(tmp_path)
  hook = study._Curve.__call__

  def sigterm_at_step_3_of_the_second_run(curve, step, state):
    if step == 3 and os.path.join('second', 'seed_0') in curve.workdir:
      os.kill(os.getpid(), signal.SIGTERM)  # The trainer's handler saves the step and stops.
    return hook(curve, step, state)

  with monkeypatch.context() as patch:
    patch.setattr(study._Curve, '__call__', sigterm_at_step_3_of_the_second_run)
    stopped = study.run_study(config, variants, seeds, output, **flags)
  assert json.load(open(os.path.join(output, 'study.json'))) == json.loads(json.dumps(stopped))
  first, second = stopped['runs']
  assert [p['step'] for p in first['points']] == [2, 4]
  assert [p['step'] for p in second['points']] == [2] and second['stopped_at']['step'] == 3

  trained = []
  train_and_evaluate = study.train.train_and_evaluate
  monkeypatch.setattr(study.train, 'train_and_evaluate', lambda config, workdir, **kwargs: (
      trained.append(workdir), train_and_evaluate(config, workdir, **kwargs))[1])
  resumed = study.run_study(config, variants, seeds, output, **flags)
  assert trained == [os.path.join(output, 'runs', 'second', 'seed_0')]
  assert resumed['runs'][0] == json.loads(json.dumps(first))  # Kept as it was.
  assert resumed['runs'][1]['resumed_from'] == [3] and 'stopped_at' not in resumed['runs'][1]
  rows = _rows(resumed)
  assert rows[1] == ('second',) + rows[0][1:]
  assert _rows(json.load(open(os.path.join(output, 'study.json')))) == rows

  # Stopped while evaluating its saved last step: that step is evaluated from the checkpoint.
  lost = dict(resumed, runs=[dict(resumed['runs'][0], points=resumed['runs'][0]['points'][:1])]
              + resumed['runs'][1:])
  files.write_json(os.path.join(output, 'study.json'), lost)
  trained.clear()
  again = study.run_study(config, variants, seeds, output, **flags)
  assert not trained and _rows(again) == rows

  with pytest.raises(ValueError, match=re.escape('evals: 2 in study.json, 3 now')):
    study.run_study(config, variants, seeds, output, **dict(flags, evals=3))


def test_a_rerun_of_another_definition_is_refused_before_any_training(tmp_path, monkeypatch):
  monkeypatch.setattr(study.train, 'train_and_evaluate', None)  # Calling it would fail the test.
  config = shapes_config.get_config('tiny')
  variants = [study.parse_variant('base'), study.parse_variant('fast optim.learning_rate=1e-3')]
  same = dict(config=config, variants=variants, seeds=[0], output=str(tmp_path), steps=4,
              evals=2, num_videos=2)
  definition = study.study_definition(
      config, variants, [0], minutes=None, steps=4, evals=2, num_videos=2, calibration_steps=30,
      eval_seed=0, eval_spacing='linear')
  files.write_json(str(tmp_path / 'study.json'), dict(definition, runs=[]))
  faster = ml_collections.ConfigDict(config.to_dict())
  faster.optim.learning_rate = 0.5
  changes = {
      'seeds: [0] in study.json, [0, 1] now': dict(seeds=[0, 1]),
      'config.optim.learning_rate: 0.002 in study.json, 0.5 now': dict(config=faster),
      "variants: [{'name': 'base', 'overrides': {}}, {'name': 'fast', 'overrides': "
      "{'optim.learning_rate': 0.001}}] in study.json, [{'name': 'base', 'overrides': {}}] now":
          dict(variants=variants[:1]),
      'budget.minutes: None in study.json, 5.0 now; budget.steps: 4 in study.json, None now; '
      'calibration_steps: None in study.json, 30 now': dict(minutes=5.0, steps=None),
      "eval_spacing: 'linear' in study.json, 'log' now": dict(eval_spacing='log'),
  }
  for message, change in changes.items():
    with pytest.raises(ValueError, match=re.escape(message) + '.*pass a new --output'):
      study.run_study(**(same | change))
  del definition['eval_spacing']  # A study.json that predates a field of the definition.
  files.write_json(str(tmp_path / 'study.json'), dict(definition, runs=[]))
  with pytest.raises(ValueError, match='eval_spacing: not in study.json'):
    study.run_study(**same)
  # A config field added to the code since the study was saved is not a difference: it resumes.
  current = dict(definition, eval_spacing='linear')
  saved = copy.deepcopy(current)
  del saved['config']['sampler']['staged']
  files.write_json(str(tmp_path / 'study.json'), dict(saved, runs=[]))
  assert study._saved_study(str(tmp_path), current)['config'] == saved['config']
  with pytest.raises(ValueError) as refusal:
    study._saved_study(str(tmp_path), dict(current, evals=3))
  assert 'evals: 2 in study.json, 3 now' in str(refusal.value)
  assert 'staged' not in str(refusal.value)
  os.remove(tmp_path / 'study.json')
  (tmp_path / 'notes.txt').write_text('not a study')
  with pytest.raises(FileExistsError, match='no study.json; pass a new --output'):
    study.run_study(**same)


def _fake_wall_clock(monkeypatch) -> list[float]:
  """Replaces the study's wall clock by a list whose first item the test advances."""
  now = [100.0]
  monkeypatch.setattr(study.time, 'perf_counter', lambda: now[0])
  return now


def test_the_clock_leaves_compilation_out(monkeypatch):
  now = _fake_wall_clock(monkeypatch)
  with study._Clock() as clock:
    start = clock.now()
    now[0] += 10.0  # Ten seconds, of which JAX reports four compiling.
    jax.monitoring.record_event_duration_secs('/jax/core/compile/backend_compile_duration', 3.0,
                                              fun_name='f')
    jax.monitoring.record_event_duration_secs('/jax/core/compile/jaxpr_trace_duration', 1.0,
                                              fun_name='f')
    jax.monitoring.record_event_duration_secs('/jax/study_test/not_a_compilation', 5.0)
    assert clock.compile_seconds == 4.0 and clock.now() - start == 6.0
  jax.monitoring.record_event_duration_secs('/jax/core/compile/backend_compile_duration', 7.0,
                                            fun_name='f')
  assert clock.compile_seconds == 4.0  # The clock is closed: not counted.
  function, x = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) ** 2) @ x), jnp.arange(1000.0)
  y = jax.block_until_ready(x + 1)
  with study._Clock() as clock:  # JAX's own events reach it: a compilation, then none.
    jax.block_until_ready(function(x))
    compiled = clock.compile_seconds
    jax.block_until_ready(function(y))
  assert compiled > 0 and clock.compile_seconds == compiled


def test_step_timer_times_the_steps_after_the_first_and_stops(monkeypatch):
  now = _fake_wall_clock(monkeypatch)
  with study._Clock() as clock:
    timer = study._StepTimer(clock, last=4)
    stops = []
    for step in range(1, 5):
      now[0] += 5.0 if step == 1 else 0.5  # The first step compiles and is left out.
      stops.append(timer(step, jnp.zeros(())))
  assert stops == [False, False, False, True]
  assert timer.seconds_per_step == 0.5


def test_curves_average_seeds_and_span_their_range():
  def run(variant, seed, values):
    return {'variant': variant, 'seed': seed, 'points': [
        {'step': 10 * (i + 1), 'train_seconds': 60.0 * (i + 1) + seed,
         'metrics': {'pass_share': v}} for i, v in enumerate(values)]}

  fake = {'runs': [run('a', 0, [0.1, 0.5]), run('a', 1, [0.3, 0.7]), run('b', 0, [0.2])]}
  curves = study.curves(fake, 'pass_share')
  np.testing.assert_allclose(curves['a']['minutes'], [1 + 0.5 / 60, 2 + 0.5 / 60])
  np.testing.assert_allclose(curves['a']['mean'], [0.2, 0.6])
  np.testing.assert_allclose(curves['a']['min'], [0.1, 0.5])
  np.testing.assert_allclose(curves['a']['max'], [0.3, 0.7])
  assert curves['b'] == {'minutes': [1.0], 'mean': [0.2], 'min': [0.2], 'max': [0.2], 'seeds': 1}


def test_study_json_is_written_whole_and_readable_by_others(tmp_path):
  path = str(tmp_path / 'study.json')
  study._write_json(path, {'runs': [1, 2]})
  study._write_json(path, {'runs': [3]})  # Rewritten in place after every evaluation.
  assert json.load(open(path)) == {'runs': [3]}
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert os.listdir(tmp_path) == ['study.json']  # No temporary file left behind.


def test_a_full_sequence_curve_samples_lengths_as_its_training_measures(tmp_path):
  config = shapes_config.get_config('tiny')
  config.method = 'full_sequence'
  with study._Clock() as clock:
    curve = study._Curve(config, str(tmp_path), (1,), 2, 0, clock, on_point=lambda: None)
  lengths = np.asarray(curve.config.length_distribution)
  # Shapes clips are uniform on [min_frames, max_frames] = [4, 12].
  assert lengths.shape == (13,) and np.all(lengths[:4] == 0)
  np.testing.assert_allclose(lengths[4:], 1 / 9, atol=0.04)
  model = model_lib.build_for(curve.config, curve.info)
  inference.VideoSampler(model, curve.config, curve.info, batch_size=2)  # Built with the lengths.
  without = ml_collections.ConfigDict(curve.config.to_dict())
  del without['length_distribution']
  with pytest.raises(ValueError, match=r'the full_sequence sampler needs the length distribution '
                                       r'that training measures \(config\.length_distribution'):
    inference.VideoSampler(model, without, curve.info, batch_size=2)


@pytest.mark.parametrize('data', ['shapes', 'camera'])
def test_an_image_to_video_curve_continues_held_out_first_frames(data, tmp_path, monkeypatch):
  """`--task=i2v`: every video starts with its held-out clip's first frame, scored by the set's
  metrics, joined on shapes by the continuation scores; a set without held-out clips is refused
  before any training."""
  config = (shapes_config if data == 'shapes' else camera_config).get_config('tiny')
  config.context.update(p_none=0.0, p_first=1.0)
  with study._Clock() as clock:
    curve = study._Curve(config, str(tmp_path), (1,), 3, 0, clock, on_point=lambda: None,
                         task='i2v')
  model = model_lib.build_for(curve.config, curve.info)
  # Jitted: one compilation, cheaper than the initialisation's operations one by one.
  params = jax.jit(lambda key: model_lib.init_params(model, curve.info, 4, key))(jax.random.key(0))
  original = inference.VideoSampler.__call__
  seen = []

  def keep_videos(self, *args, **kwargs):
    seen.append(original(self, *args, **kwargs))
    return seen[-1]

  monkeypatch.setattr(inference.VideoSampler, '__call__', keep_videos)
  metrics = curve.evaluate(1, params)
  clips, clip_lengths = study.task_eval.held_out_clips(curve.config.data, 3, 2)
  (out,) = seen
  np.testing.assert_allclose(inference.to_pixels(out.frames, out.lengths)[:, 0], clips[:, 0],
                             atol=1 / 255)
  lengths = np.asarray(out.lengths)
  bins = max(lengths.max(), clip_lengths.max()) + 1
  shares = [np.bincount(x, minlength=bins) / len(x) for x in (lengths, clip_lengths)]
  assert metrics['data_length_tv'] == pytest.approx(0.5 * np.abs(shares[0] - shares[1]).sum())
  if data == 'shapes':
    assert {'i2v_position_error', 'i2v_tracked', 'i2v_length_error', 'clean_pixel_share'} <= set(
        metrics)
    assert 0 <= metrics['i2v_tracked'] <= 1
  else:
    assert {'motion_explained', 'motion_rmse', 'mean_length'} <= set(metrics)
    assert not any(name.startswith('i2v_') for name in metrics)
  coloring = ml_collections.ConfigDict(config.to_dict())
  coloring.data.name = 'coloring'
  with pytest.raises(ValueError, match='--task=i2v continues held-out clips of shapes or camera'):
    study.run_study(coloring, [study.parse_variant('base')], [0], str(tmp_path / 'c'), steps=2,
                    task='i2v')
  assert not os.path.exists(tmp_path / 'c')


def test_held_out_camera_clips_are_views_of_photos_training_never_sees():
  """Clips over the test photos, none of which is a training photo."""
  data = camera_config.get_config().data
  clips, lengths = study.task_eval.held_out_clips(data, 4, 3)
  assert np.all(lengths >= 3) and clips.shape[:2] == (4, data.max_frames)
  train = datasets.make_source(data)[0]
  test = datasets.make_source(ml_collections.ConfigDict({**data.to_dict(), 'split': 'test'}))[0]
  assert not {p.tobytes() for p in train.photos} & {p.tobytes() for p in test.photos}
  # Each held-out clip is a record of the test split under the next seed.
  held = datasets.make_source(ml_collections.ConfigDict(
      {**data.to_dict(), 'split': 'test', 'seed': data.seed + 1}))[0]
  found = [r['video'] for r in (held[i] for i in range(40)) if len(r['video']) >= 3][:4]
  for clip, length, video in zip(clips, lengths, found):
    np.testing.assert_array_equal(clip[:length], video)
