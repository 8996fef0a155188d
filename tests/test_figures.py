"""The figures: the timeline is the sampler's own history, and the pictures show what they claim."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colors

from flowception_jax.core import flowception
from flowception_jax.core import sampler as sampler_lib
from flowception_jax.evaluation import figures

_FRAME_SHAPE = (2, 2, 1)


def _constant_rate_model(params, frames, context, times, positions, frame_mask, labels):
  """A stand-in model: no motion, every frame asks for two more frames after it."""
  del context, times, positions, frame_mask, labels
  return jnp.zeros_like(frames), jnp.full(frames.shape[:2], jnp.log(params))


def _colour_mask(image, colour, tolerance=12):
  rgb = np.array(colors.to_rgb(colour)) * 255
  return np.all(np.abs(image.astype(np.int32) - rgb) <= tolerance, axis=-1)


def test_frame_time_history_is_the_sampler_state_after_every_iteration():
  config = sampler_lib.SamplerConfig(num_steps=5, num_start_frames=2, insertion='poisson')
  batch, capacity = 3, 12
  key = jax.random.key(0)
  empty = np.zeros((batch, capacity), bool)
  # The sampler's loop, one jitted iteration at a time, keeping every state.
  state = jax.jit(functools.partial(sampler_lib.initial_state, config=config,
                                    frame_shape=_FRAME_SHAPE))(
      jax.random.split(key, batch), init_frames=np.zeros((batch, capacity) + _FRAME_SHAPE,
                                                         np.float32),
      init_alive=empty, context_mask=empty, passive_mask=empty)
  step = jax.jit(functools.partial(
      sampler_lib._step, apply_fn=_constant_rate_model, params=2.0, labels=None, config=config,
      kappa=flowception.get_kappa('linear'), num_classes=0))
  running = jax.jit(functools.partial(sampler_lib.running, config=config))
  states = [state]
  while bool(np.any(running(state))):
    state = step(state)
    states.append(state)
  # The jitted sampler runs the same process.
  out = sampler_lib.make_sampler(_constant_rate_model, config=config, batch_size=batch,
                                 capacity=capacity, frame_shape=_FRAME_SHAPE)(2.0, key)
  out, states = jax.device_get((out, states))  # Read on the host, not op by op.
  np.testing.assert_array_equal(out.insert_step, state.insert_step)
  assert int(out.num_iterations) == len(states) - 1
  assert np.any(np.asarray(out.insert_step) > 0)  # Frames were inserted along the way.

  for b in range(batch):
    length = int(out.lengths[b])
    history = figures.frame_time_history(np.asarray(out.insert_step[b]), length,
                                         config.num_steps, int(out.num_iterations))
    assert history.shape == (length, len(states))
    for m, past in enumerate(states):
      alive = np.asarray(past.alive[b])
      known = ~np.isnan(history[:, m])
      np.testing.assert_allclose(history[known, m], np.asarray(past.times[b])[alive], atol=1e-6)
    np.testing.assert_array_equal(history[:, -1], 1.0)


def test_context_frames_are_clean_throughout():
  history = figures.frame_time_history(np.array([0, 0, 3]), 3, num_steps=4, num_iterations=8,
                                       context=np.array([True, False, False]))
  np.testing.assert_array_equal(history[0], 1.0)
  np.testing.assert_allclose(history[1, :5], [0, 0.25, 0.5, 0.75, 1])
  assert np.isnan(history[2, :3]).all() and history[2, 3] == 0.0


def test_length_bars_sit_where_the_lengths_are():
  data = np.random.default_rng(0).integers(1, 13, 300)
  centres = []
  for length in (3, 9):
    image = figures.length_histogram_image(np.full(16, length), data, max_frames=12)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    # The tallest column of the generated colour is in the one bar (not the legend's swatch).
    centres.append(np.argmax(_colour_mask(image, figures.GENERATED_COLOUR).sum(axis=0)))
  assert centres[1] > centres[0] + 0.3 * image.shape[1]


def test_timeline_shows_frames_before_they_exist_only_when_some_were_inserted():
  lengths = np.array([4, 6])
  started_together = np.zeros((2, 8), np.int32)
  inserted_later = np.array([[0, 3, 5, 0, -1, -1, -1, -1], [0, 2, 2, 7, 4, 0, -1, -1]])
  pale = '#f2f2f2'
  together = figures.insertion_timeline(started_together, lengths, 4, 8)
  later = figures.insertion_timeline(inserted_later, lengths, 4, 11)
  assert together.shape == later.shape
  # A few anti-aliased text pixels may come close to the pale grey; areas of it mean frames that
  # did not exist yet.
  assert _colour_mask(together, pale, tolerance=2).sum() < 200
  assert _colour_mask(later, pale, tolerance=2).sum() > 5000
  one = figures.insertion_timeline(inserted_later[:1], lengths[:1], 4, 11)
  assert one.shape[1] < later.shape[1]  # One panel per video.
