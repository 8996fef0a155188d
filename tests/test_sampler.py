"""The generative sampler with fake models: capacity, clean endings, context, insertion statistics,
compilation count and guidance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax.core import flowception
from flowception_jax.core import sampler as sampler_lib

FRAME = (1, 1, 1)


def _fake_model(log_rate=-30.0, target=0.5, calls=None):
  """A model whose velocity carries each frame straight to `target` along the (shifted) time.

  With `v = (c - x) / (1 - t')` the Euler scheme lands exactly on `c` at `t' = 1` whatever the
  steps, so the final frames reveal whether the sampler used the times and shift consistently.
  `log_rate` is a constant or `fn(frame_times, frame_mask, labels) -> [B, N]`; `target` likewise
  a constant or `fn(labels) -> [B]`. `calls` collects the batch size of every trace.
  """

  def apply_fn(params, frames, context, frame_times, positions, frame_mask, labels):
    del params, context, positions
    if calls is not None:
      calls.append(frames.shape[0])
    c = target(labels)[:, None, None, None, None] if callable(target) else target
    t = frame_times[..., None, None, None]
    velocity = jnp.where(t < 1, (c - frames) / jnp.maximum(1 - t, 1e-6), 0.0)
    if callable(log_rate):
      rates = log_rate(frame_times, frame_mask, labels)
    else:
      rates = jnp.full(frame_times.shape, log_rate)
    return velocity, rates

  return apply_fn


def _sampler(apply_fn, batch_size=4, capacity=6, num_classes=0, **config):
  config = sampler_lib.SamplerConfig(**{'num_steps': 4, 'num_start_frames': 2, **config})
  return sampler_lib.make_sampler(apply_fn, config=config, batch_size=batch_size,
                                  capacity=capacity, frame_shape=FRAME, num_classes=num_classes)


def _check_complete(out, capacity):
  """Lengths within capacity, alive frames left-aligned and clean, dead slots zero."""
  lengths = np.asarray(out.lengths)
  alive = np.arange(capacity)[None, :] < lengths[:, None]
  assert np.all((lengths >= 1) & (lengths <= capacity))
  np.testing.assert_array_equal(np.asarray(out.times), np.where(alive, 1.0, 0.0))
  np.testing.assert_array_equal(np.asarray(out.insert_step) >= 0, alive)
  assert np.all(np.asarray(out.frames)[~alive] == 0.0)
  return alive


def test_config_validation():
  with pytest.raises(ValueError, match='config.sampler.insertion'):
    sampler_lib.SamplerConfig(num_steps=4, num_start_frames=1, insertion='binomial')
  with pytest.raises(ValueError, match='num_steps'):
    sampler_lib.SamplerConfig(num_steps=0, num_start_frames=1)


@pytest.mark.parametrize('aligned', [True, False])
def test_insert_frames_matches_list_insertion(aligned):
  rng = np.random.default_rng(0)
  b, n = 64, 6
  if aligned:
    alive = np.arange(n)[None, :] < rng.integers(0, n + 1, size=(b, 1))
  else:
    alive = rng.uniform(size=(b, n)) < 0.5
  counts = rng.integers(0, 4, size=(b, n))
  old = np.broadcast_to(np.arange(1, n + 1), (b, n))  # Positive ids: old frame j is j + 1.
  fill = -np.broadcast_to(np.arange(1, n + 1), (b, n))  # Negative ids: new frame at slot s.
  (new_slots,), new_alive = sampler_lib.insert_frames(
      (jnp.asarray(old),), jnp.asarray(alive), jnp.asarray(counts), (jnp.asarray(fill),))
  for row in range(b):
    expected = []
    for j in range(n):
      if alive[row, j]:
        expected.append(old[row, j])
        expected.extend([None] * counts[row, j])
    expected = expected[:n]
    expected = [-(s + 1) if e is None else e for s, e in enumerate(expected)]
    expected += [0] * (n - len(expected))
    np.testing.assert_array_equal(np.asarray(new_slots[row]), expected)
    np.testing.assert_array_equal(np.asarray(new_alive[row]), np.arange(n) < np.sum(
        np.asarray(expected) != 0))


def test_zero_rate_keeps_start_frames():
  out = _sampler(_fake_model(log_rate=-30.0), num_start_frames=3)(None, jax.random.key(0))
  np.testing.assert_array_equal(out.lengths, 3)
  alive = _check_complete(out, 6)
  np.testing.assert_array_equal(np.asarray(out.insert_step)[alive], 0)
  assert int(out.num_iterations) == 4
  np.testing.assert_allclose(np.asarray(out.frames)[alive], 0.5, atol=1e-5)


@pytest.mark.parametrize('insertion', sampler_lib.INSERTION_MODES)
def test_overflow_is_dropped(insertion):
  capacity = 6
  out = _sampler(_fake_model(log_rate=50.0), capacity=capacity,
                 insertion=insertion)(None, jax.random.key(1))
  assert out.frames.shape == (4, capacity) + FRAME
  np.testing.assert_array_equal(out.lengths, capacity)
  _check_complete(out, capacity)
  np.testing.assert_array_equal(np.sum(np.asarray(out.insert_step) == 0, axis=1), 2)  # All kept.
  assert int(out.num_iterations) <= 2 * 4 + 2


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_every_frame_ends_clean_on_target(shift):
  out = _sampler(_fake_model(log_rate=0.0), batch_size=8, capacity=8, num_steps=5,
                 snr_shift=shift)(None, jax.random.key(2))
  alive = _check_complete(out, 8)
  assert np.any(np.asarray(out.lengths) > 2)  # Insertions happened, late ones included.
  np.testing.assert_allclose(np.asarray(out.frames)[alive], 0.5, atol=1e-4)
  late = int(np.asarray(out.insert_step).max())
  assert int(out.num_iterations) == max(5, late + 5)


def test_context_frames_are_exact_and_passive_frames_never_insert():
  b, n = 4, 8
  given = jax.random.normal(jax.random.key(3), (b, n) + FRAME) * 7.0
  context = np.zeros((b, n), bool)
  context[:, [1, 4]] = True  # Not left-aligned: compacted in order.
  init_alive = context.copy()
  init_alive[:, 6] = True  # A noise start frame after the key frames.
  passive = np.zeros((b, n), bool)
  passive[:, 4] = True
  out = _sampler(_fake_model(log_rate=1.0, target=-2.0), batch_size=b, capacity=n, num_steps=4)(
      None, jax.random.key(4), init_frames=given, init_alive=jnp.asarray(init_alive),
      context_mask=jnp.asarray(context), passive_mask=jnp.asarray(passive))
  alive = _check_complete(out, n)
  frames = np.asarray(out.frames)
  initial = np.asarray(out.insert_step) == 0
  for row in range(b):
    kept = frames[row][initial[row]]
    assert len(kept) == 3
    np.testing.assert_array_equal(kept[:2], np.asarray(given)[row, [1, 4]])  # Bit-exact.
    np.testing.assert_allclose(kept[2], -2.0, atol=1e-5)
    # Nothing is inserted right after the passive key frame: the start frame follows it.
    slot = np.flatnonzero(initial[row])
    assert slot[2] == slot[1] + 1
    np.testing.assert_array_equal(np.asarray(out.context_slots)[row], list(slot[:2]) + [-1] * 6)
    generated = alive[row] & ~np.isin(np.arange(n), slot[:2])
    np.testing.assert_allclose(frames[row][generated], -2.0, atol=1e-5)


def _remaining_rate(expected_total):
  """Log-rate `log(M (1 - t_g))` on start frames, zero rate elsewhere.

  Start frames are the only ones with the largest time (`t_g`) in their video, so their gaps get the
  trained model's expected number of missing frames, whose insertions over a run total Poisson(M).
  """

  def log_rate(times, mask, labels):
    del labels
    t_max = jnp.max(jnp.where(mask, times, -1.0), axis=1, keepdims=True)
    start = mask & (times >= t_max)
    return jnp.where(start, jnp.log(jnp.maximum(expected_total * (1 - times), 1e-12)), -30.0)

  return log_rate


@pytest.mark.parametrize('insertion,num_steps', [('poisson', 5), ('bernoulli', 20)])
def test_insertions_per_gap_match_the_rate(insertion, num_steps):
  b, m = 2000, 2.0
  out = _sampler(_fake_model(log_rate=_remaining_rate(m)), batch_size=b, capacity=16,
                 num_steps=num_steps, num_start_frames=1, insertion=insertion)(
                     None, jax.random.key(5))
  inserted = np.asarray(out.lengths) - 1.0
  tolerance = 4 * np.sqrt(m / b)
  if insertion == 'poisson':  # Exactly Poisson(M): sum of Poisson(M h) over the steps.
    np.testing.assert_allclose(inserted.mean(), m, atol=tolerance)
    np.testing.assert_allclose(inserted.var(), m, atol=0.3)
  else:  # Binomial(n, 1 - exp(-M h)), within M^2 h / 2 of M.
    h = 1.0 / num_steps
    np.testing.assert_allclose(inserted.mean(), num_steps * -np.expm1(-m * h), atol=tolerance)
    np.testing.assert_allclose(inserted.mean(), m, atol=m * m * h / 2 + tolerance)


def _rate_on_last_frame(mask, missing):
  """Log-rates [B, N] asking for `missing` [B, 1] frames after the last alive one, none elsewhere."""
  last = mask & (jnp.cumsum(mask, axis=1) == jnp.sum(mask, axis=1, keepdims=True))
  return jnp.where(last & (missing > 0), jnp.log(jnp.maximum(missing, 1e-12)), -30.0)


def _exact_count_rate(length):
  """Log-rate of an oracle that knows the video has `length` frames, all missing ones at the end.

  The last alive frame's rate is the exact number of missing frames, the others' zero: the
  ideal trained model of a fixed-length video grown from one start frame.
  """

  def log_rate(times, mask, labels):
    del times, labels
    missing = (length - jnp.sum(mask, axis=1, keepdims=True)).astype(jnp.float32)
    return _rate_on_last_frame(mask, missing)

  return log_rate


@pytest.mark.parametrize('kappa', ['linear', 'cubic'])
def test_thinning_reaches_the_exact_length_of_an_oracle(kappa):
  b, length, num_steps = 400, 8, 20
  shares = {}
  for insertion in ('thinning', 'bernoulli'):
    out = _sampler(_fake_model(log_rate=_exact_count_rate(length)), batch_size=b, capacity=12,
                   num_steps=num_steps, num_start_frames=1, insertion=insertion, kappa=kappa)(
                       None, jax.random.key(9))
    _check_complete(out, 12)
    lengths = np.asarray(out.lengths)
    assert lengths.max() <= length  # The oracle never asks for more.
    shares[insertion] = float(np.mean(lengths == length))
  # Thinning inserts a last missing frame for sure on the final step (mass 1); Bernoulli gives it
  # 1 - exp(-1), so each missing frame survives the whole run with probability ~exp(-H_steps).
  assert shares['thinning'] >= 0.97, shares
  assert shares['bernoulli'] <= shares['thinning'] - 0.05, shares


def _posterior_rate(lengths, use_count=True):
  """Log-rate of the Bayes-optimal model of videos whose length is uniform over `lengths`.

  Grown from one start frame with linear kappa, a video of length L shows `n - 1 ~ Binomial(L - 1,
  t_g)` inserted frames at global time `t_g`, so the posterior mean of the missing count is
  `E[L - n | n, t_g]`; it goes to the last frame (`t_g` is the start frame's time). With
  `use_count=False` the rate ignores `n` and asks for `E[L] - n`: right on average, wrong in law.
  """
  support = jnp.asarray(lengths, jnp.float32)

  def log_rate(times, mask, labels):
    del labels
    n = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)  # [B, 1]
    t = jnp.clip(times[:, :1], 1e-6, 1 - 1e-6)
    if use_count:
      # Lengths below the visible count have probability 0 (log-pmf -inf).
      weights = jax.nn.softmax(jax.scipy.stats.binom.logpmf(n - 1, support - 1, t), axis=1)
      missing = jnp.sum(weights * jnp.maximum(support - n, 0.0), axis=1, keepdims=True)
    else:
      missing = jnp.maximum(jnp.mean(support) - n, 0.0)
    return _rate_on_last_frame(mask, missing)

  return log_rate


def test_posterior_mean_rates_reproduce_the_length_distribution():
  """The method's claim: rates equal to the posterior mean of the missing count generate the data's
  lengths; a rate right only on average does not."""
  lengths = (3, 9)
  right, wrong = _posterior_rate(lengths, True), _posterior_rate(lengths, False)

  def log_rate(times, mask, labels):  # Label 0: the posterior mean; 1: right only on average.
    return jnp.where(labels[:, None] == 0, right(times, mask, labels), wrong(times, mask, labels))

  # 1000 videos put a share within 0.05 (3 standard errors) of its law; the wrong rate misses far.
  counts = {0: 1000, 1: 250}
  labels = np.repeat(list(counts), list(counts.values())).astype(np.int32)
  out = _sampler(_fake_model(log_rate=log_rate), batch_size=len(labels), capacity=12,
                 num_classes=len(counts), num_steps=100, num_start_frames=1, insertion='poisson')(
                     None, jax.random.key(11), labels=jnp.asarray(labels))
  _check_complete(out, 12)
  generated = np.asarray(out.lengths)
  shares = [[float(np.mean(generated[labels == label] == length)) for length in lengths]
            for label in counts]
  # Within the Euler error of 100 steps (a few % of videos end off the support) and the noise.
  np.testing.assert_allclose(shares[0], 0.5, atol=0.1)
  assert sum(shares[0]) >= 0.85, shares
  assert sum(shares[1]) < 0.5, shares


def test_compiles_once_for_new_keys():
  calls = []
  chex.clear_trace_counter()
  sample = _sampler(chex.assert_max_traces(_fake_model(log_rate=0.0, calls=calls), n=1))
  lengths = [np.asarray(sample(None, jax.random.key(seed)).lengths) for seed in range(3)]
  assert len(calls) == 1
  assert any(not np.array_equal(lengths[0], x) for x in lengths[1:])


def _label_target(num_classes):
  return lambda labels: labels.astype(jnp.float32) / num_classes


def _label_rate(conditional, unconditional, num_classes):
  def log_rate(times, mask, labels):
    del mask
    rate = jnp.where(labels == num_classes, unconditional, conditional)
    return jnp.broadcast_to(rate[:, None], times.shape)

  return log_rate


def test_no_guidance_evaluates_once():
  calls, k = [], 5
  model = _fake_model(log_rate=_label_rate(-30.0, 30.0, k), target=_label_target(k), calls=calls)
  labels = jnp.array([0, 1, 2, 3])
  out = _sampler(model, num_classes=k)(None, jax.random.key(6), labels=labels)
  assert calls == [4]
  np.testing.assert_array_equal(out.lengths, 2)  # The conditional rate only.
  alive = _check_complete(out, 6)
  np.testing.assert_allclose(np.asarray(out.frames)[:, :2, 0, 0, 0],
                             np.repeat(np.asarray(labels)[:, None] / k, 2, axis=1), atol=1e-5)
  assert np.all(np.asarray(out.frames)[~alive] == 0)


def test_guidance_combines_conditional_and_unconditional():
  calls, k, w = [], 5, 2.5
  model = _fake_model(log_rate=_label_rate(-30.0, 30.0, k), target=_label_target(k), calls=calls)
  labels = jnp.array([0, 1, 2, 3])
  out = _sampler(model, num_classes=k, guidance_scale=w)(None, jax.random.key(7), labels=labels)
  assert calls == [8]  # One batched evaluation of both branches.
  np.testing.assert_array_equal(out.lengths, 2)
  guided = 1.0 + w * (np.asarray(labels) / k - 1.0)  # v_u + w (v_c - v_u) moves x to this target.
  np.testing.assert_allclose(np.asarray(out.frames)[:, :2, 0, 0, 0],
                             np.repeat(guided[:, None], 2, axis=1), atol=1e-4)
  # Rate guidance weight 0 is the unconditional rate alone: the buffer fills up.
  out = _sampler(model, num_classes=k, rate_guidance=0.0)(None, jax.random.key(7), labels=labels)
  np.testing.assert_array_equal(out.lengths, 6)
  # Weight 0.5 averages log-rates to log lambda = 0: lengths fall between the two extremes.
  out = _sampler(model, batch_size=256, num_classes=k, rate_guidance=0.5, num_start_frames=1,
                 insertion='poisson', capacity=12)(None, jax.random.key(8),
                                                   labels=jnp.zeros(256, jnp.int32))
  assert 1.0 < float(np.mean(out.lengths)) < 6.0


@pytest.mark.parametrize('solver, order', [('euler', 1), ('heun', 2)])
@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_solver_error_falls_with_its_order(solver, order, shift):
  """On the linear field `v = (1 + 2 t') x` the flow from `x0` at `t' = 0` reaches `x0 e^2`."""
  config = sampler_lib.SamplerConfig(num_steps=1, num_start_frames=1, snr_shift=shift,
                                     solver=solver)
  evaluate = lambda s: (1 + 2 * flowception.snr_shift(s.times, shift))[..., None, None,
                                                                        None] * s.frames
  start = jax.random.normal(jax.random.key(0), (2, 3) + FRAME)
  moving = jnp.array([[True, True, False]] * 2)  # The last slot is done and must not move.
  errors = []

  @jax.jit
  def flow(state, num_steps):
    """`num_steps` flow steps of the moving frames, from t = 0 to 1."""
    def step(k, state):
      times = jnp.where(moving, (k + 1) / num_steps, 1.0)
      frames = sampler_lib._integrate(state, times, moving, evaluate(state), evaluate, config)
      return state.replace(frames=frames, times=times)

    return jax.lax.fori_loop(0, num_steps, step, state)

  # Heun's last step is Euler: one local error of the second order, so the order shows once
  # steps are small against the shift's stretch of time near t = 1.
  for num_steps in (64, 128, 256):
    state = sampler_lib.SamplerState(
        frames=start, times=jnp.where(moving, 0.0, 1.0), alive=jnp.ones((2, 3), bool),
        context=jnp.zeros((2, 3), bool), passive=jnp.zeros((2, 3), bool),
        insert_step=jnp.zeros((2, 3), jnp.int32), planned=jnp.full((2, 3), -1, jnp.int32),
        t_global=jnp.zeros(2), iteration=jnp.zeros(2, jnp.int32),
        key=jax.random.split(jax.random.key(0), 2))
    state = flow(state, num_steps)
    np.testing.assert_array_equal(state.frames[:, 2], start[:, 2])
    exact = np.asarray(start[:, :2]) * np.e**2
    errors.append(np.abs(np.asarray(state.frames[:, :2]) - exact).max())
  np.testing.assert_allclose(np.log2(np.array(errors[:-1]) / np.array(errors[1:])), order, atol=0.2)


def test_heun_keeps_the_insertion_draws_and_compiles_once():
  calls = []
  chex.clear_trace_counter()
  euler = _sampler(_fake_model(log_rate=0.0), batch_size=8, capacity=8, num_steps=6)
  heun = _sampler(chex.assert_max_traces(_fake_model(log_rate=0.0, calls=calls), n=2),
                  batch_size=8, capacity=8, num_steps=6, solver='heun')
  for seed in range(2):
    a, b = euler(None, jax.random.key(seed)), heun(None, jax.random.key(seed))
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.insert_step, b.insert_step)
    _check_complete(b, 8)
  assert len(calls) == 2  # Traced once, two evaluations per step.
  with pytest.raises(ValueError, match='--config.sampler.solver'):
    sampler_lib.SamplerConfig(num_steps=4, num_start_frames=1, solver='rk4')


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_heun_never_uses_a_velocity_at_time_one(shift):
  """Training never supervises the velocity at t = 1: a model that answers NaN there must not
  reach any frame (Heun's last step of each frame is Euler)."""
  model = _fake_model(log_rate=0.5)

  def poisoned(params, frames, context, frame_times, *rest):
    velocity, rates = model(params, frames, context, frame_times, *rest)
    return jnp.where(frame_times[..., None, None, None] >= 1.0, jnp.nan, velocity), rates

  out = _sampler(poisoned, batch_size=16, capacity=8, num_steps=5, solver='heun',
                 snr_shift=shift)(None, jax.random.key(0))
  alive = _check_complete(out, 8)
  np.testing.assert_allclose(np.asarray(out.frames)[alive], 0.5, atol=1e-5)
