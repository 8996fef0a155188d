"""The Flowception generative process: per-frame flow denoising interleaved with frame insertions.

A fixed buffer of `capacity` frame slots per video holds the alive frames left-aligned. Every
iteration makes one model evaluation (two, batched, under classifier-free guidance), moves every
alive non-context frame one ODE step towards `t = 1` (Euler, or Heun with a second evaluation at
the Euler prediction), and, while the global time `t_g < 1`,
inserts fresh noise frames after each frame with the scheduler's hazard times the predicted rate.
Insertions that do not fit in the buffer are dropped (the leftmost gaps are served first); existing
frames never are. The whole run is one `jax.lax.while_loop` inside `jax.jit`, so any generated
length costs one compilation.

Per-frame times are derived from integer step counts, so a frame that entered at iteration `k`
reaches exactly `t = 1` after `num_steps` iterations and the run lasts at most `2 * num_steps`.

Every video has its own key, iteration count and global time, and stops on its own (a finished
video is frozen while others run). All randomness of video b at its iteration k comes from
`fold_in(key_b, k)`, and each per-slot draw (the noise of a new frame landing at slot s, the
insertion count of gap s, a random order's choice) from that key folded with s: a video's sample
depends neither on the batch it is in, nor on its place there, nor on the buffer capacity as long
as its frames fit. This is what lets `staged_sampler.py` move videos between buffers of growing
capacity and still draw exactly the videos of this sampler.
"""

import dataclasses
import functools
from typing import Any, Callable

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flowception_jax.core import flowception
from flowception_jax.core import orders

INSERTION_MODES = ('bernoulli', 'thinning', 'poisson')
SOLVERS = ('euler', 'heun')

# `apply_fn(params, frames, context, frame_times, positions, frame_mask, labels)
#   -> (velocity [B, N, H, W, C], log_rate [B, N])`; the autoregressive samplers also pass the
# DiT's `frame_attention`, `past` and `return_kv` (which adds a `model.KVCache` to the outputs).
ApplyFn = Callable[..., tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling hyper-parameters.

  num_steps: Euler steps per unit of time, `h = 1 / num_steps`.
  num_start_frames: noise frames a video starts from when it is given no initial frame.
  kappa: insertion scheduler name (`flowception.KAPPAS`).
  insertion: the law of a gap's insertion count in a step, whose mean is `lambda * mass`:
    'bernoulli' one frame with probability `1 - exp(-lambda * mass)`; 'poisson' counts;
    'thinning' each of the `lambda` expected missing frames arrives with the scheduler's
    conditional probability `mass`, i.e. `Binomial(floor(lambda), mass) + Bernoulli(frac(lambda)
    mass)`: the exact law when the rate is an exact count, so the last step (`mass = 1`) inserts
    every frame still missing where the other laws may drop some.
  guidance_scale: classifier-free guidance weight on the velocity (1 is off).
  rate_guidance: guidance weight on the insertion log-rates (1 is off).
  snr_shift: the denoising-time shift the model was trained with (1 is off).
  order: where frames are inserted: 'learned' (the model's rates) or a prescribed order at the same
    expected count (`orders.ORDERS`).
  solver: the flow step: 'euler', or 'heun' (second order, two model evaluations per step). The
    insertions use the rates of the step's first evaluation either way, so their law is the same.
  """
  num_steps: int
  num_start_frames: int
  kappa: str = 'linear'
  insertion: str = 'bernoulli'
  guidance_scale: float = 1.0
  rate_guidance: float = 1.0
  snr_shift: float = 1.0
  order: str = 'learned'
  solver: str = 'euler'

  def __post_init__(self):
    if self.insertion not in INSERTION_MODES:
      raise ValueError(f'unknown insertion mode {self.insertion!r}; known: '
                       f'{", ".join(INSERTION_MODES)}; set --config.sampler.insertion')
    if self.solver not in SOLVERS:
      raise ValueError(f'unknown solver {self.solver!r}; known: {", ".join(SOLVERS)}; '
                       'set --config.sampler.solver')
    if self.num_steps < 1:
      raise ValueError(f'num_steps must be >= 1, got {self.num_steps}; '
                       'set --config.sampler.num_steps')
    if self.num_start_frames < 1:
      raise ValueError(f'num_start_frames must be >= 1, got {self.num_start_frames}; '
                       'set --config.flow.num_start_frames')
    flowception.get_kappa(self.kappa)
    orders.check_order(self.order)

  @property
  def max_iterations(self) -> int:
    """Hard cap on loop iterations: the last insertion needs `num_steps` more to be clean."""
    return 2 * self.num_steps + 2


@flax.struct.dataclass
class SamplerState:
  """The loop carry. Alive frames are left-aligned; dead slots hold zeros.

  frames: float32 [B, N, H, W, C]; context frames are clean and never change.
  times: float32 [B, N] per-frame flow time (1 for context frames, 0 for dead slots).
  alive: bool [B, N].
  context: bool [B, N] clean conditioning frames (also fed in the model's context channel).
  passive: bool [B, N] frames that never insert.
  insert_step: int32 [B, N] first iteration the frame takes part in: 0 for initial frames, k + 1
    for a frame inserted during iteration k, -1 for dead slots.
  planned: int32 [B, N] planned final index of each frame (see `orders`), -1 for dead slots.
  t_global: float32 [B], `iteration / num_steps` capped at 1.
  iteration: int32 [B], iterations the video has run.
  key: PRNG keys [B]: video b draws its iteration k from `fold_in(key[b], k)`.
  """
  frames: jax.Array
  times: jax.Array
  alive: jax.Array
  context: jax.Array
  passive: jax.Array
  insert_step: jax.Array
  planned: jax.Array
  t_global: jax.Array
  iteration: jax.Array
  key: jax.Array


@flax.struct.dataclass
class SampleOutput:
  """Generated videos: the first `lengths[b]` slots of video b; other slots are zero.

  frames: float32 [B, N, H, W, C].
  times: float32 [B, N] final flow times (1 for every alive frame after a complete run).
  lengths: int32 [B].
  insert_step: int32 [B, N] as in `SamplerState`.
  num_iterations: int32 scalar, the most iterations any video ran (those of the plain loop).
  context_slots: int32 [B, N] where the context frames ended up: entry k is the slot of the k-th
    context frame in the given order (insertions never reorder frames), -1 past the last one.
  """
  frames: jax.Array
  times: jax.Array
  lengths: jax.Array
  insert_step: jax.Array
  num_iterations: jax.Array
  context_slots: jax.Array


def insert_frames(slots: Any, alive: jax.Array, counts: jax.Array,
                  fill: Any) -> tuple[Any, jax.Array]:
  """Inserts `counts[b, i]` new frames right after alive slot i, keeping the order, left-aligned.

  slots: pytree of [B, N, ...] per-slot arrays; alive: bool [B, N] (need not be left-aligned);
  counts: int [B, N], ignored on dead slots; fill: pytree like `slots` whose value at output slot s
  is used when a new frame lands there. Old frame j moves to `exclusive_cumsum(alive + counts)[j]`,
  its new frames follow it; anything landing at index >= N is dropped. Dead output slots are zero.
  Returns (new_slots, new_alive).
  """
  chex.assert_equal_shape([alive, counts])
  capacity = alive.shape[1]
  counts = jnp.where(alive, jnp.clip(counts, 0, capacity), 0).astype(jnp.int32)
  occupied = alive.astype(jnp.int32) + counts
  ends = jnp.cumsum(occupied, axis=1)
  dest = jnp.where(alive, ends - occupied, capacity)  # Out of range: dead slots are dropped.
  total = jnp.minimum(ends[:, -1:], capacity)

  def scatter(dest_row, values):
    return jnp.zeros_like(values).at[dest_row].set(values, mode='drop')

  kept = jax.vmap(scatter)(dest, alive)
  new = (jnp.arange(capacity)[None, :] < total) & ~kept

  def place(old, filler):
    moved = jax.vmap(scatter)(dest, old)
    new_b = new.reshape(new.shape + (1,) * (old.ndim - 2))
    return jnp.where(new_b, filler, moved)

  return jax.tree.map(place, slots, fill), kept | new


def video_keys(key: jax.Array, num_videos: int) -> jax.Array:
  """The videos' keys [num_videos]: `key` split, or `key` itself if it holds one key per video."""
  if key.ndim == 0:
    return jax.random.split(key, num_videos)
  chex.assert_shape(key, (num_videos,))
  return key


def _slot_keys(keys: jax.Array, num_slots: int) -> jax.Array:
  """Keys [B, num_slots]: `fold_in(keys[b], s)`, the draws at slot s of video b."""
  fold = lambda key: jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(num_slots))
  return jax.vmap(fold)(keys)


def _per_slot(draw: Callable[..., jax.Array], keys: jax.Array, *args: jax.Array) -> jax.Array:
  """`draw(keys[b, s], *(x[b, s] for x in args))` for every video b and slot s, stacked."""
  return jax.vmap(jax.vmap(draw))(keys, *args)


def initial_state(keys: jax.Array, config: SamplerConfig, frame_shape, init_frames, init_alive,
                  context_mask, passive_mask) -> SamplerState:
  """Compacted initial slots: context frames clean at t = 1, other alive slots noise at t = 0.

  keys: the videos' keys [B]; the task arrays as `make_sampler`'s, [B, N, ...]. The noise of given
  slot j comes from the start stream of the video's key folded with j.
  """
  b, n = init_alive.shape
  start_keys, keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  noise = _per_slot(lambda k: jax.random.normal(k, frame_shape, jnp.float32),
                    _slot_keys(start_keys, n))
  context = context_mask & init_alive
  passive = passive_mask & init_alive
  # A video given nothing starts like an unconditional one.
  empty = ~jnp.any(init_alive, axis=1, keepdims=True)
  alive = jnp.where(empty, jnp.arange(n)[None, :] < config.num_start_frames, init_alive)
  frames = jnp.where(context[..., None, None, None], init_frames, noise)
  slots = (frames, context.astype(jnp.float32), context, passive, jnp.zeros((b, n), jnp.int32))
  (frames, times, context, passive, insert_step), alive = insert_frames(
      slots, alive, jnp.zeros((b, n), jnp.int32), slots)
  return SamplerState(frames=frames, times=times, alive=alive, context=context, passive=passive,
                      insert_step=jnp.where(alive, insert_step, -1),
                      planned=jnp.where(alive, jnp.arange(n), -1).astype(jnp.int32),
                      t_global=jnp.zeros((b,), jnp.float32), iteration=jnp.zeros((b,), jnp.int32),
                      key=keys)


def guided_apply(apply_fn: ApplyFn, params, inputs: tuple, labels, config: SamplerConfig,
                 num_classes: int, **kwargs) -> tuple[Any, ...]:
  """The model's outputs on `inputs`, with classifier-free guidance where the config asks.

  `apply_fn(params, *inputs, labels, **kwargs)` returns the velocity [B, N, H, W, C] and a second
  head [B, N] (Flowception's insertion log-rates, the autoregressive end logits), then anything
  else it returns (a `model.KVCache` with `return_kv`). With labels of a conditional model and a
  guidance scale other than 1, the batch is run twice, with the labels and with the null class
  `num_classes`: the velocity is `v_u + w (v_c - v_u)` (`guidance_scale`) and the second head
  `w_s h_c + (1 - w_s) h_u` (`rate_guidance`). Array arguments are doubled with the batch, except
  `past`, which holds the rows of an earlier evaluation (both halves), as returned.
  """
  guided = (num_classes > 0 and labels is not None
            and (config.guidance_scale != 1.0 or config.rate_guidance != 1.0))
  if not guided:
    return apply_fn(params, *inputs, labels, **kwargs)
  b = labels.shape[0]
  doubled = [jnp.concatenate([x, x]) for x in inputs]
  both_labels = jnp.concatenate([labels, jnp.full_like(labels, num_classes)])
  kwargs = {k: jnp.concatenate([v, v]) if k != 'past' and isinstance(v, jax.Array) else v
            for k, v in kwargs.items()}
  velocity, head, *rest = apply_fn(params, *doubled, both_labels, **kwargs)
  w, w_s = config.guidance_scale, config.rate_guidance
  return (velocity[b:] + w * (velocity[:b] - velocity[b:]),
          w_s * head[:b] + (1.0 - w_s) * head[b:], *rest)


def _evaluate(apply_fn: ApplyFn, params, state: SamplerState, labels, config: SamplerConfig,
              num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Velocity [B, N, H, W, C] and log-rate [B, N] of the state's frames (`guided_apply`)."""
  b, n = state.alive.shape
  context = jnp.where(state.context[..., None, None, None], state.frames, 0.0)
  inputs = (state.frames, context, flowception.snr_shift(state.times, config.snr_shift),
            jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), state.alive)
  return guided_apply(apply_fn, params, inputs, labels, config, num_classes)


def _integrate(state: SamplerState, times: jax.Array, moving: jax.Array, velocity: jax.Array,
               evaluate: Callable[[SamplerState], jax.Array], config: SamplerConfig) -> jax.Array:
  """Frames [B, N, H, W, C] after one flow step of the `moving` frames, `state.times` to `times`.

  The ODE runs in the model's (shifted) time, `dx / dt' = v`. `velocity` is the model's at the
  step's start; 'heun' also evaluates it at the Euler prediction (`evaluate(state) -> velocity`)
  and steps along the mean of both, except on a frame's last step: training never supervises the
  velocity at t = 1, so a step that ends there is plain Euler (and when every moving frame ends
  there, the second evaluation is skipped).
  """
  dt = (flowception.snr_shift(times, config.snr_shift)
        - flowception.snr_shift(state.times, config.snr_shift))[..., None, None, None]
  frames = jnp.where(moving[..., None, None, None], state.frames + dt * velocity, state.frames)
  if config.solver != 'heun':
    return frames
  corrected = (moving & (times < 1.0))[..., None, None, None]

  def heun(frames):
    end_velocity = evaluate(state.replace(frames=frames, times=times)).astype(jnp.float32)
    return jnp.where(corrected, state.frames + dt * (velocity + end_velocity) / 2, frames)

  return jax.lax.cond(jnp.any(corrected), heun, lambda frames: frames, frames)


def _insertion_counts(insertion: str, rate: jax.Array, mass: jax.Array, keys: jax.Array,
                      max_frames: int) -> jax.Array:
  """Insertion counts int32 [B, N] of the gaps in one step, drawn slot by slot.

  rate: float32 [B, N] expected missing frames per gap; mass: float32 [B, 1] the scheduler's
  probability mass of the step; keys: [B, N] per-slot keys; max_frames: the largest capacity
  (thinning caps rates there: more frames never fit).
  """
  mass = jnp.broadcast_to(mass, rate.shape)
  if insertion == 'poisson':
    draw = lambda key, r, m: jax.random.poisson(key, r * m, dtype=jnp.int32)
  elif insertion == 'bernoulli':
    draw = lambda key, r, m: jax.random.bernoulli(key, -jnp.expm1(-r * m)).astype(jnp.int32)
  else:

    def draw(key, r, m):
      whole_key, frac_key = jax.random.split(key)
      r = jnp.minimum(r, max_frames)
      whole = jnp.floor(r)
      return (jax.random.binomial(whole_key, whole, m)
              + jax.random.bernoulli(frac_key, (r - whole) * m)).astype(jnp.int32)

  return _per_slot(draw, keys, rate, mass)


def advance(state: SamplerState, *, apply_fn: ApplyFn, params, labels, config: SamplerConfig,
            kappa: flowception.Kappa, num_classes: int,
            max_frames: int) -> tuple[SamplerState, jax.Array]:
  """One iteration of every video: model evaluation, flow step, insertions, `t_g += h`.

  state: [B, N] slots; max_frames: the largest capacity any video is sampled in (N itself for
  the plain sampler). Returns the advanced state and each video's demand int32 [B]: its alive
  frames plus the insertions drawn, before those beyond the N slots are dropped.
  """
  b, n = state.alive.shape
  h = 1.0 / config.num_steps
  draw_keys = jax.vmap(lambda key, k: jax.random.split(jax.random.fold_in(key, k), 3))(
      state.key, state.iteration)
  noise_keys, count_keys, order_keys = (_slot_keys(draw_keys[:, i], n) for i in range(3))
  velocity, log_rate = _evaluate(apply_fn, params, state, labels, config, num_classes)
  chex.assert_equal_shape([velocity, state.frames])
  chex.assert_equal_shape([log_rate, state.times])

  # Flow: times come from step counts, so they hit exactly 1 after `num_steps` steps.
  moving = state.alive & ~state.context & (state.times < 1.0)
  steps_done = (state.iteration[:, None] + 1 - state.insert_step).astype(jnp.float32)
  times = jnp.where(moving, jnp.minimum(steps_done / config.num_steps, 1.0), state.times)
  frames = _integrate(
      state, times, moving, velocity.astype(jnp.float32),
      lambda s: _evaluate(apply_fn, params, s, labels, config, num_classes)[0], config)

  # Insertion: Poisson mean of new frames in each gap during [t_g, t_g + h].
  mass = jnp.where(state.t_global < 1.0,
                   flowception.insertion_probability_mass(kappa, state.t_global, h), 0.0)
  may_insert = state.alive & ~state.passive
  rate = jnp.exp(jnp.minimum(log_rate.astype(jnp.float32), flowception.MAX_LOG_RATE))
  rate, tail_room = orders.order_rates(config.order, rate, may_insert, state.planned, state.alive,
                                       order_keys)
  counts = _insertion_counts(config.insertion, rate, mass[:, None], count_keys, max_frames)
  counts = jnp.where(may_insert, counts, 0)
  alive_count = jnp.sum(state.alive, axis=1, dtype=jnp.int32)
  demand = alive_count + jnp.sum(counts, axis=1, dtype=jnp.int32)
  # Overflow drops insertions, never existing frames: free slots go to the leftmost gaps first.
  free = (n - alive_count)[:, None]
  counts = jnp.clip(free - (jnp.cumsum(counts, axis=1) - counts), 0, counts)
  noise = _per_slot(lambda k: jax.random.normal(k, state.frames.shape[2:], jnp.float32), noise_keys)
  fill = (noise, jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), bool), jnp.zeros((b, n), bool),
          jnp.broadcast_to(state.iteration[:, None] + 1, (b, n)), jnp.full((b, n), -1, jnp.int32))
  slots = (frames, times, state.context, state.passive, state.insert_step, state.planned)
  (frames, times, context, passive, insert_step, planned), alive = insert_frames(
      slots, state.alive, counts, fill)

  iteration = state.iteration + 1
  return SamplerState(frames=frames, times=times, alive=alive, context=context, passive=passive,
                      insert_step=jnp.where(alive, insert_step, -1),
                      planned=orders.plan_new_frames(planned, alive, tail_room),
                      t_global=jnp.minimum(iteration / config.num_steps, 1.0).astype(jnp.float32),
                      iteration=iteration, key=state.key), demand


def select_videos(mask: jax.Array, new: SamplerState, old: SamplerState) -> SamplerState:
  """Video b of `new` where `mask[b]` (bool [B]), else of `old`."""
  return jax.tree.map(lambda x, y: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, y),
                      new, old)


def running(state: SamplerState, config: SamplerConfig) -> jax.Array:
  """bool [B]: False once a video's `t_g >= 1` and its alive non-context frames are all clean, or
  at the iteration cap."""
  in_flow = state.alive & ~state.context & (state.times < 1.0)
  done = (state.t_global >= 1.0) & ~jnp.any(in_flow, axis=1)
  return ~done & (state.iteration < config.max_iterations)


def _step(state: SamplerState, **kwargs) -> SamplerState:
  """One iteration of the running videos (`advance`); finished ones stay as they are."""
  advanced, _ = advance(state, max_frames=state.alive.shape[1], **kwargs)
  return select_videos(running(state, kwargs['config']), advanced, state)


def split_over_batch(state: SamplerState) -> SamplerState:
  """Keeps the per-video arrays of the carry split over the mesh's batch axes.

  A no-op outside a mesh with logical axis rules; inside one, every iteration runs sharded over
  the videos instead of wherever the compiler's propagation would leave the loop carry.
  """
  return jax.tree.map(
      lambda x: nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1)), state)


def sample_output(state: SamplerState) -> SampleOutput:
  """The videos of a final state [B, N]: dead slots zeroed, lengths, where the context went."""
  alive = state.alive
  n = alive.shape[1]
  context_slots = jnp.sort(jnp.where(state.context, jnp.arange(n), n), axis=1)
  return SampleOutput(
      frames=jnp.where(alive[..., None, None, None], state.frames, 0.0),
      times=jnp.where(alive, state.times, 0.0),
      lengths=jnp.sum(alive, axis=1, dtype=jnp.int32),
      insert_step=state.insert_step,
      num_iterations=jnp.max(state.iteration),
      context_slots=jnp.where(context_slots < n, context_slots, -1).astype(jnp.int32))


def task_inputs(num_videos: int, capacity: int, frame_shape: tuple[int, ...], num_classes: int,
                labels=None, init_frames=None, init_alive=None, context_mask=None,
                passive_mask=None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Checked task arrays of `make_sampler`'s function, defaults filled in.

  Returns (init_frames float32 [V, N, H, W, C], init_alive, context_mask, passive_mask bool
  [V, N]) for V = `num_videos` and N = `capacity`; raises ValueError on arguments that do not go
  together.
  """
  v, n = num_videos, capacity
  if labels is not None:
    if not num_classes:
      raise ValueError('labels given to the sampler of an unconditional model')
    chex.assert_shape(labels, (v,))
  if init_frames is None:
    if any(m is not None for m in (init_alive, context_mask, passive_mask)):
      raise ValueError('init_alive, context_mask and passive_mask need init_frames')
    init_frames = jnp.zeros((v, n) + frame_shape, jnp.float32)
    init_alive = context_mask = jnp.zeros((v, n), bool)
  elif context_mask is None:
    raise ValueError('init_frames needs a context_mask marking the given frames')
  init_alive = context_mask if init_alive is None else init_alive
  passive_mask = jnp.zeros((v, n), bool) if passive_mask is None else passive_mask
  chex.assert_shape(init_frames, (v, n) + frame_shape)
  chex.assert_shape([init_alive, context_mask, passive_mask], (v, n))
  return (jnp.asarray(init_frames, jnp.float32), jnp.asarray(init_alive, bool),
          jnp.asarray(context_mask, bool), jnp.asarray(passive_mask, bool))


def check_capacity(config: SamplerConfig, capacity: int) -> None:
  if config.num_start_frames > capacity:
    raise ValueError(f'num_start_frames {config.num_start_frames} exceeds the capacity {capacity}; '
                     'lower --config.flow.num_start_frames')


def make_sampler(apply_fn: ApplyFn, *, config: SamplerConfig, batch_size: int, capacity: int,
                 frame_shape: tuple[int, ...], num_classes: int = 0) -> Callable[..., SampleOutput]:
  """The jitted sampler of `batch_size` videos of at most `capacity` frames of `frame_shape`.

  Returns `sample(params, key, labels=None, init_frames=None, init_alive=None, context_mask=None,
  passive_mask=None) -> SampleOutput`, compiled once per combination of given arguments.

  `key` is one key, split into the videos' keys, or the videos' keys [B] (`video_keys`).
  Without `init_frames` every video starts from `num_start_frames` noise frames. With `init_frames`
  [B, N, H, W, C] and `context_mask` bool [B, N], the context frames are clean, frozen and fed in
  the context channel; `init_alive` (default: `context_mask`) may mark further slots, which start
  as noise at t = 0, so the caller chooses where start frames sit relative to the context (none by
  default: insertions fill the video). Alive slots are compacted in order.
  `passive_mask` marks frames that never insert (e.g. the last key frame of an interpolation).
  A video whose `init_alive` is empty starts from `num_start_frames` noise frames.
  `labels` int [B] for class-conditional models (`num_classes > 0`); None samples unconditionally.
  """
  frame_shape = tuple(frame_shape)
  check_capacity(config, capacity)
  kappa = flowception.get_kappa(config.kappa)

  def sample(params, key, labels=None, init_frames=None, init_alive=None, context_mask=None,
             passive_mask=None) -> SampleOutput:
    given = task_inputs(batch_size, capacity, frame_shape, num_classes, labels, init_frames,
                        init_alive, context_mask, passive_mask)
    state = initial_state(video_keys(key, batch_size), config, frame_shape, *given)
    body = functools.partial(_step, apply_fn=apply_fn, params=params, labels=labels, config=config,
                             kappa=kappa, num_classes=num_classes)
    state = jax.lax.while_loop(lambda s: jnp.any(running(s, config)),
                               lambda s: split_over_batch(body(s)), split_over_batch(state))
    return sample_output(state)

  return jax.jit(sample)
