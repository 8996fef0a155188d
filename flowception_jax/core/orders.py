"""Prescribed insertion orders, the paper's ablation of where new frames go.

With the `learned` order the sampler inserts after frame i at the model's rate `lambda_i`. A
prescribed order keeps when and how many frames arrive and only moves where they go: at every step
the video's expected number of missing frames, `M = sum_i lambda_i` over the frames that may insert,
goes whole to one gap chosen by the order, and the insertion law and the scheduler's hazard apply to
it as to a learned rate. All prescribed orders thus draw the same number of frames per step (the law
of one gap of rate `M`), whose mean is the learned one under the `thinning` and `poisson` laws
(`bernoulli`, at most one frame per gap and step, gives one fed gap fewer than many):
  left_to_right: the gap after the last frame that may insert (the video grows at its end).
  random:        a gap drawn uniformly among the frames that may insert, anew at every step.
  hierarchical:  the middle of the largest remaining gap first.

Hierarchical needs room to measure gaps in. Every frame carries a planned final index (`planned`,
tracked in the sampler state): the initial frames are planned at 0, 1, ...; the room of the gap
between two frames is the number of indices their plans leave free, and the room after the last
frame is what `M` expects beyond the plan (`M` minus the room inside, at least 0). A frame inserted
into a gap is planned at its middle, the lower of two (several frames in one step share it evenly).
Ties go to the leftmost gap. The model never sees plans: it still gets the slots of the compacted
sequence.

Arrays are [B, N] over the sampler's left-aligned slots.
"""

import jax
import jax.numpy as jnp

ORDERS = ('learned', 'left_to_right', 'random', 'hierarchical')


def check_order(order: str) -> None:
  if order not in ORDERS:
    raise ValueError(f'unknown insertion order {order!r}; known: {", ".join(ORDERS)}; set '
                     '--config.sampler.order (or --order when sampling)')


def _shift_left(x: jax.Array) -> jax.Array:
  """x [B, N] moved one slot left, the last slot zero (False): the next slot's value."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def gap_room(planned: jax.Array, alive: jax.Array, expected_missing: jax.Array) -> jax.Array:
  """Room float32 [B, N] of the gap after each alive frame, 0 on dead slots.

  planned: int [B, N] planned final indices of the alive (left-aligned) frames; alive: bool [B, N];
  expected_missing: [B] the video's expected number of missing frames, whose part beyond the room
  inside the plan is the room after the last frame.
  """
  next_alive = _shift_left(alive)
  inside = jnp.where(alive & next_alive, jnp.maximum(_shift_left(planned) - planned - 1, 0), 0)
  tail = jnp.maximum(expected_missing - jnp.sum(inside, axis=1), 0.0)
  return jnp.where(alive & ~next_alive, tail[:, None], inside.astype(jnp.float32))


def order_rates(order: str, rate: jax.Array, may_insert: jax.Array, planned: jax.Array,
                alive: jax.Array, slot_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The order's insertion rates and the room after each video's last frame.

  rate: float [B, N] learned rates (expected missing frames per gap); may_insert: bool [B, N];
  planned, alive: as in `gap_room`; slot_keys: PRNG keys [B, N], the random order's draw at each
  slot (a Gumbel variate: the gap with the largest is uniform among those that may insert, and a
  video's choice depends on its own slots only). Returns (rates float32
  [B, N], zero outside `may_insert`, with the learned sum per video; tail_room float32 [B], for
  `plan_new_frames`).
  """
  check_order(order)
  rate = jnp.where(may_insert, rate, 0.0)
  total = jnp.sum(rate, axis=1)
  room = gap_room(planned, alive, total)
  tail_room = jnp.sum(jnp.where(alive & ~_shift_left(alive), room, 0.0), axis=1)
  if order == 'learned':
    return rate, tail_room
  n = rate.shape[1]
  if order == 'left_to_right':
    target = n - 1 - jnp.argmax(may_insert[:, ::-1], axis=1)
  elif order == 'random':
    gumbel = jax.vmap(jax.vmap(jax.random.gumbel))(slot_keys)
    target = jnp.argmax(jnp.where(may_insert, gumbel, -jnp.inf), axis=1)
  else:
    target = jnp.argmax(jnp.where(may_insert, room, -1.0), axis=1)
  chosen = (jnp.arange(n)[None, :] == target[:, None]) & may_insert
  return jnp.where(chosen, total[:, None], 0.0), tail_room


def plan_new_frames(planned: jax.Array, alive: jax.Array, tail_room: jax.Array) -> jax.Array:
  """Plans the frames just inserted: spread evenly over the room of the gap they landed in.

  planned: int [B, N] after insertion, old frames keep their plan and new ones hold -1; alive: bool
  [B, N] left-aligned; tail_room: float [B] the room after the last old frame before insertion.
  Returns int32 [B, N], -1 on dead slots.
  """
  n = planned.shape[1]
  slots = jnp.arange(n)[None, :]
  new = alive & (planned < 0)
  old = alive & ~new
  left = jax.lax.cummax(jnp.where(old, slots, -1), axis=1)
  right = jax.lax.cummin(jnp.where(old, slots, n), axis=1, reverse=True)
  in_tail = right >= n
  right = jnp.where(in_tail, jnp.sum(alive, axis=1, keepdims=True), right)
  count = right - left - 1  # New frames between the two old neighbours.
  p_left = jnp.take_along_axis(planned, jnp.maximum(left, 0), axis=1)
  p_right = jnp.where(
      in_tail,
      p_left + 1 + jnp.maximum(jnp.round(tail_room).astype(jnp.int32)[:, None], count),
      jnp.take_along_axis(planned, jnp.minimum(right, n - 1), axis=1))
  placed = p_left + ((slots - left) * (p_right - p_left)) // (count + 1)
  return jnp.where(new, placed, jnp.where(alive, planned, -1)).astype(jnp.int32)
