"""The staged sampler draws the plain sampler's videos: same lengths, insertion steps and frames for
the same keys, whatever the batch, the place in it or the capacity a video is sampled in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax.core import sampler as sampler_lib
from flowception_jax.core import staged_sampler
from flowception_jax.training import config as config_lib
from tests import compilations
from tests import tiny_params

FRAME = (4, 4, 1)
CAPACITY = 8
STAGES = (2, 4, 8)


@functools.cache
def _tiny_dit(num_classes: int, seed: int = 0):
  """A one-block DiT with random weights everywhere (the zero-initialised heads included), so
  that its velocities and rates depend on every alive frame; the rate bias gives lengths from 2
  up to the capacity."""
  net = model_lib.DiT(patch_size=2, channels=1, hidden_size=16, depth=1, num_heads=2,
                      num_classes=num_classes)
  params = tiny_params.perturbed_init(net, *model_lib.init_inputs(FRAME, 2, num_classes),
                                      scale=0.3, seed=seed + 1)['params']
  params['rate_out']['bias'] -= 2.5

  def apply_fn(params, *inputs, **kwargs):
    return net.apply({'params': params}, *inputs, **kwargs)

  return net, apply_fn, params


def _mixing_model(params, frames, context, frame_times, positions, frame_mask, labels):
  """A cheap stand-in that still reads every alive frame: velocity towards the mean alive frame
  (shifted by the slot), log-rates from the frame's own values, its time and `params`."""
  del context
  alive = frame_mask[..., None, None, None]
  mean = (jnp.sum(jnp.where(alive, frames, 0.0), axis=1, keepdims=True)
          / jnp.maximum(jnp.sum(alive, axis=1, keepdims=True), 1))
  velocity = mean + 0.1 * positions[..., None, None, None] - frames
  log_rate = params + jnp.mean(frames, axis=(2, 3, 4)) - frame_times
  if labels is not None:
    log_rate = log_rate + 0.5 * (labels[:, None] == 0)
  return velocity, log_rate


def _config(**fields):
  return sampler_lib.SamplerConfig(**{'num_steps': 4, 'num_start_frames': 2, **fields})


def _plain(apply_fn, config, num_videos, num_classes=0):
  return sampler_lib.make_sampler(apply_fn, config=config, batch_size=num_videos,
                                  capacity=CAPACITY, frame_shape=FRAME, num_classes=num_classes)


def _staged(apply_fn, config, batch_size=4, num_classes=0, stages=STAGES, **kwargs):
  return staged_sampler.StagedSampler(apply_fn, config=config, batch_size=batch_size,
                                      capacity=stages[-1], stages=stages, frame_shape=FRAME,
                                      num_classes=num_classes, **kwargs)


def _context_inputs(num_videos: int, seed: int) -> dict[str, np.ndarray]:
  """Every other video given nothing, the others 1 to 5 frames at random slots, some passive,
  some followed by a noise start frame; video 1 has 5 given frames (it starts in the last stage)."""
  rng = np.random.default_rng(seed)
  frames = rng.normal(size=(num_videos, CAPACITY) + FRAME).astype(np.float32) * 3
  context = np.zeros((num_videos, CAPACITY), bool)
  passive = rng.uniform(size=context.shape) < 0.3
  init_alive = np.zeros_like(context)
  for row in range(1, num_videos, 2):
    given = 5 if row == 1 else rng.integers(1, 4)
    context[row, np.sort(rng.choice(CAPACITY - 1, given, replace=False))] = True
    init_alive[row] = context[row]
    init_alive[row, -1] = rng.uniform() < 0.5
  return {'init_frames': frames, 'init_alive': init_alive, 'context_mask': context,
          'passive_mask': passive & context}


def _assert_same_videos(a, b):
  """Same discrete decisions, frames equal up to the model's float rounding on other shapes."""
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.insert_step, b.insert_step)
  np.testing.assert_array_equal(a.context_slots, b.context_slots)
  np.testing.assert_array_equal(a.times, b.times)
  assert int(a.num_iterations) == int(b.num_iterations)
  np.testing.assert_allclose(a.frames, b.frames, atol=1e-4)


def _take(out: sampler_lib.SampleOutput, rows) -> sampler_lib.SampleOutput:
  """Videos `rows` of `out` (num_iterations: the most of theirs is not known; kept)."""
  return jax.tree.map(lambda x: np.asarray(x)[rows] if np.ndim(x) else x, out)


def test_staged_sampler_draws_the_plain_samplers_videos():
  """A small random class-conditional DiT, every video with its own key, under guidance (two
  evaluations per step), every other video given frames (the other laws and orders: below)."""
  num_videos, num_classes, with_context = 16, 3, True
  _, apply_fn, params = _tiny_dit(num_classes)
  config = _config(insertion='poisson', guidance_scale=2.0)
  plain = _plain(apply_fn, config, num_videos, num_classes)
  staged = _staged(apply_fn, config, num_classes=num_classes)
  capacities = set()
  for seed in (0,):
    keys = jax.random.split(jax.random.key(seed), num_videos)
    kwargs = _context_inputs(num_videos, seed) if with_context else {}
    if num_classes:
      kwargs['labels'] = np.arange(num_videos, dtype=np.int32) % num_classes
    out, calls = staged.run(params, keys, **kwargs)
    _assert_same_videos(out, jax.device_get(plain(params, keys, **kwargs)))
    capacities |= {c.capacity for c in calls}
    assert len(set(np.asarray(out.lengths))) > 2  # The model decides lengths that vary.
  assert capacities == set(STAGES)  # Every stage ran.


# The cheap model's samplers, shared by the tests below (each compiles once).
MIXING_STAGES = (2, 3, 5, 8)
MIXING_VIDEOS = 10


@pytest.fixture(scope='module')
def mixing():
  config = _config(insertion='poisson', solver='heun')
  return {'staged': _staged(_mixing_model, config, batch_size=3, stages=MIXING_STAGES),
          'plain': _plain(_mixing_model, config, MIXING_VIDEOS)}


@pytest.mark.parametrize('insertion, order', [('thinning', 'hierarchical'),
                                              ('bernoulli', 'random')])
def test_insertion_orders_and_laws_stage_alike(insertion, order):
  config = _config(insertion=insertion, order=order, num_steps=5)
  keys = jax.random.split(jax.random.key(2), MIXING_VIDEOS)
  params = jnp.float32(-0.5)
  out = _staged(_mixing_model, config, batch_size=3, stages=(3, 8))(params, keys)
  plain = _plain(_mixing_model, config, MIXING_VIDEOS)
  _assert_same_videos(out, jax.device_get(plain(params, keys)))
  assert len(set(np.asarray(out.lengths))) > 2


def test_no_video_loses_a_frame_or_overflows(mixing):
  """Rates far above the room: every video overflows every stage and fills the last one, keeping
  its initial frames (the given ones bit-exact, in their order) and dropping insertions only."""
  keys = jax.random.split(jax.random.key(3), MIXING_VIDEOS)
  inputs = _context_inputs(MIXING_VIDEOS, 3)
  params = jnp.float32(4.0)
  out, calls = mixing['staged'].run(params, keys, **inputs)
  _assert_same_videos(out, jax.device_get(mixing['plain'](params, keys, **inputs)))
  np.testing.assert_array_equal(out.lengths, CAPACITY)
  initial = np.asarray(out.insert_step) == 0
  starts = np.where(inputs['init_alive'].any(1), inputs['init_alive'].sum(1), 2)
  np.testing.assert_array_equal(initial.sum(1), starts)
  for row in range(MIXING_VIDEOS):
    given = inputs['init_frames'][row][inputs['context_mask'][row]]
    slots = out.context_slots[row][:len(given)]
    np.testing.assert_array_equal(out.frames[row][slots], given)
    assert np.all(np.diff(slots) > 0)
  capacities = {c.capacity for c in calls}  # Demands this high may skip stages.
  assert min(capacities) == MIXING_STAGES[0] and max(capacities) == CAPACITY


def test_a_video_does_not_depend_on_its_batch(mixing):
  """The same key gives the same video in a batch of 10, in a batch of 4 at another place, and
  staged with batches of 3 or (other stages, refilled at half) 5, in another order."""
  config = _config(insertion='poisson', solver='heun')
  params = jnp.float32(0.3)
  keys = jax.random.split(jax.random.key(4), MIXING_VIDEOS)
  whole = jax.device_get(mixing['plain'](params, keys))
  assert len(set(whole.lengths)) > 2
  rows = np.array([7, 1, 9, 4])
  part = jax.device_get(_plain(_mixing_model, config, len(rows))(params, keys[rows]))
  np.testing.assert_array_equal(part.lengths, whole.lengths[rows])
  np.testing.assert_array_equal(part.insert_step, whole.insert_step[rows])
  np.testing.assert_allclose(part.frames, whole.frames[rows], atol=1e-5)
  reversed_rows = np.arange(MIXING_VIDEOS)[::-1]
  other = _staged(_mixing_model, config, batch_size=5, stages=(4, 8), min_running=0.5)
  for staged in (mixing['staged'], other):
    _assert_same_videos(staged(params, keys[reversed_rows]), _take(whole, reversed_rows))


def test_stages_compile_once_and_videos_only_move_up():
  """A fresh sampler's first run compiles every stage ahead (side by side); later runs, with
  other keys and video counts, compile nothing."""
  # Bernoulli insertions and Euler steps: the mixing model's cheapest stages to compile.
  staged = _staged(_mixing_model, _config(), batch_size=3, stages=MIXING_STAGES)
  params = jnp.float32(0.8)
  staged.compile(params)
  for seed in (5, 6):
    keys = jax.random.split(jax.random.key(seed), 11 + seed)
    with compilations.counted() as counts:
      _, calls = staged.run(params, keys)
    assert not counts  # New keys and video counts reuse every compilation.
    capacities = [c.capacity for c in calls]
    assert capacities == sorted(capacities)
    assert all(0 < c.videos <= 3 and c.loops >= 1 for c in calls)
    assert sum(c.video_steps for c in calls) > 0


@pytest.mark.parametrize('first, capacity', [(2, 12), (2, 19), (2, 145), (1, 1), (5, 5), (3, 40)])
def test_default_stages_span_the_start_to_the_capacity_evenly(first, capacity):
  stages = staged_sampler.default_stages(first, capacity)
  assert staged_sampler.check_stages(stages, capacity) == stages
  assert stages[0] == min(first, capacity) and len(stages) <= staged_sampler.MAX_DEFAULT_STAGES
  gaps = np.diff(stages)  # One step throughout, the last gap no longer.
  if gaps.size:
    assert np.all(gaps[:-1] == gaps[0]) and gaps[-1] <= gaps[0]
  if capacity - first < staged_sampler.MAX_DEFAULT_STAGES:
    assert stages == tuple(range(first, capacity + 1))  # Every frame count.


def test_bad_arguments_are_refused():
  config = _config()
  for stages in ((2, 4), (4, 2, 8), (0, 8), ()):
    with pytest.raises(ValueError, match='config.sampler.stages'):
      staged_sampler.StagedSampler(_mixing_model, config=config, batch_size=2, capacity=8,
                                   stages=stages, frame_shape=FRAME)
  with pytest.raises(ValueError, match='config.sampler.min_running'):
    _staged(_mixing_model, config, min_running=0.0)
  with pytest.raises(ValueError, match='num_start_frames'):
    _staged(_mixing_model, _config(num_start_frames=9))
  staged = _staged(_mixing_model, config)
  with pytest.raises(ValueError, match='one key per video'):
    staged(jnp.float32(0.0), jax.random.key(0))
  with pytest.raises(ValueError, match='unconditional'):
    staged(jnp.float32(0.0), jax.random.split(jax.random.key(0), 2), labels=np.zeros(2, np.int32))


def test_video_sampler_stages_when_the_config_asks():
  """`sampler.staged` switches `inference.VideoSampler` to the staged sampler, which makes the
  videos of the plain one in batches (the last one short), labels and context included; a call of
  one batch is sampled plain."""
  num_classes, num_videos = 3, 7
  model, _, params = _tiny_dit(num_classes)
  info = datasets.SourceInfo(frame_shape=FRAME, max_frames=CAPACITY, num_classes=num_classes)
  config = config_lib.base_config()
  assert inference.sampler_stages(config, info) == tuple(range(2, CAPACITY + 1))  # Every count.
  config.sampler.num_steps = 4
  config.sampler.stages = (3, CAPACITY)  # Two stage compilations.
  inputs = _context_inputs(num_videos, 5)
  outs = {}
  for staged in (False, True):
    config.sampler.staged = staged
    sampler = inference.VideoSampler(model, config, info, batch_size=3)
    assert sampler.staged == staged
    outs[staged] = sampler(params, jax.random.key(7), num_videos, inputs=inputs)
  _assert_same_videos(outs[True], outs[False])
  sampler.fn = None  # The staged sampler: a call of one batch must not reach it.
  first = _take(outs[False], slice(0, 3))
  one_batch = sampler(params, jax.random.key(7), 3,
                      labels=sampler.random_labels(jax.random.key(7), num_videos)[:3],
                      inputs={k: v[:3] for k, v in inputs.items()})
  _assert_same_videos(one_batch.replace(num_iterations=first.num_iterations), first)
