"""The learning-curve study: variants and budgets, end to end on a tiny config, curves and plots."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shapes as shapes_config
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax.research import study


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


@pytest.mark.e2e
def test_a_tiny_study_end_to_end(tmp_path):
  """One variant, two evaluations: they land in study.json, a GIF and the plots."""
  config = shapes_config.get_config('tiny')
  config.data.num_threads = 1
  config.data.buckets = (12,)  # One train-step compilation.
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
  workdir = os.path.join(output, 'runs', 'weighted', 'seed_3')
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['4']
  assert os.path.isfile(os.path.join(workdir, 'samples_000004.gif'))
  paths = study.plot_study(saved, output)
  assert sorted(os.path.basename(p) for p in paths) == [
      'clean_pixel_share.png', 'length_tv.png', 'pass_share.png']
  assert all(os.path.getsize(p) > 0 for p in paths)
  with pytest.raises(FileExistsError, match='--output'):
    study.run_study(config, [variant], [0], output, steps=2)


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
