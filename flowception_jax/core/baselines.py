"""The baselines of the paper, with the same model, data, trainer and checkpoints as Flowception.

`config.method` chooses the generative process:
  flowception:    insertions interleaved with per-frame denoising (`sampler.py`).
  full_sequence:  every frame visible, one shared time. Training denoises whole
                  clips (`input_pipeline.FullSequenceTransform`); sampling draws each video's length
                  from the data's length distribution, measured on the training source and saved
                  with the config (`length_distribution`), then denoises all its frames together.
  autoregressive: frame by frame under causal attention. Training is teacher forcing
                  (`input_pipeline.AutoregressiveTransform`: every frame of a clip is denoised from
                  its clean past in one pass); sampling makes one frame at a time from the clean
                  frames before it and stops by a learned end-of-video decision, whose logit is the
                  rate head's output on the last clean frame (`end_loss`).
Both samplers run on device in one `jax.lax` loop under `jax.jit`, with fixed shapes, and return the
`sampler.SampleOutput` of the Flowception sampler.
"""

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowception_jax.core import flowception
from flowception_jax.core import model as model_lib
from flowception_jax.core import orders
from flowception_jax.core import sampler as sampler_lib

METHODS = ('flowception', 'full_sequence', 'autoregressive')

# Records read (evenly spaced over the source) to measure the length distribution.
LENGTH_RECORDS = 1024


def check_method(config) -> None:
  """Refuses an unknown `config.method` or `config.sampler.order`, and an insertion order on a
  method without insertions (before training starts, not at its first samples)."""
  if config.method not in METHODS:
    raise ValueError(f'unknown method {config.method!r}; set --config.method to one of '
                     f'{", ".join(METHODS)}')
  order = config.sampler.order
  orders.check_order(order)
  if config.method != 'flowception' and order != 'learned':
    raise ValueError(f'insertion order {order!r} needs the flowception method, not '
                     f'{config.method!r}; drop --config.sampler.order (or --order)')


def length_distribution(source, max_frames: int, num_records: int = LENGTH_RECORDS) -> list[float]:
  """Share of clips of each length 0..max_frames, over `num_records` records spread evenly.

  Reads every record if the source has fewer, so small sets are measured exactly; evenly spaced
  indices cover sets stored in any order (e.g. by class).
  """
  count = min(len(source), num_records)
  indices = np.linspace(0, len(source) - 1, count).round().astype(np.int64)
  lengths = np.array([np.asarray(source[int(i)]['video']).shape[0] for i in indices])
  if lengths.max() > max_frames:
    raise ValueError(f'a clip of {lengths.max()} frames exceeds max_frames={max_frames}; raise '
                     '--config.data.max_frames')
  return (np.bincount(lengths, minlength=max_frames + 1) / count).tolist()


def end_loss(logit: jax.Array, frames_after: jax.Array, mask: jax.Array,
             segment_ids: jax.Array | None = None) -> jax.Array:
  """Binary cross-entropy of the end-of-video decision, averaged over frames in `mask`.

  logit: [B, F] the rate head's output, the log-odds that the video ends after this frame;
  frames_after: int [B, F] frames that follow (0 on the last frame); mask: bool [B, F] clean frames
  of the clip; segment_ids: see `flowception.masked_mean`. Every frame of a clip counts once, so
  the minimiser is the hazard `P(the video ends here | the frames so far)`, whose product over
  frames gives the data's lengths.
  """
  ends = (frames_after == 0).astype(jnp.float32)
  nll = optax.sigmoid_binary_cross_entropy(logit.astype(jnp.float32), ends)
  return flowception.masked_mean(nll, mask, segment_ids)


def _euler(frames: jax.Array, velocity: jax.Array, moving: jax.Array, t_now, t_next,
           shift: float) -> jax.Array:
  """Moves the `moving` [B, N] frames from time t_now to t_next in the model's (shifted) time."""
  dt = flowception.snr_shift(t_next, shift) - flowception.snr_shift(t_now, shift)
  step = jnp.where(moving[..., None, None, None], dt * velocity.astype(jnp.float32), 0.0)
  return frames + step


def _check_call(labels, context_frames: dict[str, Any], num_classes: int, batch_size: int,
                method: str) -> None:
  """Checks the labels; refuses the context-frame arguments of `sampler.make_sampler`."""
  if any(value is not None for value in context_frames.values()):
    raise ValueError(f'context frames are not supported by the {method} method; sample them from '
                     'a model trained with --config.method=flowception')
  if labels is not None:
    if not num_classes:
      raise ValueError('labels given to the sampler of an unconditional model')
    chex.assert_shape(labels, (batch_size,))


def _check_learned_order(config: sampler_lib.SamplerConfig, method: str) -> None:
  if config.order != 'learned':
    raise ValueError(f'insertion order {config.order!r} needs the flowception method, not '
                     f'{method!r}; drop --order (or --config.sampler.order)')


def make_full_sequence_sampler(apply_fn: Callable[..., Any], *, config: sampler_lib.SamplerConfig,
                               length_probabilities, batch_size: int, capacity: int,
                               frame_shape: tuple[int, ...],
                               num_classes: int = 0) -> Callable[..., sampler_lib.SampleOutput]:
  """The jitted full-sequence sampler: `sample(params, key, labels=None) -> SampleOutput`.

  Each video's length is drawn from `length_probabilities` (share of each length 0..capacity, as
  `length_distribution` measures); its frames start as noise and move together through
  `num_steps` Euler steps of one shared time. `apply_fn` as in `sampler.make_sampler`.
  """
  _check_learned_order(config, 'full_sequence')
  probabilities = np.asarray(length_probabilities, np.float64)
  if probabilities.shape != (capacity + 1,) or probabilities[1:].sum() <= 0:
    raise ValueError(f'expected the share of each length 0..{capacity}, got {probabilities.shape} '
                     'values; train with --config.method=full_sequence to measure them')
  log_probabilities = jnp.log(jnp.asarray(probabilities[1:] / probabilities[1:].sum(), jnp.float32))
  b, n, frame_shape = batch_size, capacity, tuple(frame_shape)
  slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

  def sample(params, key, labels=None, **context_frames) -> sampler_lib.SampleOutput:
    _check_call(labels, context_frames, num_classes, b, 'full_sequence')
    length_key, noise_key = jax.random.split(key)
    lengths = 1 + jax.random.categorical(length_key, log_probabilities, shape=(b,))
    alive = slots < lengths[:, None]
    context = jnp.zeros((b, n) + frame_shape, jnp.float32)

    def step(k, frames):
      t_now, t_next = k / config.num_steps, (k + 1) / config.num_steps
      times = jnp.full((b, n), t_now, jnp.float32)
      inputs = (frames, context, flowception.snr_shift(times, config.snr_shift), slots, alive)
      velocity, _ = sampler_lib.guided_apply(apply_fn, params, inputs, labels, config,
                                             num_classes)
      return _euler(frames, velocity, alive, t_now, t_next, config.snr_shift)

    frames = jax.random.normal(noise_key, (b, n) + frame_shape, jnp.float32)
    frames = jax.lax.fori_loop(0, config.num_steps, step, frames)
    return sampler_lib.SampleOutput(
        frames=jnp.where(alive[..., None, None, None], frames, 0.0),
        times=alive.astype(jnp.float32), lengths=lengths.astype(jnp.int32),
        insert_step=jnp.where(alive, 0, -1), num_iterations=jnp.int32(config.num_steps),
        context_slots=jnp.full((b, n), -1, jnp.int32))

  return jax.jit(sample)


def make_autoregressive_sampler(apply_fn: Callable[..., Any], *,
                                config: sampler_lib.SamplerConfig, batch_size: int, capacity: int,
                                frame_shape: tuple[int, ...],
                                num_classes: int = 0) -> Callable[..., sampler_lib.SampleOutput]:
  """The jitted autoregressive sampler: `sample(params, key, labels=None) -> SampleOutput`.

  Frame i starts as noise and takes `num_steps` Euler steps while frames 0..i-1, clean, are its
  causal context (`apply_fn` gets `frame_attention=model.causal_attention(positions)`). The first
  evaluation of frame i also yields the end-of-video logit of frame i - 1 (which, causal, does not
  see frame i): a video ends there with probability `sigmoid(logit)`, or at the capacity. The loop
  runs until every video has ended, one evaluation per iteration; `insert_step` is the iteration
  at which each frame began.
  """
  _check_learned_order(config, 'autoregressive')
  b, n, frame_shape = batch_size, capacity, tuple(frame_shape)
  steps = config.num_steps
  slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  causal = model_lib.causal_attention(slots)

  def sample(params, key, labels=None, **context_frames) -> sampler_lib.SampleOutput:
    _check_call(labels, context_frames, num_classes, b, 'autoregressive')
    noise_key, key = jax.random.split(key)
    context = jnp.zeros((b, n) + frame_shape, jnp.float32)

    def step(state):
      iteration, frames, lengths, key = state
      current, k = iteration // steps, iteration % steps  # Frame `current` at its step k.
      t_now, t_next = k / steps, (k + 1) / steps
      times = jnp.where(slots < current, 1.0, jnp.where(slots == current, t_now, 0.0))
      inputs = (frames, context, flowception.snr_shift(times, config.snr_shift), slots,
                slots <= current)
      velocity, end_logit = sampler_lib.guided_apply(apply_fn, params, inputs, labels, config,
                                                     num_classes, frame_attention=causal)
      key, end_key = jax.random.split(key)
      previous = end_logit[:, jnp.maximum(current - 1, 0)]
      ends = (k == 0) & (current > 0) & jax.random.bernoulli(end_key, jax.nn.sigmoid(previous))
      lengths = jnp.where((lengths == n) & ends, current, lengths)  # n: still going.
      frames = _euler(frames, velocity, slots == current, t_now, t_next, config.snr_shift)
      return iteration + 1, frames, lengths, key

    def running(state):
      iteration, _, lengths, _ = state
      current = iteration // steps
      return (current < n) & jnp.any(lengths > current)

    frames = jax.random.normal(noise_key, (b, n) + frame_shape, jnp.float32)
    state = (jnp.int32(0), frames, jnp.full((b,), n, jnp.int32), key)
    iterations, frames, lengths, _ = jax.lax.while_loop(running, step, state)
    alive = slots < lengths[:, None]
    return sampler_lib.SampleOutput(
        frames=jnp.where(alive[..., None, None, None], frames, 0.0),
        times=alive.astype(jnp.float32), lengths=lengths,
        insert_step=jnp.where(alive, slots * steps, -1), num_iterations=iterations,
        context_slots=jnp.full(alive.shape, -1, jnp.int32))

  return jax.jit(sample)
