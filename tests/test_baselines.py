"""The baselines in the same code: attention masks of each method, their training examples, the
end-of-video loss, their samplers with fake models, and each method from training to samples."""

import functools
import os

from absl.testing import flagsaver
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import coloring
from flowception_jax.core import baselines
from flowception_jax.core import flowception
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax.core import sampler as sampler_lib
from flowception_jax.core import tasks
from flowception_jax import sample
from flowception_jax.training import input_pipeline
from flowception_jax.training import train
from tests import tiny_params

B, F, H, W, C = 2, 6, 4, 4, 3


def _net(attn_window=0):
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=4, mlp_ratio=2.0,
                                          dtype='float32', attn_window=attn_window))
  net = model_lib.build_model(config, channels=C, num_classes=0)
  # Random weights everywhere (no zero-initialised heads or gates), drawn on the host: compiling
  # the initialisers would cost more than the test.
  shapes = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), *_inputs()))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: rng.normal(0.0, 0.2, x.shape).astype(np.float32), shapes)
  return functools.partial(tiny_params.apply, net, params)


def _inputs(frames=F):
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(B, frames, H, W, C)), jnp.float32)
  times = jnp.asarray(rng.uniform(size=(B, frames)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(frames), (B, frames))
  return video, jnp.zeros_like(video), times, positions, jnp.ones((B, frames), bool)


def _changed_frames(apply, inputs, frame, **kwargs):
  """bool [F]: which frames' velocity or rate output moves when input `frame` changes (the same
  frames in every video of the batch)."""
  video = np.asarray(inputs[0])
  changed = video.copy()
  changed[:, frame] += 1.0
  v1, r1 = jax.device_get(apply(*inputs, **kwargs))
  v2, r2 = jax.device_get(apply(changed, *inputs[1:], **kwargs))
  dv = np.abs(v1 - v2).reshape(B, video.shape[1], -1).max(-1)
  dr = np.abs(r1 - r2)
  moved = (dv > 1e-5) | (dr > 1e-5)
  np.testing.assert_array_equal(moved, np.broadcast_to(moved[0], moved.shape))
  return moved[0]


def test_causal_attention_blocks_the_future_and_full_sequence_sees_every_frame():
  apply, inputs = _net(), _inputs()
  causal = model_lib.causal_attention(inputs[3])
  for frame in range(F):
    np.testing.assert_array_equal(_changed_frames(apply, inputs, frame, frame_attention=causal),
                                  np.arange(F) >= frame)
    np.testing.assert_array_equal(_changed_frames(apply, inputs, frame), True)


def test_noncausal_attention_shows_the_past_both_ways_and_hides_the_frame_being_made():
  apply, inputs = _net(), _inputs()
  made = F - 1
  attention = model_lib.noncausal_attention(jnp.broadcast_to(jnp.arange(F) == made, (B, F)))
  for frame in range(made):  # A past frame reaches every frame, earlier past frames included.
    np.testing.assert_array_equal(_changed_frames(apply, inputs, frame, frame_attention=attention),
                                  True)
  # The frame being made reaches only itself: the past's outputs, its end logits included, do not
  # depend on it.
  np.testing.assert_array_equal(_changed_frames(apply, inputs, made, frame_attention=attention),
                                np.arange(F) == made)


def test_attention_window_reaches_only_neighbouring_frames():
  # Each block attends `window` frames away, so information travels `depth * window` frames.
  window, depth = 1, model_lib.MODEL_SIZES['tiny'][1]
  apply, inputs = _net(attn_window=window), _inputs()
  for causal in (False, True):
    kwargs = {'frame_attention': model_lib.causal_attention(inputs[3])} if causal else {}
    for frame in range(F):
      distance = np.arange(F) - frame
      reach = (distance >= 0) if causal else (distance >= -depth * window)
      np.testing.assert_array_equal(_changed_frames(apply, inputs, frame, **kwargs),
                                    reach & (distance <= depth * window))
    # A padded frame far from every real one attends to nothing; its output stays finite.
    video, context, times, positions, _ = inputs
    mask = np.arange(F)[None, :] < np.array([[1], [F]])
    for output in apply(video, context, times, positions, mask, **kwargs):
      assert np.isfinite(np.asarray(output)).all()


def test_teacher_forcing_computes_each_frame_as_the_sampler_does():
  """The noisy copy of frame i in a teacher-forcing sequence gets exactly the outputs it gets in the
  sampler's sequence (clean frames before it, itself noisy, nothing after)."""
  apply = _net()
  clean, _, noisy_times, slots, _ = map(np.asarray, _inputs())
  t = noisy_times[..., None, None, None]
  noisy = t * clean + (1 - t) * np.random.default_rng(2).normal(size=clean.shape)
  positions = np.concatenate([slots, slots], axis=1)
  is_noisy = np.broadcast_to(np.arange(2 * F) >= F, (B, 2 * F))
  frames = np.concatenate([clean, noisy], axis=1)
  times = np.concatenate([np.ones((B, F)), noisy_times], axis=1)
  velocity, _ = apply(frames, np.zeros_like(frames), times, positions, np.ones((B, 2 * F), bool),
                      frame_attention=model_lib.causal_attention(positions, noisy=is_noisy))
  # The sampler's sequences for every frame i at once, stacked on the batch axis: [F * B, F].
  current = (np.arange(F)[:, None, None] == slots[None])
  alone = np.where(current[..., None, None, None], noisy[None], clean[None])
  alone = alone.reshape(F * B, F, H, W, C)
  alone_times = np.where(current, noisy_times[None], 1.0).reshape(F * B, F)
  mask = np.broadcast_to(slots[None] <= np.arange(F)[:, None, None], (F, B, F)).reshape(F * B, F)
  alone_slots = np.tile(slots, (F, 1))
  expected, _ = apply(alone, np.zeros_like(alone), alone_times, alone_slots, mask,
                      frame_attention=model_lib.causal_attention(alone_slots))
  expected = np.asarray(expected).reshape(F, B, F, H, W, C)
  for i in range(F):
    np.testing.assert_allclose(velocity[:, F + i], expected[i, :, i], atol=2e-5)


class _Clips:
  """Clips of 1..7 frames whose pixels hold their frame index."""

  def __len__(self):
    return 16

  def __getitem__(self, index):
    n = 1 + index % 7
    video = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None] / 8, (n, 2, 2, 1))
    return {'video': video, 'label': np.int32(0)}


def test_full_sequence_examples_show_every_frame_at_one_time():
  flow = ml_collections.ConfigDict({'tau_distribution': 'uniform'})
  transform = input_pipeline.make_transform('full_sequence', flow, (4, 8))
  rng = np.random.default_rng(0)
  times = []
  for index in range(len(_Clips())):
    n = 1 + index % 7
    example = transform.random_map(_Clips()[index], rng)
    size = 4 if n <= 4 else 8
    real = np.arange(size) < n
    np.testing.assert_array_equal(example['frame_mask'], real)
    np.testing.assert_array_equal(example['flow_mask'], real)
    assert not example['rate_mask'].any() and not example['context_mask'].any()
    np.testing.assert_array_equal(example['positions'], np.arange(size))
    np.testing.assert_allclose((example['frames'][:n, 0, 0, 0] + 1) / 2 * 8, np.arange(n))
    assert len(set(example['frame_times'][real])) == 1
    assert np.all(example['frame_times'][~real] == 0)
    times.append(example['frame_times'][0])
  assert 0 <= min(times) and max(times) < 1 and len(set(times)) == len(times)


def test_autoregressive_examples_pair_each_noisy_frame_with_its_clean_past():
  flow = ml_collections.ConfigDict({'tau_distribution': 'logit_normal'})
  transform = input_pipeline.make_transform('autoregressive', flow, (4, 8))
  rng = np.random.default_rng(0)
  for index in (2, 5, 6):
    n = 1 + index % 7
    example = transform.random_map(_Clips()[index], rng)
    size = 4 if n <= 4 else 8
    real = np.arange(size) < n
    none = np.zeros(size, bool)
    assert example['frames'].shape == (2 * size, 2, 2, 1)
    np.testing.assert_array_equal(example['frames'][:size], example['frames'][size:])
    np.testing.assert_array_equal(example['positions'], np.tile(np.arange(size), 2))
    np.testing.assert_array_equal(example['frame_mask'], np.concatenate([real, real]))
    np.testing.assert_array_equal(example['flow_mask'], np.concatenate([none, real]))
    np.testing.assert_array_equal(example['rate_mask'], np.concatenate([real, none]))
    # The clean copies count the frames after them: the last one ends the video.
    np.testing.assert_array_equal(example['insert_targets'][:n], np.arange(n)[::-1])
    times = example['frame_times']
    np.testing.assert_array_equal(times[:size], real.astype(np.float32))
    noisy = times[size:][real]
    assert np.all((noisy > 0) & (noisy < 1)) and len(set(noisy)) == n
  with pytest.raises(ValueError, match='--config.method'):
    input_pipeline.make_transform('diffusion', flow, (4, 8))


def _one_frame_example(video, k, t, buckets=(4, 8)):
  """The non-causal autoregressive example of `video` [N, ...] in [0, 1] that makes frame k at
  time t, built slot by slot."""
  n = len(video)
  shown = min(k + 1, n)
  size = min(b for b in buckets if b >= shown)
  slots = range(size)
  return {
      'frames': np.stack([video[s] * 2 - 1 if s < shown else np.zeros_like(video[0])
                          for s in slots]),
      'frame_times': np.array([1.0 if s < k else t if s == k < n else 0.0 for s in slots]),
      'positions': np.arange(size),
      'frame_mask': np.array([s < shown for s in slots]),
      'flow_mask': np.array([s == k < n for s in slots]),
      'rate_mask': np.array([s == k - 1 for s in slots]),
      'insert_targets': np.array([n - 1 - s if s == k - 1 else 0 for s in slots]),
      'context_mask': np.zeros(size, bool),
      'segment_ids': np.array([int(s < shown) for s in slots]),
      'label': 0,
      'length': n,
  }


def test_noncausal_autoregressive_examples_make_one_frame_after_its_clean_past():
  flow = ml_collections.ConfigDict({'tau_distribution': 'logit_normal'})
  transform = input_pipeline.make_transform('autoregressive_noncausal', flow, (4, 8))
  rng = np.random.default_rng(0)
  frames_to_make = {}
  for draw in range(3000):
    clip = _Clips()[draw % 16]
    n = len(clip['video'])
    example = transform.random_map(clip, rng)
    k = int(np.sum(example['frame_times'] == 1.0))  # The clean frames 0..k-1.
    t = example['frame_times'][k] if k < n else None
    assert t is None or 0 < t < 1
    expected = _one_frame_example(clip['video'], k, t)
    assert example.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_allclose(example[key], value, err_msg=key)
    # The end decision is on frame k - 1, and the video ends there only when no frame is left.
    np.testing.assert_array_equal(example['insert_targets'][example['rate_mask']] == 0,
                                  [k == n] if k else [])
    frames_to_make.setdefault(n, []).append(k)
  for n, ks in frames_to_make.items():  # k is uniform on 0..N.
    np.testing.assert_allclose(np.bincount(ks, minlength=n + 1) / len(ks), 1 / (n + 1), atol=0.05)


def test_end_loss_is_minimised_by_the_hazard():
  # Clips of 1, 2 or 3 frames, equally likely: the video ends after frame 0 with probability 1/3,
  # after frame 1 (given it has one) with 1/2, after frame 2 surely.
  lengths = np.array([1, 2, 3])
  frames_after = np.array([[0, 0, 0], [1, 0, 0], [2, 1, 0]])
  mask = np.arange(3)[None, :] < lengths[:, None]

  def loss(logits):
    return baselines.end_loss(jnp.broadcast_to(logits, (3, 3)), frames_after, mask)

  hazard = jnp.array([np.log(1 / 2), 0.0, 30.0])  # Logits of 1/3, 1/2 and ~1.
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(hazard), 0.0, atol=1e-6)
  p = 1 / (1 + np.exp(-np.array([0.3, -0.2, 1.0])))
  bce = -(np.log(p[0]) * 1 + np.log(1 - p[0]) * 2 + np.log(p[1]) + np.log(1 - p[1]) + np.log(p[2]))
  np.testing.assert_allclose(jax.jit(loss)(jnp.array([0.3, -0.2, 1.0])), bce / mask.sum(),
                             rtol=1e-5)


def test_length_distribution_is_read_from_the_source():
  shares = baselines.length_distribution(_Clips(), max_frames=9)
  expected = np.bincount([1 + i % 7 for i in range(16)], minlength=10) / 16
  np.testing.assert_allclose(shares, expected)
  with pytest.raises(ValueError, match='--config.data.max_frames'):
    baselines.length_distribution(_Clips(), max_frames=5)


FRAME = (1, 1, 1)


def _sampler_config(**kwargs):
  return sampler_lib.SamplerConfig(**{'num_steps': 4, 'num_start_frames': 1, **kwargs})


def test_full_sequence_sampler_draws_lengths_from_the_data_and_denoises_together():
  calls = []

  def apply_fn(params, frames, context, times, positions, mask, labels):
    del params, context, positions, labels
    calls.append(frames.shape)
    # Every frame sees one shared time, and only its own video's length is real.
    same = jnp.all(jnp.where(mask, times, times[:, :1]) == times[:, :1])
    t = times[..., None, None, None]
    velocity = jnp.where(same, (0.25 - frames) / jnp.maximum(1 - t, 1e-6), 0.0)
    return velocity, jnp.zeros(times.shape)

  capacity, b = 6, 2000
  shares = np.zeros(capacity + 1)
  shares[[2, 5]] = [0.25, 0.75]
  chex.clear_trace_counter()
  sample_fn = baselines.make_full_sequence_sampler(  # Traced once: new keys reuse it.
      chex.assert_max_traces(apply_fn, n=1), config=_sampler_config(snr_shift=3.0),
      batch_size=b, capacity=capacity, frame_shape=FRAME, length_probabilities=shares)
  out = sample_fn(None, jax.random.key(0))
  lengths = np.asarray(out.lengths)
  assert set(lengths) == {2, 5}
  np.testing.assert_allclose(np.mean(lengths == 2), 0.25, atol=0.04)
  alive = np.arange(capacity)[None, :] < lengths[:, None]
  np.testing.assert_allclose(np.asarray(out.frames)[alive], 0.25, atol=1e-5)
  assert np.all(np.asarray(out.frames)[~alive] == 0)
  np.testing.assert_array_equal(np.asarray(out.times), alive)
  assert int(out.num_iterations) == 4
  again = sample_fn(None, jax.random.key(1))
  assert not np.array_equal(np.asarray(again.lengths), lengths)
  assert len(calls) == 1
  with pytest.raises(ValueError, match='needs the flowception method'):
    baselines.make_full_sequence_sampler(apply_fn, config=_sampler_config(order='random'),
                                         batch_size=b, capacity=capacity, frame_shape=FRAME,
                                         length_probabilities=shares)


def _autoregressive_model(end_logit, calls=None, causal=True):
  """Frame s goes to `frames[s - 1] + 1` (0.5 for s = 0), so the results show that each frame is
  made from its finished predecessor; the end logit is `end_logit(seen)` of the number of frames
  each frame sees. Velocities are NaN unless the real frames attend as the method trains them to
  (`train.frame_attention_of` on the sampler's sequence: the frame being made is the noisy one).

  Its cache (`return_kv`) is the sequence itself: a call on one frame with it (`past`) reads the
  predecessor there, and is NaN unless the frame sees exactly the clean frames before it and itself.
  """

  def apply_fn(params, frames, context, times, positions, mask, labels, frame_attention=None,
               past=None, return_kv=False):
    del params, context, labels
    if calls is not None:
      calls.append(frames.shape)
    t = times[..., None, None, None]
    if past is not None:
      current = positions[:, 0]
      sees = jnp.concatenate([past['positions'] < current[:, None], mask], axis=1)
      previous = jnp.take_along_axis(past['frames'], jnp.maximum(current - 1, 0)[
          :, None, None, None, None], axis=1)
      previous = jnp.where((current > 0)[:, None, None, None, None], previous, -0.5)
      velocity = jnp.where(t < 1, (previous + 1 - frames) / jnp.maximum(1 - t, 1e-6), 0.0)
      as_trained = jnp.all(frame_attention[:, 0] == sees)
      return jnp.where(as_trained, velocity, jnp.nan), jnp.zeros(times.shape)
    batch = {'positions': positions, 'flow_mask': mask & (times < 1),
             'segment_ids': mask.astype(jnp.int32)}
    trained = train.frame_attention_of(
        batch, method='autoregressive' if causal else 'autoregressive_noncausal', packed=False)
    real = mask[:, :, None] & mask[:, None, :]
    as_trained = jnp.all((frame_attention == trained) | ~real)
    previous = jnp.concatenate([frames[:, :1] * 0 - 0.5, frames[:, :-1]], axis=1)
    velocity = jnp.where(t < 1, (previous + 1 - frames) / jnp.maximum(1 - t, 1e-6), 0.0)
    seen = jnp.sum(frame_attention & mask[:, None, :], axis=-1)
    outputs = jnp.where(as_trained, velocity, jnp.nan), end_logit(seen)
    return outputs + ({'frames': frames, 'positions': positions},) if return_kv else outputs

  return apply_fn


@pytest.mark.parametrize('causal', [True, False])
def test_autoregressive_sampler_makes_frames_in_order_and_stops_by_the_end_decision(causal):
  # Ends after the frame that sees four frames: the fourth one (under either mask the last clean
  # frame sees itself and the frames before it). The shifted time lands on the targets only if the
  # model's times and the steps use the same shift.
  calls, capacity, shift = [], 7, 3.0
  chex.clear_trace_counter()
  apply_fn = _autoregressive_model(lambda seen: jnp.where(seen == 4, 30.0, -30.0), calls, causal)
  sample_fn = baselines.make_autoregressive_sampler(  # Traced once: new keys reuse it.
      chex.assert_max_traces(apply_fn, n=2), config=_sampler_config(snr_shift=shift),
      batch_size=3, capacity=capacity, frame_shape=FRAME, causal=causal)
  out = sample_fn(None, jax.random.key(0))
  np.testing.assert_array_equal(out.lengths, 4)
  np.testing.assert_allclose(np.asarray(out.frames)[:, :4, 0, 0, 0],
                             np.broadcast_to([0.5, 1.5, 2.5, 3.5], (3, 4)), atol=1e-4)
  assert np.all(np.asarray(out.frames)[:, 4:] == 0)
  np.testing.assert_array_equal(out.insert_step[0], [0, 4, 8, 12, -1, -1, -1])
  assert int(out.num_iterations) == 4 * 4 + 1  # The evaluation that decides the end of frame 3.
  sample_fn(None, jax.random.key(1))
  # One trace of each evaluation: on the whole sequence, and on the frame being made alone.
  assert calls == [(3, capacity) + FRAME, (3, 1) + FRAME]


@pytest.mark.parametrize('causal', [True, False])
def test_autoregressive_lengths_follow_the_end_probability(causal):
  capacity, b = 6, 4000
  sample_fn = baselines.make_autoregressive_sampler(
      _autoregressive_model(lambda seen: jnp.zeros(seen.shape), causal=causal),
      config=_sampler_config(num_steps=1),
      batch_size=b, capacity=capacity, frame_shape=FRAME, causal=causal)
  lengths = np.asarray(sample_fn(None, jax.random.key(3)).lengths)
  expected = [0.5**length for length in range(1, capacity)] + [0.5 ** (capacity - 1)]
  shares = [np.mean(lengths == length) for length in range(1, capacity + 1)]
  np.testing.assert_allclose(shares, expected, atol=0.03)


def _prefix_inputs(b, capacity, prefix):
  """Sampler arguments giving video i the frames 0..prefix[i]-1, frame s of value 10 + s."""
  given = np.arange(capacity)[None, :] < np.asarray(prefix)[:, None]
  frames = np.broadcast_to((10.0 + np.arange(capacity))[None, :, None, None, None],
                           (b, capacity) + FRAME)
  return {'init_frames': np.where(given[..., None, None, None], frames, 0.0).astype(np.float32),
          'context_mask': given, 'init_alive': given, 'passive_mask': np.zeros_like(given)}


def test_full_sequence_sampler_keeps_a_given_prefix_and_draws_lengths_that_hold_it():
  def apply_fn(params, frames, context, times, positions, mask, labels):
    del params, positions, mask, labels
    # Given frames come clean in the context channel at time 1; the others move to the mean of
    # the given ones (0 where none is given).
    given = times == 1.0
    count = jnp.maximum(given.sum(axis=1), 1)[:, None, None, None, None]
    target = jnp.sum(jnp.where(given[..., None, None, None], context, 0.0), axis=1,
                     keepdims=True) / count
    t = times[..., None, None, None]
    return jnp.where(t < 1, (target - frames) / jnp.maximum(1 - t, 1e-6), 0.0), jnp.zeros(
        times.shape)

  capacity, b = 6, 600
  shares = np.zeros(capacity + 1)
  shares[[2, 5]] = [0.5, 0.5]
  sample_fn = baselines.make_full_sequence_sampler(
      apply_fn, config=_sampler_config(), batch_size=b, capacity=capacity, frame_shape=FRAME,
      length_probabilities=shares)
  prefix = np.arange(b) % 4  # 0 to 3 given frames.
  out = sample_fn(None, jax.random.key(0), **_prefix_inputs(b, capacity, prefix))
  lengths, frames = np.asarray(out.lengths), np.asarray(out.frames)[..., 0, 0, 0]
  # A length adds at least one frame to the prefix, as every training clip does.
  assert set(lengths[prefix <= 1]) == {2, 5} and set(lengths[prefix >= 2]) == {5}
  for row in range(b):
    k = prefix[row]
    np.testing.assert_array_equal(frames[row, :k], 10.0 + np.arange(k))
    np.testing.assert_allclose(frames[row, k:lengths[row]], np.mean(10.0 + np.arange(k)) if k
                               else 0.0, atol=1e-4)
    np.testing.assert_array_equal(out.context_slots[row], np.where(np.arange(capacity) < k,
                                                                   np.arange(capacity), -1))
  # Given more frames than any data length: the video is its prefix.
  out = sample_fn(None, jax.random.key(1), **_prefix_inputs(b, capacity, np.full(b, 6)))
  np.testing.assert_array_equal(out.lengths, 6)


@pytest.mark.parametrize('causal', [True, False])
def test_autoregressive_sampler_continues_a_given_prefix(causal):
  capacity = 7
  model = _autoregressive_model(lambda seen: jnp.where(seen == 5, 30.0, -30.0), causal=causal)

  def apply_fn(params, frames, context, *args, **kwargs):
    # The prefix is clean past frames, as in teacher forcing; the context channel stays empty.
    velocity, *rest = model(params, frames, context, *args, **kwargs)
    return jnp.where(jnp.any(context != 0), jnp.nan, velocity), *rest

  sample_fn = baselines.make_autoregressive_sampler(
      apply_fn, config=_sampler_config(), batch_size=3, capacity=capacity, frame_shape=FRAME,
      causal=causal)
  out = sample_fn(None, jax.random.key(0), **_prefix_inputs(3, capacity, [0, 2, 6]))
  frames = np.asarray(out.frames)[..., 0, 0, 0]
  # Ends after the frame that sees five frames, frame 4, unless that frame was given: a video ends
  # only after a frame it made.
  np.testing.assert_array_equal(out.lengths, [5, 5, 7])
  np.testing.assert_allclose(frames[0, :5], [0.5, 1.5, 2.5, 3.5, 4.5], atol=1e-4)
  np.testing.assert_allclose(frames[1, :5], [10, 11, 12, 13, 14], atol=1e-4)  # 11 + 1, ...
  np.testing.assert_allclose(frames[2], 10.0 + np.arange(7), atol=1e-4)
  np.testing.assert_array_equal(out.insert_step[1, :5], [0, 0, 0, 4, 8])


def _reference_autoregressive(apply_fn, params, key, labels, config, prefix_inputs, causal):
  """The autoregressive sampler without a cache: every step evaluates the whole sequence."""
  frames, given = prefix_inputs['init_frames'], prefix_inputs['context_mask']
  (b, n), steps, shift = given.shape, config.num_steps, config.snr_shift
  slots = np.broadcast_to(np.arange(n), (b, n))
  evaluate = jax.jit(lambda frames, times, mask, attention: sampler_lib.guided_apply(
      apply_fn, params, (frames, jnp.zeros_like(frames), times, slots, mask), labels, config,
      num_classes=3, frame_attention=attention))
  noise_key, key = jax.random.split(key)
  noise = jax.random.normal(noise_key, frames.shape)
  frames = np.where(given[..., None, None, None], frames, noise)
  prefix, lengths, iteration = given.sum(axis=1), np.full(b, n), 0
  while np.any((prefix + iteration // steps < n) & (lengths > prefix + iteration // steps)):
    current, k = prefix + iteration // steps, iteration % steps
    made = slots == current[:, None]
    times = flowception.snr_shift(np.where(slots < current[:, None], 1.0, made * k / steps), shift)
    attention = (model_lib.causal_attention(slots) if causal
                 else model_lib.noncausal_attention(jnp.asarray(made)))
    velocity, end_logit = evaluate(frames, times, slots <= current[:, None], attention)
    if k == 0:
      key, end_key = jax.random.split(key)
      previous = np.asarray(end_logit)[np.arange(b), np.clip(current - 1, 0, n - 1)]
      ends = (current > 0) & np.asarray(jax.random.bernoulli(end_key, jax.nn.sigmoid(previous)))
      lengths = np.where((lengths == n) & ends, np.minimum(current, n), lengths)
    dt = flowception.snr_shift((k + 1) / steps, shift) - flowception.snr_shift(k / steps, shift)
    frames = frames + np.where(made[..., None, None, None], dt * np.asarray(velocity), 0.0)
    iteration += 1
  lengths = np.maximum(lengths, prefix)
  alive = slots < lengths[:, None]
  return lengths, np.where(alive[..., None, None, None], frames, 0.0), iteration


@pytest.mark.parametrize('causal', [True, False])
def test_autoregressive_sampler_with_its_cache_makes_the_videos_of_whole_sequence_steps(causal):
  """A random class-conditional DiT under guidance, videos given 0 to 2 frames: the frames the
  cached keys and values stand for are the ones a whole-sequence evaluation would compute."""
  capacity, b, frame = 5, 4, (4, 4, 1)
  net = model_lib.DiT(patch_size=2, channels=1, hidden_size=16, depth=2, num_heads=2,
                      num_classes=3)

  def apply_fn(params, *inputs, **kwargs):
    return net.apply({'params': params}, *inputs, **kwargs)

  params = tiny_params.perturbed_init(net, *model_lib.init_inputs(frame, 2, 3), scale=0.3)['params']
  config = _sampler_config(num_steps=3, snr_shift=2.0, guidance_scale=2.0)
  given = np.arange(capacity)[None, :] < np.array([0, 1, 2, 0])[:, None]
  rng = np.random.default_rng(0)
  inputs = {'init_frames': np.where(given[..., None, None, None],
                                    rng.normal(size=(b, capacity) + frame), 0).astype(np.float32),
            'context_mask': given}
  labels = np.array([0, 1, 2, 0], np.int32)
  sample_fn = baselines.make_autoregressive_sampler(
      apply_fn, config=config, batch_size=b, capacity=capacity, frame_shape=frame, num_classes=3,
      causal=causal)
  for seed in range(2):
    out = sample_fn(params, jax.random.key(seed), labels=labels, **inputs)
    lengths, frames, iterations = _reference_autoregressive(
        apply_fn, params, jax.random.key(seed), labels, config, inputs, causal)
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_allclose(out.frames, frames, rtol=1e-4, atol=1e-4)  # Float rounding.
    assert int(out.num_iterations) == iterations
  assert len(set(np.asarray(out.lengths))) > 1  # The model's end decisions vary.


def test_full_sequence_refuses_context_patterns_it_cannot_take():
  config = _config('full_sequence')
  config.context.update(p_none=0.5, p_keyframes=0.3, p_random=0.2)
  with pytest.raises(ValueError, match='--config.context.p_keyframes=0 '
                                       '--config.context.p_random=0'):
    baselines.check_context_patterns(config)
  for method in baselines.AUTOREGRESSIVE_METHODS:  # They train every frame from its clean past.
    config.method = method
    baselines.check_context_patterns(config)


def test_full_sequence_examples_keep_given_frames_clean_and_out_of_the_loss():
  flow = ml_collections.ConfigDict({'tau_distribution': 'uniform'})
  context = ml_collections.ConfigDict(dict(p_none=0.0, p_first=0.5, p_prefix=0.5, p_keyframes=0.0,
                                           p_random=0.0, max_keyframes=4))
  transform = input_pipeline.make_transform('full_sequence', flow, (8,), context)
  rng = np.random.default_rng(0)
  for index in range(1, 7):
    example = transform.random_map(_Clips()[index], rng)
    given, real = example['context_mask'], example['frame_mask']
    k = int(given.sum())
    assert 1 <= k < real.sum() and given[:k].all()  # A prefix, and never the whole clip.
    np.testing.assert_array_equal(example['frame_times'][given], 1.0)
    np.testing.assert_array_equal(example['flow_mask'], real & ~given)
    assert len(set(example['frame_times'][real & ~given])) == 1


def _config(method, total_steps=2):
  """Tiny coloring runs with one bucket, so each compiles one train step; the baselines train
  with the prefix patterns full-sequence takes."""
  config = coloring.get_config('tiny')
  if method != 'flowception':
    config.context.update(p_none=0.6, p_first=0.2, p_prefix=0.2, p_keyframes=0.0, p_random=0.0)
  config.method = method
  config.total_steps = total_steps
  config.checkpoint_every = 2
  config.evals.samples.num_videos = 2
  config.data.buckets = (30,)
  config.data.num_threads = 1
  config.sampler.num_steps = 3
  return config


@pytest.mark.e2e
@pytest.mark.parametrize('method', ['full_sequence', 'autoregressive', 'autoregressive_noncausal'])
def test_each_method_trains_samples_and_keeps_its_checkpoints(tmp_path, method):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(method), workdir)
  videos, lengths, config = sample.sample_videos(workdir, num_videos=3, seed=0)
  assert config.method == method
  assert videos.shape == (3, 30, 3, 3, 3) and videos.min() >= 0 and videos.max() <= 1
  if method == 'full_sequence':  # Lengths come from the data: coloring's are 15, 20, 25 or 30.
    assert set(lengths) <= {15, 20, 25, 30}
    np.testing.assert_allclose(config.length_distribution[15::5], 0.25, atol=0.05)
  assert np.all((lengths >= 1) & (lengths <= 30))
  for video, length in zip(videos, lengths):
    assert not np.any(video[length:])
  # Given frames as a prefix: image to video and extension keep them; interpolation is refused.
  sampler = tasks.TaskSampler(inference.load(workdir), 2)
  prefix = np.random.default_rng(0).uniform(size=(2, 3, 3, 3)).astype(np.float32)
  extended = sampler('extend', prefix, seed=1)
  np.testing.assert_allclose(extended.videos[:, :2], np.broadcast_to(prefix, (2, 2, 3, 3, 3)),
                             atol=1e-6)
  assert np.all(extended.lengths >= 2) and np.all(extended.context_slots == [0, 1])
  with pytest.raises(ValueError, match='only as a prefix: --task=i2v or --task=extend'):
    sampler('interpolate', prefix, seed=1)
  output = str(tmp_path / 'samples.npz')
  with flagsaver.flagsaver(workdir=workdir, output=output, order='random', verbose=True), \
      pytest.raises(ValueError, match='needs the flowception method'):
    sample.main(['sample'])
  assert not os.path.exists(output)
  with pytest.raises(ValueError, match=f"incompatible config.*method: checkpoint '{method}'"):
    train.train_and_evaluate(_config('flowception', total_steps=4), workdir)


def test_bad_methods_and_orders_are_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match='--config.method'):
    train.train_and_evaluate(_config('diffusion'), str(tmp_path))
  config = _config('flowception')
  config.sampler.order = 'middle_first'
  with pytest.raises(ValueError, match='--config.sampler.order'):
    train.train_and_evaluate(config, str(tmp_path))
  config = _config('autoregressive')
  config.sampler.order = 'random'
  with pytest.raises(ValueError, match='needs the flowception method'):
    train.train_and_evaluate(config, str(tmp_path))
