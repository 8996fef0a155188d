"""Prescribed insertion orders: the same expected count as the learned rates, and the positions each
order gives to new frames, in the pure functions and through the real sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax.core import orders
from flowception_jax.core import sampler as sampler_lib


# Jitted once each: cheaper to compile than their operations one by one.
_order_rates = jax.jit(orders.order_rates, static_argnums=0)
_gap_room = jax.jit(orders.gap_room)
_plan_new_frames = jax.jit(orders.plan_new_frames)


def _rates(order, rate, may_insert, alive):
  alive = np.asarray(alive)
  planned = np.where(alive, np.arange(alive.shape[1]), -1)
  return _order_rates(order, np.asarray(rate, np.float32), np.asarray(may_insert), planned, alive,
                      jax.random.split(jax.random.key(0), alive.shape))


@pytest.mark.parametrize('order', orders.ORDERS)
def test_every_order_keeps_the_learned_expected_count(order):
  rng = np.random.default_rng(0)
  alive = np.arange(8)[None, :] < rng.integers(1, 9, size=(64, 1))
  may_insert = alive & (rng.uniform(size=(64, 8)) < 0.8)
  rate = rng.exponential(2.0, size=(64, 8))
  rates, _ = _rates(order, rate, may_insert, alive)
  rates = np.asarray(rates)
  np.testing.assert_allclose(rates.sum(1), np.where(may_insert, rate, 0).sum(1), rtol=1e-5)
  assert np.all(rates[~may_insert] == 0)
  if order != 'learned':  # The whole count goes to one gap.
    assert np.all((rates > 0).sum(1) == may_insert.any(1))


def test_left_to_right_feeds_the_last_frame_that_may_insert():
  may_insert = np.array([[True, True, False, False], [True, True, True, False],
                         [True, False, True, True]])
  rates, _ = _rates('left_to_right', np.ones((3, 4)), may_insert, np.ones((3, 4), bool))
  np.testing.assert_array_equal(np.asarray(rates) > 0,
                                [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_random_picks_each_gap_that_may_insert_equally_often():
  may_insert = np.array([[True, False, True, True, False]])  # Slot 1 is passive, slot 4 dead.
  alive = np.array([[True, True, True, True, False]])
  choose = jax.jit(jax.vmap(lambda k: orders.order_rates(
      'random', jnp.ones((1, 5)), jnp.asarray(may_insert), jnp.zeros((1, 5), jnp.int32),
      jnp.asarray(alive), k)[0][0]))
  shares = np.mean(np.asarray(choose(jax.random.split(jax.random.key(0), (3000, 1, 5)))) > 0,
                   axis=0)
  np.testing.assert_allclose(shares, [1 / 3, 0, 1 / 3, 1 / 3, 0], atol=0.04)


def test_gap_room_counts_free_planned_indices_and_the_expected_rest():
  planned = np.array([[0, 4, 6, -1, -1]])
  alive = np.array([[True, True, True, False, False]])
  # Indices 1-3 and 5 are free inside the plan (room 3 and 1); 7 are missing in all, so 3 remain
  # after the last frame.
  np.testing.assert_array_equal(_gap_room(planned, alive, np.array([7.0])), [[3, 1, 3, 0, 0]])
  # Fewer missing than the plan leaves free: nothing after the last frame.
  np.testing.assert_array_equal(_gap_room(planned, alive, np.array([2.0])), [[3, 1, 0, 0, 0]])


def test_new_frames_are_planned_in_the_middle_of_their_gap():
  # After insertion: one new frame between the frames planned at 0 and 4, two after the last
  # frame (planned at 6) whose gap had room 5.
  planned = np.array([[0, -1, 4, 6, -1, -1, 0]])
  alive = np.array([[True, True, True, True, True, True, False]])
  np.testing.assert_array_equal(_plan_new_frames(planned, alive, np.array([5.0])),
                                [[0, 2, 4, 6, 8, 10, -1]])


def _hierarchical_sequence(length):
  """Planned indices of the frames inserted one at a time, from one frame, by the hierarchical
  order when the model knows exactly how many frames are missing."""
  planned = np.full((1, length), -1)
  planned[0, 0] = 0
  inserted = []
  for count in range(1, length):
    alive = np.arange(length)[None, :] < count
    rate = alive * (length - count) / count  # Any split of the missing count.
    rates, tail_room = _order_rates('hierarchical', rate.astype(np.float32), alive, planned, alive,
                                    jax.random.key(0))
    gap = int(np.argmax(rates[0]))
    # Insert one frame after slot `gap`, as the sampler does.
    planned = np.insert(planned, gap + 1, -1, axis=1)[:, :length]
    planned = np.asarray(_plan_new_frames(planned, alive | (np.arange(length) == count), tail_room))
    inserted.append(int(planned[0, gap + 1]))
  return inserted, planned[0]


def test_hierarchical_inserts_the_middle_of_the_largest_gap_first():
  inserted, planned = _hierarchical_sequence(9)
  # From frame 0 with 8 frames missing: the middle of 1..8 (4, the lower of two middles); then the
  # 4 frames after it (5..8: 6) before the 3 inside (1..3: 2); then 7..8 (room 2: 7); then the
  # single rooms from the left.
  assert inserted == [4, 6, 2, 7, 1, 3, 5, 8]
  np.testing.assert_array_equal(planned, np.arange(9))


def _oracle(length):
  """A fake model whose rates ask for exactly the `length - n` missing frames of a video with `n`
  frames, all after its first frame (where the learned order would put every new frame), and
  whose velocity carries frames to 0.5."""

  def apply_fn(params, frames, context, times, positions, mask, labels):
    del params, context, positions, labels
    t = times[..., None, None, None]
    velocity = jnp.where(t < 1, (0.5 - frames) / jnp.maximum(1 - t, 1e-6), 0.0)
    missing = length - jnp.sum(mask, axis=1, keepdims=True)
    first = jnp.arange(mask.shape[1])[None, :] == 0
    log_rate = jnp.where(first & (missing > 0), jnp.log(jnp.maximum(missing, 1e-9)), -30.0)
    return velocity, log_rate.astype(jnp.float32)

  return apply_fn


def _replay_hierarchical(num_inserted, length):
  """Final slot of the k-th inserted frame, by plain lists: the middle (lower middle) of the gap
  with the most room, leftmost on ties; the room after the last frame is the missing count not
  planned inside."""
  planned, order = [0], [0]  # Planned index and insertion rank of each frame, in slot order.
  for rank in range(1, num_inserted + 1):
    inside = [b - a - 1 for a, b in zip(planned, planned[1:])]
    room = inside + [max(length - len(planned) - sum(inside), 0)]
    gap = room.index(max(room))
    span = (planned[gap + 1] if gap + 1 < len(planned) else planned[gap] + 1 + max(room[gap], 1))
    new = planned[gap] + (span - planned[gap]) // 2
    planned.insert(gap + 1, new)
    order.insert(gap + 1, rank)
  return order


@pytest.mark.parametrize('order', ['random', 'hierarchical'])
def test_insertion_positions_of_each_order_in_the_sampler(order):
  length, b, capacity = 7, 256, 8
  config = sampler_lib.SamplerConfig(num_steps=16, num_start_frames=1, insertion='bernoulli',
                                     order=order)
  sample = sampler_lib.make_sampler(_oracle(length), config=config,
                                    batch_size=b, capacity=capacity, frame_shape=(1, 1, 1))
  out = sample(None, jax.random.key(0))
  lengths, steps = np.asarray(out.lengths), np.asarray(out.insert_step)
  assert lengths.max() <= length and lengths.mean() > 4  # The learned expected count.
  # Under bernoulli a gap gets at most one frame per step and prescribed orders feed one gap, so
  # the insertion steps of a video are distinct and rank its new frames.
  second_first = []
  for video, n in zip(steps, lengths):
    video = video[:n]
    assert len(set(video[1:])) == n - 1
    rank = np.argsort(np.argsort(video))  # 0 for the start frame, then insertion order.
    if order == 'hierarchical':
      np.testing.assert_array_equal(rank, _replay_hierarchical(n - 1, length))
    elif n >= 3:  # Random: the second new frame goes before or after the first, even odds.
      second_first.append(list(rank).index(2) < list(rank).index(1))
  if order == 'random':
    assert len(second_first) > 150
    np.testing.assert_allclose(np.mean(second_first), 0.5, atol=0.12)
