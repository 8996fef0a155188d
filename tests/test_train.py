"""Trainer end to end: compile counts, the NaN guard, bad workdirs, sampling.

Interrupted and resumed runs, as real processes, are in `test_faults.py`.
"""

import ast
import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import coloring
from flowception_jax import datasets
from flowception_jax import sample
from flowception_jax.core import model as model_lib
from flowception_jax.training import checkpoint
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding
from flowception_jax.training import train
from tests import compilations
from tests import tiny_params


def _config(**overrides):
  """The tiny coloring config with two buckets, so the bucketing iterator state is exercised."""
  config = coloring.get_config('tiny')
  config.data.buckets = (16, 30)
  config.data.num_threads = 1
  config.evals.samples.every = 0
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('__')
    functools.reduce(getattr, parents, config)[leaf] = value
  return config


@pytest.mark.e2e  # 12 steps of the real trainer, two bucket compilations.
def test_train_step_compiles_once_per_bucket():
  config = _config()
  source, info = datasets.make_source(config.data)
  config = train.resolve(config, source, info)
  mesh = sharding.make_mesh(config.mesh)
  model, tx, init_fn = train.build(config, info)
  _, shardings = train.state_layout(init_fn, mesh)
  dataset = input_pipeline.make_train_dataset(source,
                                              config.data,
                                              config.flow,
                                              batch_size=config.batch_size,
                                              seed=0,
                                              max_frames=info.max_frames)
  step_fn = train.jit_train_step(model, tx, config, mesh, shardings)
  state = train.init_sharded(init_fn, mesh, shardings, jax.random.key(0))
  batches = [b for _, b in zip(range(12), iter(dataset))]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), \
       compilations.counted() as compiles:
    seen = set()
    for batch in batches:
      seen.add(batch['frames'].shape[1])
      state, metrics = step_fn(state, sharding.to_global_batch(batch, mesh))
  assert seen == {16, 30}
  assert compiles['train_step'] == len(seen)
  assert int(state.step) == 12 and np.isfinite(float(metrics['loss']))
  assert 0.0 < float(metrics['visible_share']) <= 1.0


def test_ema_forgets_the_initialisation_early_and_settles_at_the_decay():
  decays = np.asarray(jax.vmap(lambda s: train.ema_decay(s, 0.999))(np.arange(20_000)))
  assert np.all(np.diff(decays) >= 0) and np.all((decays > 0) & (decays <= 0.999))
  assert decays[-1] == np.float32(0.999)
  # Weight left on the initial parameters after 1000 updates (a constant 0.999 leaves e^-1).
  assert np.prod(decays[:1000].astype(np.float64)) < 0.01


def test_padded_slots_change_no_loss():
  config = _config()
  source, info = datasets.make_source(config.data)
  config = train.resolve(config, source, info)
  model, _, _ = train.build(config, info)
  # Every parameter perturbed, so the zero-initialised heads and gates carry signal.
  params = tiny_params.perturbed_init(model, *model_lib.init_inputs(
      info.frame_shape, min(config.data.buckets), info.num_classes))['params']
  dataset = input_pipeline.make_train_dataset(source, config.data, config.flow, batch_size=4,
                                              seed=0, max_frames=info.max_frames)
  batch = next(b for b in iter(dataset) if not b['frame_mask'].all())
  pad = ~batch['frame_mask']
  rng = np.random.default_rng(0)
  garbage = dict(
      batch,
      frames=np.where(pad[..., None, None, None], rng.normal(size=batch['frames'].shape),
                      batch['frames']).astype(np.float32),
      frame_times=np.where(pad, 0.5, batch['frame_times']).astype(np.float32),
      insert_targets=np.where(pad, 3, batch['insert_targets']).astype(np.int32))
  losses = functools.partial(jax.jit(functools.partial(
      train.compute_losses, model=model, flow_config=config.flow, num_classes=0)), params,
                             key=jax.random.key(2))
  (loss_a, aux_a), (loss_b, aux_b) = losses(batch), losses(garbage)
  assert float(loss_a) > 0
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  np.testing.assert_allclose(float(aux_a['rate_loss']), float(aux_b['rate_loss']), rtol=1e-6)
  # The same garbage in a real slot does change the loss.
  real = dict(garbage, frame_mask=np.ones_like(pad), rate_mask=np.ones_like(pad))
  assert abs(float(losses(real)[0]) - float(loss_a)) > 1e-3


@pytest.mark.e2e
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  original = sharding.to_global_batch
  calls = {'n': 0}

  def poisoned(batch, mesh):
    calls['n'] += 1
    if calls['n'] == 12:
      batch = dict(batch, frames=np.full_like(batch['frames'], np.nan))
    return original(batch, mesh)

  monkeypatch.setattr(sharding, 'to_global_batch', poisoned)
  with pytest.raises(FloatingPointError, match='step 12.*last good checkpoint .step 10'):
    train.train_and_evaluate(_config(), str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path))
  assert manager.all_steps() == [10]


@pytest.mark.e2e
def test_incompatible_workdir_and_bad_config_are_refused(tmp_path):
  train.train_and_evaluate(_config(total_steps=2, checkpoint_every=2), str(tmp_path))
  with pytest.raises(ValueError, match='incompatible config.*model.size'):
    train.train_and_evaluate(_config(total_steps=4, model__size='mini'), str(tmp_path))
  with pytest.raises(ValueError, match='--config.model.patch_size'):
    train.train_and_evaluate(_config(model__patch_size=2), str(tmp_path / 'other'))
  with pytest.raises(ValueError, match='--config.data.buckets'):
    train.train_and_evaluate(_config(data__buckets=(8, 16)), str(tmp_path / 'other'))


@pytest.mark.e2e
def test_sample_restores_and_is_reproducible(tmp_path):
  workdir = str(tmp_path)
  config = _config(total_steps=2, checkpoint_every=2)
  train.train_and_evaluate(config, workdir)
  videos, lengths, saved_config = sample.sample_videos(workdir, num_videos=3, seed=5)
  assert saved_config.data.name == 'coloring'
  assert videos.shape == (3, 30, 3, 3, 3) and videos.dtype == np.float32
  assert lengths.shape == (3,) and lengths.dtype == np.int32
  assert np.all((lengths >= 1) & (lengths <= 30))
  assert videos.min() >= 0.0 and videos.max() <= 1.0
  for video, length in zip(videos, lengths):
    assert not np.any(video[length:])
  again, lengths_again, _ = sample.sample_videos(workdir, num_videos=3, seed=5)
  np.testing.assert_array_equal(videos, again)
  np.testing.assert_array_equal(lengths, lengths_again)


def test_sample_on_an_empty_workdir_says_to_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint.*flowception_jax.main'):
    sample.sample_videos(str(tmp_path), num_videos=2, seed=0)


def test_velocity_weighting_reweights_only_the_velocity_loss():
  """With a model that predicts zero velocity, the velocity loss is the (weighted) mean of the
  target's square over frames in flow; the rate loss does not see the weighting."""

  class ZeroModel:
    def apply(self, variables, frames, *args, **kwargs):
      del variables, args, kwargs
      return jnp.zeros_like(frames), jnp.zeros(frames.shape[:2])

  rng = np.random.default_rng(0)
  b, f = 3, 4
  batch = {
      'frames': rng.uniform(-1, 1, (b, f, 2, 2, 1)).astype(np.float32),
      'frame_times': rng.uniform(0, 1, (b, f)).astype(np.float32),
      'positions': np.broadcast_to(np.arange(f, dtype=np.int32), (b, f)),
      'frame_mask': np.ones((b, f), bool), 'rate_mask': np.ones((b, f), bool),
      'flow_mask': rng.uniform(size=(b, f)) < 0.7, 'context_mask': np.zeros((b, f), bool),
      'insert_targets': rng.integers(0, 3, (b, f)).astype(np.int32),
      'segment_ids': np.ones((b, f), np.int32),
      'label': np.zeros(b, np.int32), 'length': np.full(b, f, np.int32)}
  config = coloring.get_config()

  def losses(weighting):
    config.flow.velocity_weighting = weighting
    return train.compute_losses(None, batch, jax.random.key(2), model=ZeroModel(),
                                flow_config=config.flow, num_classes=0)[1]

  uniform, weighted = losses('uniform'), losses('logit_normal')
  assert float(uniform['rate_loss']) == float(weighted['rate_loss'])
  assert abs(float(uniform['velocity_loss']) - float(weighted['velocity_loss'])) > 1e-3


def _package_modules_reached(module: str) -> set[str]:
  """The package's modules that importing `module` can load: its import statements, at any depth
  (in functions too), followed through the package's own modules and their parent packages."""
  reached, todo = set(), [module]
  while todo:
    name = todo.pop()
    if name in reached:
      continue
    reached.add(name)
    todo += ['.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)]
    with open(importlib.util.find_spec(name).origin) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        todo += [a.name for a in node.names if a.name.startswith('flowception_jax')]
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('flowception_jax'):
        todo.append(node.module)
        if importlib.util.find_spec(node.module).submodule_search_locations:  # A package.
          todo += [f'{node.module}.{a.name}' for a in node.names
                   if importlib.util.find_spec(f'{node.module}.{a.name}') is not None]
  return reached


def test_the_trainer_imports_no_evaluation_module():
  reached = _package_modules_reached('flowception_jax.training.train')
  assert {'flowception_jax.core.model', 'flowception_jax.training.run_log'} <= reached
  assert not {m for m in reached if m.startswith('flowception_jax.evaluation')}, sorted(reached)
  # The walk finds such an import where one exists, in a function too (`main` imports the
  # evaluators after parsing its flags).
  assert 'flowception_jax.evaluation.evaluators' in _package_modules_reached('flowception_jax.main')


class _CountingEvaluator:
  """Records the steps it runs at and returns one scalar and one image."""

  def __init__(self, every):
    self.every, self.steps = every, []

  def run(self, step, params):
    assert jax.tree.structure(params) is not None
    self.steps.append(step)
    return {'step_seen': float(step), 'picture': np.zeros((4, 4, 3), np.uint8)}


@pytest.mark.e2e
def test_evaluators_run_at_their_steps_and_at_the_end(tmp_path):
  made = {}

  def make_evaluators(config, info, model, workdir):
    assert workdir == str(tmp_path) and config.num_classes == info.num_classes
    assert isinstance(model, nn.Module)
    made.update(every_2=_CountingEvaluator(2), at_end=_CountingEvaluator(0))
    return made

  train.train_and_evaluate(_config(total_steps=5, checkpoint_every=5), str(tmp_path),
                           make_evaluators=make_evaluators)
  assert made['every_2'].steps == [2, 4, 5] and made['at_end'].steps == [5]
  summaries = [p for p in os.listdir(tmp_path) if p.startswith('events.out.tfevents')]
  logged = {v.tag for p in summaries for e in tf.compat.v1.train.summary_iterator(
      os.path.join(tmp_path, p)) for v in e.summary.value}
  assert {'every_2/step_seen', 'at_end/step_seen', 'every_2/picture'} <= logged
