"""Staged sampling: the Flowception process at the cost of the frames that exist.

The plain sampler (`sampler.make_sampler`) runs the model over all `N_max` slots of every video at
every iteration, although early in a run most slots are empty, and keeps every video of its batch
in the loop until the last one ends. Here every video runs in the smallest of a few buffer
capacities (stages, e.g. the training buckets, the last one `N_max`) that holds its frames:

- Each stage is one compiled `jax.lax.while_loop` over a fixed `[batch_size, C]` buffer that steps
  its videos with the plain sampler's own iteration (`sampler.advance`). A video leaves the loop
  (is frozen) when it finishes, or when the insertions drawn at its next iteration would not fit in
  `C`: that iteration is not applied, and the video is promoted to the first stage that holds
  them. As all randomness of a video comes from its key folded with its iteration and slots (see
  `sampler.py`), replaying that iteration there draws the same insertions, so every video follows
  exactly the trajectory it has in the plain sampler (up to the float rounding of the model on
  other shapes). In the last stage overflowing insertions are dropped, as in the plain sampler.
- The loop returns when fewer than a threshold of its videos still run. A host-side scheduler
  keeps a pool of video states per stage: finished videos go to the output, promoted ones are
  padded to their new capacity and queued there, running ones go back to their pool. It always
  runs the lowest stage that has videos, the least advanced videos first, in full batches while
  the pool lasts (inert videos pad a short batch). A stage's last few videos, fewer than would pay
  for a batch of that stage, move up to the next stage: a larger buffer than needed changes
  nothing but the cost. `docs/benchmark.md` has the measured savings.

Every stage compiles once per combination of given arguments (labels or not); the videos' count is
free.
"""

from concurrent import futures
import dataclasses
import functools
import math
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flowception_jax.core import flowception
from flowception_jax.core import sampler as sampler_lib

MAX_DEFAULT_STAGES = 12  # Stages `default_stages` makes at most.
_COMPILE_THREADS = 4  # Stages compiled at once at most (each compilation holds its own memory).
# The task arguments of `sampler.make_sampler`'s function, after the key and labels.
_TASK_ARGUMENTS = ('init_frames', 'init_alive', 'context_mask', 'passive_mask')
# Slot arrays of `SamplerState` and the value of a dead slot in each.
_DEAD_SLOT = {'frames': 0.0, 'times': 0.0, 'alive': False, 'context': False, 'passive': False,
              'insert_step': -1, 'planned': -1}


@dataclasses.dataclass(frozen=True)
class StageCall:
  """One run of a stage's loop: its capacity, the real videos in its batch, the loop iterations
  run (every one evaluates the whole `[batch_size, capacity]` buffer) and the iterations its
  videos advanced (the useful part)."""
  capacity: int
  videos: int
  loops: int
  video_steps: int


@dataclasses.dataclass
class _Video:
  """A video waiting in a pool: its index in the call and its state, one video of `SamplerState`
  as NumPy arrays without the batch axis (the key as raw key data, `_key_data_shape`)."""
  index: int
  state: sampler_lib.SamplerState


def default_stages(first: int, capacity: int) -> tuple[int, ...]:
  """Evenly spaced capacities from `first` (the frames a video starts with) to `capacity`, at
  most `MAX_DEFAULT_STAGES`: every frame count where that many fit. Each stage costs one
  compilation; finer stages waste fewer slots (`docs/benchmark.md#staged-sampling`)."""
  first = max(1, min(first, capacity))
  step = max(1, math.ceil((capacity - first) / (MAX_DEFAULT_STAGES - 1)))
  return tuple(range(first, capacity, step)) + (capacity,)


def check_stages(stages, capacity: int) -> tuple[int, ...]:
  """`stages` as positive increasing capacities ending at `capacity`; ValueError if they are not."""
  stages = tuple(int(c) for c in stages)
  if (not stages or stages[0] < 1 or stages[-1] != capacity
      or any(a >= b for a, b in zip(stages, stages[1:]))):
    raise ValueError(f'sampler stages {stages} must be positive, increase and end at the capacity '
                     f'{capacity}; set --config.sampler.stages')
  return stages


def _resize(state: sampler_lib.SamplerState, capacity: int) -> sampler_lib.SamplerState:
  """One video's state with its slot arrays cut or padded (dead slots) to `capacity`."""
  n = state.alive.shape[0]
  if np.any(state.alive[capacity:]):
    raise ValueError(f'a video of {int(state.alive.sum())} frames does not fit {capacity} slots')

  def fit(x, fill):
    if capacity <= n:
      return x[:capacity]
    return np.concatenate([x, np.full((capacity - n,) + x.shape[1:], fill, x.dtype)])

  return state.replace(**{name: fit(getattr(state, name), fill)
                          for name, fill in _DEAD_SLOT.items()})


def _inert(capacity: int, frame_shape: tuple[int, ...],
           config: sampler_lib.SamplerConfig) -> sampler_lib.SamplerState:
  """A finished one-frame video (one of the batch axis) that pads short batches."""
  first = np.arange(capacity) == 0
  return sampler_lib.SamplerState(
      frames=np.zeros((capacity,) + frame_shape, np.float32), times=first.astype(np.float32),
      alive=first, context=np.zeros(capacity, bool), passive=np.zeros(capacity, bool),
      insert_step=np.where(first, 0, -1).astype(np.int32),
      planned=np.where(first, 0, -1).astype(np.int32), t_global=np.float32(1.0),
      iteration=np.int32(config.max_iterations), key=np.zeros(_key_data_shape(), np.uint32))


def _key_data_shape() -> tuple[int, ...]:
  """The shape of one key's raw data under the default PRNG implementation (threefry: (2,))."""
  return jax.random.key_data(jax.random.key(0)).shape


def _stack(states: list[sampler_lib.SamplerState]) -> sampler_lib.SamplerState:
  return jax.tree.map(lambda *xs: np.stack(xs), *states)


def _unstack(batch: sampler_lib.SamplerState, count: int) -> list[sampler_lib.SamplerState]:
  return [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(count)]


def _stage_loop(params, state: sampler_lib.SamplerState, labels, stop_below: jax.Array, *,
                capacity: int, max_frames: int, config: sampler_lib.SamplerConfig,
                **step_kwargs) -> tuple[sampler_lib.SamplerState, jax.Array, jax.Array, jax.Array]:
  """Steps the videos of `state` [B, capacity] until fewer than `stop_below` (a count) of them run.

  `state.key` is raw key data uint32 [B, ...], on the way in and out. A video stops running when it
  finishes or, below `max_frames`, when its next iteration would need more than `capacity` slots
  (that iteration is then not applied). Returns (state, needed int32 [B]: the slots the next
  iteration of a promoted video needs, 0 for the others; running bool [B]; loop iterations run).
  """
  state = state.replace(key=jax.random.wrap_key_data(state.key))
  b = state.alive.shape[0]

  def active(state, needed):
    return sampler_lib.running(state, config) & (needed == 0)

  def go_on(carry):
    count = jnp.sum(active(*carry[:2]))
    return (count > 0) & (count >= stop_below)

  def body(carry):
    state, needed, loops = carry
    advanced, demand = sampler_lib.advance(state, params=params, labels=labels, config=config,
                                           max_frames=max_frames, **step_kwargs)
    stepping = active(state, needed)
    overflow = stepping & (demand > capacity) if capacity < max_frames else jnp.zeros(b, bool)
    state = sampler_lib.select_videos(stepping & ~overflow, advanced, state)
    return sampler_lib.split_over_batch(state), jnp.where(overflow, demand, needed), loops + 1

  state, needed, loops = jax.lax.while_loop(
      go_on, body, (sampler_lib.split_over_batch(state), jnp.zeros(b, jnp.int32), jnp.int32(0)))
  return (state.replace(key=jax.random.key_data(state.key)), needed,
          sampler_lib.running(state, config) & (needed == 0), loops)


class StagedSampler:
  """Samples any number of videos in stages of growing capacity, `batch_size` at a time.

  `sampler(params, keys, labels=None, init_frames=None, init_alive=None, context_mask=None,
  passive_mask=None) -> SampleOutput` (NumPy arrays) takes the videos' keys [V] and the arguments
  of `sampler.make_sampler`'s function for all V videos ([V, N_max, ...]); video v is the one the
  plain sampler draws from `keys[v]` with the same arguments, whatever batch it would be in.
  """

  def __init__(self, apply_fn: sampler_lib.ApplyFn, *, config: sampler_lib.SamplerConfig,
               batch_size: int, capacity: int, stages, frame_shape: tuple[int, ...],
               num_classes: int = 0, min_running: float = 1.0,
               fetch: Callable[[Any], Any] = jax.device_get):
    """`capacity`: `N_max`; `stages`: increasing capacities, the last one `capacity`.
    `min_running`: the share of the batch below which a loop returns to refill its batch from its
    pool. `fetch`: how arrays come to the host (`inference.to_host` on several processes)."""
    sampler_lib.check_capacity(config, capacity)
    self.stages = check_stages(stages, capacity)
    if not 0.0 < min_running <= 1.0:
      raise ValueError(f'min_running must be in (0, 1], got {min_running}; '
                       'set --config.sampler.min_running')
    self.config, self.batch_size, self.num_classes = config, batch_size, num_classes
    self.frame_shape, self.fetch, self.capacity = tuple(frame_shape), fetch, capacity
    self._inert = {c: _inert(c, self.frame_shape, config) for c in self.stages}
    self._refill_threshold = max(1, math.ceil(min_running * batch_size))
    # Below this many videos a stage's batch costs more than carrying them in the next stage's.
    self._move_up = [math.ceil(batch_size * c / d) for c, d in zip(self.stages, self.stages[1:])]
    kappa = flowception.get_kappa(config.kappa)
    self._loops = {c: jax.jit(functools.partial(
        _stage_loop, capacity=c, max_frames=self.capacity, config=config, apply_fn=apply_fn,
        kappa=kappa, num_classes=num_classes)) for c in self.stages}
    self._start = jax.jit(self._initial_states)
    self._output = jax.jit(sampler_lib.sample_output)
    self._compiled = set()  # For calls with labels (True) or without (False).

  def _stage_of(self, frames: int) -> int:
    """The first stage whose capacity holds `frames` (the last one if none does)."""
    return next((s for s, c in enumerate(self.stages) if c >= frames), len(self.stages) - 1)

  def _abstract_batch(self, capacity: int, labeled: bool):
    """Shapes of a stage loop's arguments after `params`: a batch's state, labels, threshold."""
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.batch_size,) + np.shape(x),
                                                        np.asarray(x).dtype),
                         self._inert[capacity])
    labels = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32) if labeled else None
    return state, labels, jax.ShapeDtypeStruct((), jnp.int32)

  def compile(self, params, labeled: bool = False) -> None:
    """Compiles every stage's loop ahead of time, for calls with labels or without (jit reuses
    these compilations), and the initial states and outputs, by making those of one video.

    The stages are lowered here, in the caller's mesh and axis rules, and compiled side by side,
    one thread per core: compiling a loop is mostly single-threaded, and a run needs them all.
    """
    if labeled in self._compiled:
      return
    if labeled and not self.num_classes:
      raise ValueError('labels given to the sampler of an unconditional model')
    lowered = [self._loops[c].lower(params, *self._abstract_batch(c, labeled))
               for c in self.stages[::-1]]  # The largest, slowest to compile, first.
    with futures.ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, _COMPILE_THREADS)) as pool:
      list(pool.map(lambda stage: stage.compile(), lowered))
    self._start_pools(np.zeros((1,) + _key_data_shape(), np.uint32),
                      np.zeros(1, np.int32) if labeled else None,
                      dict.fromkeys(_TASK_ARGUMENTS))
    self._outputs([self._inert[self.capacity]])
    self._compiled.add(labeled)

  def _run_batch(self, params, stage: int, videos: list[_Video], labels, stop_below: int):
    """One loop of `stage` over `videos` padded to the batch size with inert ones."""
    capacity = self.stages[stage]
    states = [v.state for v in videos]
    states += [self._inert[capacity]] * (self.batch_size - len(videos))
    batch_labels = None
    if labels is not None:
      batch_labels = np.zeros(self.batch_size, np.int32)
      batch_labels[:len(videos)] = labels[[v.index for v in videos]]
    return self.fetch(self._loops[capacity](params, _stack(states), batch_labels,
                                            np.int32(stop_below)))

  def _initial_states(self, key_data, labels, **given) -> sampler_lib.SamplerState:
    """`sampler.initial_state` of one batch: key data uint32 [B, ...], the task arrays [B, ...]."""
    inputs = sampler_lib.task_inputs(self.batch_size, self.capacity, self.frame_shape,
                                     self.num_classes, labels, **given)
    state = sampler_lib.initial_state(jax.random.wrap_key_data(key_data), self.config,
                                      self.frame_shape, *inputs)
    return state.replace(key=jax.random.key_data(state.key))

  def _start_pools(self, key_data: np.ndarray, labels, given) -> list[list[_Video]]:
    """Every video's initial state, queued in the first stage that holds its frames.

    key_data: uint32 [V, ...]; labels and the arrays of `given` [V, ...] or None. The states are
    made a batch at a time on host arrays (the last batch padded), so that any number of videos
    reuses one compilation.
    """
    num_videos = key_data.shape[0]
    for name, x in [('labels', labels)] + list(given.items()):
      if x is not None and x.shape[0] != num_videos:
        raise ValueError(f'{name} holds {x.shape[0]} videos, the keys {num_videos}')
    pools = [[] for _ in self.stages]
    for first in range(0, num_videos, self.batch_size):
      rows = np.minimum(np.arange(first, first + self.batch_size), num_videos - 1)
      take = lambda x, rows=rows: None if x is None else x[rows]
      state = self.fetch(self._start(key_data[rows], take(labels),
                                     **{k: take(v) for k, v in given.items()}))
      for index, video in enumerate(_unstack(state, min(self.batch_size, num_videos - first)),
                                    start=first):
        stage = self._stage_of(int(video.alive.sum()))
        pools[stage].append(_Video(index, _resize(video, self.stages[stage])))
    return pools

  def _outputs(self, states: list[sampler_lib.SamplerState]) -> sampler_lib.SampleOutput:
    """`sampler.sample_output` of final states [N_max] a batch at a time, as NumPy arrays."""
    parts = []
    for first in range(0, len(states), self.batch_size):
      batch = states[first:first + self.batch_size]
      batch += batch[-1:] * (self.batch_size - len(batch))
      parts.append(self.fetch(self._output(_stack(batch))))
    return jax.tree.map(
        lambda *xs: np.concatenate(xs)[:len(states)] if np.ndim(xs[0]) else max(xs), *parts)

  def _stop_below(self, stage: int, videos: int, refills: int) -> int:
    """The count of running videos below which a loop of `stage` with `videos` real videos
    returns: the refill threshold when the pool can refill it; else the count below which the
    rest move up; in the last stage, 1 (the end)."""
    if refills:
      threshold = self._refill_threshold
    elif stage < len(self.stages) - 1:
      threshold = self._move_up[stage]
    else:
      threshold = 1
    return min(threshold, videos)

  def _next_stage(self, pools: list[list[_Video]]) -> int:
    """The lowest stage with videos, after moving up those too few to pay for its batch."""
    stage = next(s for s, pool in enumerate(pools) if pool)
    while stage < len(self.stages) - 1 and len(pools[stage]) < self._move_up[stage]:
      pools[stage + 1] += [_Video(v.index, _resize(v.state, self.stages[stage + 1]))
                           for v in pools[stage]]
      pools[stage] = []
      stage += 1
    return stage

  def _sort_out(self, stage: int, videos: list[_Video], results, pools: list[list[_Video]],
                finished: dict[int, sampler_lib.SamplerState]) -> StageCall:
    """Sends the videos of a loop's `results` on: finished ones (at N_max) to `finished`,
    promoted ones to the first stage that holds them, the others back to `stage`'s pool."""
    state, needed, still, loops = results
    states = _unstack(state, len(videos))
    for video, new, need, runs in zip(videos, states, needed, still):
      if need:
        target = self._stage_of(int(need))
        pools[target].append(_Video(video.index, _resize(new, self.stages[target])))
      elif runs:
        pools[stage].append(_Video(video.index, new))
      else:
        finished[video.index] = _resize(new, self.capacity)
    return StageCall(capacity=self.stages[stage], videos=len(videos), loops=int(loops),
                     video_steps=int(sum(s.iteration - v.state.iteration
                                         for s, v in zip(states, videos))))

  def run(self, params, keys: jax.Array, labels=None, init_frames=None, init_alive=None,
          context_mask=None, passive_mask=None) -> tuple[sampler_lib.SampleOutput, list[StageCall]]:
    """The videos of `keys` [V] (see the class docstring) and the loops that made them."""
    if keys.ndim != 1:
      raise ValueError(f'the staged sampler takes one key per video, [V]; got shape {keys.shape}')
    if jax.random.key_impl(keys) != jax.random.key_impl(jax.random.key(0)):
      raise ValueError(f'the staged sampler takes keys of the default PRNG implementation '
                       f'({jax.random.key_impl(jax.random.key(0))}), got '
                       f'{jax.random.key_impl(keys)}; make them with jax.random.key')
    labels = None if labels is None else np.asarray(labels, np.int32)
    self.compile(params, labels is not None)
    given = {name: None if x is None else np.asarray(x) for name, x in zip(
        _TASK_ARGUMENTS, (init_frames, init_alive, context_mask, passive_mask))}
    pools = self._start_pools(np.asarray(jax.random.key_data(keys)), labels, given)
    finished, calls, logged = {}, [], 0
    while any(pools):
      stage = self._next_stage(pools)
      # The least advanced first: the videos left for a stage's last batches are then those
      # closest to leaving it, which keeps that batch's idle tail short.
      pool = sorted(pools[stage], key=lambda v: int(v.state.iteration))
      videos, pools[stage] = pool[:self.batch_size], pool[self.batch_size:]
      results = self._run_batch(params, stage, videos, labels,
                                self._stop_below(stage, len(videos), len(pools[stage])))
      calls.append(self._sort_out(stage, videos, results, pools, finished))
      if len(finished) >= logged + self.batch_size:  # A progress line per batch's worth.
        logged = len(finished)
        logging.info('staged sampling: %d/%d videos done after %d loops', logged, keys.shape[0],
                     sum(c.loops for c in calls))
    return self._outputs([finished[i] for i in range(len(finished))]), calls

  def __call__(self, params, keys: jax.Array, labels=None, init_frames=None, init_alive=None,
               context_mask=None, passive_mask=None) -> sampler_lib.SampleOutput:
    return self.run(params, keys, labels, init_frames, init_alive, context_mask, passive_mask)[0]
