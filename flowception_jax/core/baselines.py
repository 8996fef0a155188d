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
  autoregressive_noncausal: frame by frame, the clean past frames attending to each other both
                  ways (`model.noncausal_attention`), so their outputs change as the video grows
                  and no key-value cache could hold them. Training makes one frame per clip
                  (`input_pipeline.NoncausalAutoregressiveTransform`: frame k uniform in 0..N,
                  after its clean past); sampling and the end decision are those of
                  `autoregressive`, under this mask.
Every sampler runs on device in one `jax.lax` loop under `jax.jit`, with fixed shapes, and returns
the `sampler.SampleOutput` of the Flowception sampler. The baselines take given frames as a prefix
(image to video: frame 0; extension: frames 0..K-1), through the arguments of
`sampler.make_sampler` (`init_frames` with a `context_mask` on the prefix's slots): full-sequence
keeps them clean in the context channel, as it trains with `config.context`'s first-frame and
prefix patterns, and draws lengths of more than K; the autoregressive methods take them as their
clean past frames (in the main channel, the context channel empty, as they train) and start after
them.
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

METHODS = ('flowception', 'full_sequence', 'autoregressive', 'autoregressive_noncausal')
# The methods that make one frame at a time and end videos by a learned decision (`end_loss`).
AUTOREGRESSIVE_METHODS = ('autoregressive', 'autoregressive_noncausal')

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


def check_context_patterns(config) -> None:
  """Refuses training the full-sequence method on context patterns other than a prefix (its
  sampler has no insertions to place given frames anywhere else). The autoregressive methods
  ignore `config.context`: they train every frame from its clean past."""
  unsupported = [name for name in ('keyframes', 'random')
                 if config.method == 'full_sequence' and config.context[f'p_{name}'] > 0]
  if unsupported:
    raise ValueError(
        'the full_sequence method takes given frames only as a prefix (a first frame or frames '
        f'0..K-1), not the context patterns {unsupported}; set '
        + ' '.join(f'--config.context.p_{name}=0' for name in unsupported)
        + ' (and raise --config.context.p_none, p_first or p_prefix to keep the sum 1)')


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


def _check_call(labels, num_classes: int, batch_size: int, capacity: int, frame_shape,
                init_frames, context_mask, **unused) -> tuple[jax.Array, jax.Array]:
  """Checks the labels and the given frames; returns them as (frames float32 [B, N, ...] zero
  where not given, given bool [B, N]), nothing given by default. `unused`: the other arguments of
  `sampler.make_sampler` (where noise frames start, passive frames), which a prefix does not need.
  """
  del unused
  if labels is not None:
    if not num_classes:
      raise ValueError('labels given to the sampler of an unconditional model')
    chex.assert_shape(labels, (batch_size,))
  if init_frames is None:
    return (jnp.zeros((batch_size, capacity) + frame_shape, jnp.float32),
            jnp.zeros((batch_size, capacity), bool))
  if context_mask is None:
    raise ValueError('init_frames needs a context_mask marking the given frames')
  chex.assert_shape(init_frames, (batch_size, capacity) + frame_shape)
  chex.assert_shape(context_mask, (batch_size, capacity))
  given = context_mask.astype(bool)
  return jnp.where(given[..., None, None, None], init_frames.astype(jnp.float32), 0.0), given


def _prefix_length(given: jax.Array) -> jax.Array:
  """int32 [B]: the given frames of each video, which must be its slots 0..K-1."""
  return jnp.sum(given, axis=1, dtype=jnp.int32)


def _check_learned_order(config: sampler_lib.SamplerConfig, method: str) -> None:
  if config.order != 'learned':
    raise ValueError(f'insertion order {config.order!r} needs the flowception method, not '
                     f'{method!r}; drop --order (or --config.sampler.order)')


def make_full_sequence_sampler(apply_fn: Callable[..., Any], *, config: sampler_lib.SamplerConfig,
                               length_probabilities, batch_size: int, capacity: int,
                               frame_shape: tuple[int, ...],
                               num_classes: int = 0) -> Callable[..., sampler_lib.SampleOutput]:
  """The jitted full-sequence sampler: `sample(params, key, labels=None, init_frames=None,
  context_mask=None, ...) -> SampleOutput`.

  Each video's length is drawn from `length_probabilities` (share of each length 0..capacity, as
  `length_distribution` measures), conditioned on adding to its given prefix; its other frames start
  as noise and move together through `num_steps` Euler steps of one shared time, the given ones
  clean (time 1) in the context channel. `apply_fn` as in `sampler.make_sampler`.
  """
  _check_learned_order(config, 'full_sequence')
  probabilities = np.asarray(length_probabilities, np.float64)
  if probabilities.shape != (capacity + 1,) or probabilities[1:].sum() <= 0:
    raise ValueError(f'expected the share of each length 0..{capacity}, got {probabilities.shape} '
                     'values; train with --config.method=full_sequence to measure them')
  log_probabilities = jnp.log(jnp.asarray(probabilities[1:] / probabilities[1:].sum(), jnp.float32))
  b, n, frame_shape = batch_size, capacity, tuple(frame_shape)
  slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

  def sample(params, key, labels=None, init_frames=None, context_mask=None,
             **unused) -> sampler_lib.SampleOutput:
    context, given = _check_call(labels, num_classes, b, n, frame_shape, init_frames,
                                 context_mask, **unused)
    prefix = _prefix_length(given)
    length_key, noise_key = jax.random.split(key)
    # Lengths 1..N that add at least one frame to the prefix, as in training; where the data has
    # none, the prefix alone.
    holding = jnp.where(jnp.arange(1, n + 1)[None, :] > prefix[:, None], log_probabilities,
                        -jnp.inf)
    lengths = jnp.where(jnp.isfinite(holding).any(axis=1),
                        1 + jax.random.categorical(length_key, holding, axis=-1),
                        jnp.maximum(prefix, 1))
    alive = slots < lengths[:, None]
    moving = alive & ~given

    def step(k, frames):
      t_now, t_next = k / config.num_steps, (k + 1) / config.num_steps
      times = jnp.where(given, 1.0, t_now).astype(jnp.float32)
      inputs = (frames, context, flowception.snr_shift(times, config.snr_shift), slots, alive)
      velocity, _ = sampler_lib.guided_apply(apply_fn, params, inputs, labels, config,
                                             num_classes)
      return _euler(frames, velocity, moving, t_now, t_next, config.snr_shift)

    noise = jax.random.normal(noise_key, (b, n) + frame_shape, jnp.float32)
    frames = jax.lax.fori_loop(0, config.num_steps, step,
                               jnp.where(given[..., None, None, None], context, noise))
    return sampler_lib.SampleOutput(
        frames=jnp.where(alive[..., None, None, None], frames, 0.0),
        times=alive.astype(jnp.float32), lengths=lengths.astype(jnp.int32),
        insert_step=jnp.where(alive, 0, -1), num_iterations=jnp.int32(config.num_steps),
        context_slots=jnp.where(given, slots, -1))

  return jax.jit(sample)


def make_autoregressive_sampler(apply_fn: Callable[..., Any], *,
                                config: sampler_lib.SamplerConfig, batch_size: int, capacity: int,
                                frame_shape: tuple[int, ...], num_classes: int = 0,
                                causal: bool = True) -> Callable[..., sampler_lib.SampleOutput]:
  """The jitted sampler of an autoregressive method: `sample(params, key, labels=None,
  init_frames=None, context_mask=None, ...) -> SampleOutput`.

  Frame i starts as noise and takes `num_steps` Euler steps while frames 0..i-1, clean, are its
  context: under `model.causal_attention(positions)` (`causal`, the 'autoregressive' method) or
  `model.noncausal_attention` of frame i ('autoregressive_noncausal': the clean frames see each
  other both ways), as each method trains. The first evaluation of frame i also yields the
  end-of-video logit of frame i - 1 (which, under either mask, does not see frame i): a video ends
  there with probability `sigmoid(logit)`, or at the capacity. A video given frames 0..K-1 starts
  at frame K. The loop runs until every video has ended, one evaluation per iteration;
  `insert_step` is the iteration at which each frame began (0 for given frames).

  Under either mask the clean frames never see frame i, so their keys and values stay the same
  while it is made: the first evaluation of frame i, on the whole sequence, returns them
  (`apply_fn(..., return_kv=True)`, a `model.KVCache`), and the other steps evaluate frame i
  alone against them (`past`), at about 1 / capacity of the cost.
  """
  _check_learned_order(config, 'autoregressive' if causal else 'autoregressive_noncausal')
  b, n, frame_shape = batch_size, capacity, tuple(frame_shape)
  steps = config.num_steps
  slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

  def attention(made: jax.Array) -> jax.Array:
    """bool [B, N, N] of the sequence that makes the frames `made` bool [B, N]."""
    return model_lib.causal_attention(slots) if causal else model_lib.noncausal_attention(made)

  def sample(params, key, labels=None, init_frames=None, context_mask=None,
             **unused) -> sampler_lib.SampleOutput:
    context, given = _check_call(labels, num_classes, b, n, frame_shape, init_frames,
                                 context_mask, **unused)
    prefix = _prefix_length(given)
    empty = jnp.zeros_like(context)  # Training shows the prefix as clean past frames.
    noise_key, key = jax.random.split(key)

    def evaluate(inputs, **kwargs):
      return sampler_lib.guided_apply(apply_fn, params, inputs, labels, config, num_classes,
                                      **kwargs)

    def running(iteration, lengths):
      current = prefix + iteration // steps
      return jnp.any((current < n) & (lengths > current))

    def make_frame(state):
      """Every video's frame `current`: its first step on the whole sequence, which also says
      whether the video ended before it; its other steps on it alone."""
      iteration, frames, lengths, key = state
      current = prefix + iteration // steps
      made = slots == current[:, None]
      times = flowception.snr_shift(jnp.where(slots < current[:, None], 1.0, 0.0), config.snr_shift)
      inputs = (frames, empty, times, slots, slots <= current[:, None])
      velocity, end_logit, past = evaluate(inputs, frame_attention=attention(made),
                                           return_kv=True)
      key, end_key = jax.random.split(key)
      previous = jnp.take_along_axis(end_logit, jnp.maximum(current - 1, 0)[:, None], axis=1)[:, 0]
      ends = (current > 0) & jax.random.bernoulli(end_key, jax.nn.sigmoid(previous))
      lengths = jnp.where((lengths == n) & ends, jnp.minimum(current, n), lengths)  # n: going.
      frames = _euler(frames, velocity, made, 0.0, 1 / steps, config.snr_shift)

      at = jnp.minimum(current, n - 1)[:, None, None, None, None]
      sees = jnp.concatenate([slots < current[:, None], jnp.ones((b, 1), bool)], axis=1)[:, None]

      def step(k, frames):
        t_now = k / steps
        frame = jnp.take_along_axis(frames, at, axis=1)
        times = jnp.full((b, 1), flowception.snr_shift(t_now, config.snr_shift))
        inputs = (frame, empty[:, :1], times, current[:, None], jnp.ones((b, 1), bool))
        velocity, _ = evaluate(inputs, frame_attention=sees, past=past)
        return _euler(frames, velocity, made, t_now, (k + 1) / steps, config.snr_shift)

      going = running(iteration + 1, lengths)  # Else the loop stops after this first step.
      frames = jax.lax.cond(going, lambda f: jax.lax.fori_loop(1, steps, step, f), lambda f: f,
                            frames)
      return iteration + jnp.where(going, steps, 1), frames, lengths, key

    noise = jax.random.normal(noise_key, (b, n) + frame_shape, jnp.float32)
    frames = jnp.where(given[..., None, None, None], context, noise)
    state = (jnp.int32(0), frames, jnp.full((b,), n, jnp.int32), key)
    iterations, frames, lengths, _ = jax.lax.while_loop(lambda s: running(s[0], s[2]), make_frame,
                                                        state)
    lengths = jnp.maximum(lengths, prefix)
    alive = slots < lengths[:, None]
    return sampler_lib.SampleOutput(
        frames=jnp.where(alive[..., None, None, None], frames, 0.0),
        times=alive.astype(jnp.float32), lengths=lengths,
        insert_step=jnp.where(alive, jnp.maximum(slots - prefix[:, None], 0) * steps, -1),
        num_iterations=iterations, context_slots=jnp.where(given, slots, -1))

  return jax.jit(sample)
