"""Tests of the Flowception process maths against brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax.core import flowception

KAPPA_NAMES = ('linear', 'cubic', 'cosine')

# Jitted once each: cheaper to compile than their operations one by one.
_velocity_loss = jax.jit(flowception.velocity_loss)
_rate_loss = jax.jit(flowception.rate_loss)
_time_weight = jax.jit(flowception.time_weight, static_argnums=1)


# Insertion schedulers.


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_kappa_endpoints_and_monotone(name):
  kappa = flowception.get_kappa(name)
  assert kappa.name == name
  np.testing.assert_allclose(kappa.fn(np.float64(0.0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(kappa.fn(np.float64(1.0)), 1.0, atol=1e-12)
  values = kappa.fn(np.linspace(0.0, 1.0, 1001))
  assert np.all(np.diff(values) > 0)
  assert np.all((values >= 0) & (values <= 1))


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_kappa_inverse(name):
  kappa = flowception.get_kappa(name)
  t = np.linspace(0.01, 1.0, 200)
  np.testing.assert_allclose(kappa.inverse(kappa.fn(t)), t, atol=1e-6)
  u = np.linspace(0.0, 1.0, 200)
  np.testing.assert_allclose(kappa.fn(kappa.inverse(u)), u, atol=1e-9)


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_kappa_derivative_matches_finite_differences(name):
  kappa = flowception.get_kappa(name)
  t = np.linspace(0.01, 0.99, 99)
  h = 1e-5
  numeric = (kappa.fn(t + h) - kappa.fn(t - h)) / (2 * h)
  np.testing.assert_allclose(kappa.derivative(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_kappa_accepts_jax_arrays(name):
  kappa = flowception.get_kappa(name)
  t = np.linspace(0.0, 1.0, 11, dtype=np.float32)
  for f in (kappa.fn, kappa.derivative, kappa.inverse):
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(t))), f(t), atol=1e-5)


def test_get_kappa_unknown_names_config_flag():
  with pytest.raises(ValueError, match=r'--config\.flow\.kappa'):
    flowception.get_kappa('quadratic')


# SNR shift.


def test_snr_shift():
  t = np.linspace(0.0, 1.0, 101)
  np.testing.assert_array_equal(flowception.snr_shift(t, 1.0), t)
  for s in (2.0, 3.0, 7.5):
    shifted = flowception.snr_shift(t, s)
    np.testing.assert_allclose(shifted[[0, -1]], [0.0, 1.0], atol=1e-12)
    assert np.all(np.diff(shifted) > 0)
    assert np.all(shifted[1:-1] < t[1:-1])  # Shifted towards noise.
  rng = np.random.default_rng(0)
  t = rng.uniform(size=50)
  s = rng.uniform(1.0, 10.0, size=50)
  expected = [ti / (ti + si * (1 - ti)) for ti, si in zip(t, s)]
  np.testing.assert_allclose([flowception.snr_shift(ti, si) for ti, si in zip(t, s)], expected,
                             rtol=1e-12)


# Insertion hazard.


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_insertion_probability_mass(name):
  kappa = flowception.get_kappa(name)
  t = np.linspace(0.0, 0.9, 10, dtype=np.float32)
  for h in (0.01, 0.05, 0.1):
    expected = (kappa.fn(t + h) - kappa.fn(t)) / (1 - kappa.fn(t))
    got = flowception.insertion_probability_mass(kappa, jnp.asarray(t), h)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


def test_insertion_probability_mass_linear_is_h_over_one_minus_t():
  kappa = flowception.get_kappa('linear')
  t = jnp.linspace(0.0, 0.8, 9)
  h = 0.02
  np.testing.assert_allclose(np.asarray(flowception.insertion_probability_mass(kappa, t, h)),
                             h / (1 - np.asarray(t)), rtol=1e-4)
  # The last step inserts every remaining frame.
  np.testing.assert_allclose(flowception.insertion_probability_mass(kappa, 1.0 - h, h), 1.0,
                             rtol=1e-4)


# Extended time.


@pytest.mark.parametrize('name', KAPPA_NAMES)
@pytest.mark.parametrize('num_start_frames', [1, 2, 3])
@pytest.mark.parametrize('tau_distribution', ['uniform', 'logit_normal'])
def test_extended_time_invariants(name, num_start_frames, tau_distribution):
  kappa = flowception.get_kappa(name)
  rng = np.random.default_rng(1)
  for _ in range(100):
    n = int(rng.integers(1, 20))
    ext = flowception.sample_extended_time(rng, n, kappa=kappa, num_start_frames=num_start_frames,
                                           tau_distribution=tau_distribution)
    assert ext.delays.shape == ext.tau.shape == (n,)
    assert ext.delays.dtype == ext.tau.dtype == np.float32
    assert ext.delays[0] == 0 and ext.visible[0]
    assert np.sum(ext.delays == 0) == min(num_start_frames, n)
    assert np.all((ext.delays >= 0) & (ext.delays <= 1))
    assert ext.in_flow.any()
    assert np.all((ext.times >= 0) & (ext.times <= 1))
    np.testing.assert_allclose(ext.tau, ext.tau_global - ext.delays, rtol=1e-6, atol=1e-6)
    assert 0 <= ext.tau_global < ext.delays.max() + 1
    np.testing.assert_array_equal(ext.visible, ext.tau >= 0)
    np.testing.assert_array_equal(ext.in_flow, (ext.tau >= 0) & (ext.tau < 1))


def test_extended_time_context_frames_are_done():
  rng = np.random.default_rng(2)
  context = np.zeros(10, bool)
  context[[0, 4]] = True
  for _ in range(50):
    ext = flowception.sample_extended_time(rng, 10, kappa=flowception.get_kappa('linear'),
                                           num_start_frames=2, context=context)
    assert np.all(ext.delays[context] == 0)
    assert np.all(ext.tau[context] >= 1)
    assert np.any(ext.in_flow & ~context)


@pytest.mark.parametrize('name', ['linear', 'cubic'])
def test_delays_follow_kappa(name):
  """P(delay <= g) = kappa(g) for non-start frames."""
  kappa = flowception.get_kappa(name)
  rng = np.random.default_rng(3)
  n = 20001
  delays = np.concatenate([
      flowception.sample_extended_time(rng, n, kappa=kappa, num_start_frames=1).delays[1:]
      for _ in range(5)])
  for g in (0.1, 0.25, 0.5, 0.75, 0.9):
    p = float(kappa.fn(g))
    tolerance = 5 * np.sqrt(p * (1 - p) / delays.size)
    assert abs(np.mean(delays <= g) - p) < tolerance, (g, np.mean(delays <= g), p)


@pytest.mark.parametrize('name', ['linear', 'cubic'])
def test_visible_share_given_global_time(name):
  """Given tau_g = g < 1, a non-start frame is visible with probability kappa(g)."""
  kappa = flowception.get_kappa(name)
  rng = np.random.default_rng(4)
  n = 2001
  shares, expected, counts = [], [], []
  for _ in range(40):
    ext = flowception.sample_extended_time(rng, n, kappa=kappa, num_start_frames=1)
    if ext.tau_global >= 1:
      continue
    shares.append(ext.visible[1:].mean())
    expected.append(float(kappa.fn(ext.tau_global)))
    counts.append(n - 1)
  assert len(shares) >= 5
  shares, expected = np.array(shares), np.array(expected)
  tolerance = 5 * np.sqrt(np.maximum(expected * (1 - expected), 1e-4) / np.array(counts))
  assert np.all(np.abs(shares - expected) < tolerance)


@pytest.mark.parametrize('max_tries', [0, 1])
def test_extended_time_fallback_puts_a_frame_in_flow(max_tries):
  """When the redraws run out, a non-context frame is still forced into the flow at time 0."""
  kappa = flowception.get_kappa('cubic')
  rng = np.random.default_rng(5)
  context = np.array([True, False, False])  # Only a context frame is visible before any insertion.
  for _ in range(200):
    for ctx in (None, context):
      ext = flowception.sample_extended_time(rng, 3, kappa=kappa, num_start_frames=1,
                                             context=ctx, max_tries=max_tries)
      flowing = ext.in_flow if ctx is None else ext.in_flow & ~ctx
      assert flowing.any()
      assert ext.visible[0]
      np.testing.assert_allclose(ext.tau, ext.tau_global - ext.delays if ctx is None else
                                 np.where(ctx, np.maximum(ext.tau_global - ext.delays, 1),
                                          ext.tau_global - ext.delays), atol=1e-6)


def test_unknown_tau_distribution_names_config_flag():
  with pytest.raises(ValueError, match=r'--config\.flow\.tau_distribution'):
    flowception.sample_extended_time(np.random.default_rng(0), 4,
                                     kappa=flowception.get_kappa('linear'), num_start_frames=1,
                                     tau_distribution='beta')


# Insertion targets and compaction.


def _brute_targets(visible):
  targets = [0] * len(visible)
  for i, v in enumerate(visible):
    if not v:
      continue
    j = i + 1
    while j < len(visible) and not visible[j]:
      targets[i] += 1
      j += 1
  return targets


def test_insertion_targets_edge_cases():
  np.testing.assert_array_equal(flowception.insertion_targets(np.ones(5, bool)), np.zeros(5))
  np.testing.assert_array_equal(flowception.insertion_targets([True, False, False, False]),
                                [3, 0, 0, 0])
  np.testing.assert_array_equal(flowception.insertion_targets([True, False, False, True]),
                                [2, 0, 0, 0])
  np.testing.assert_array_equal(flowception.insertion_targets([True]), [0])
  # Invisible frames before the first visible one have no owner.
  np.testing.assert_array_equal(flowception.insertion_targets([False, True, False]), [0, 1, 0])
  assert flowception.insertion_targets(np.ones(3, bool)).dtype == np.int32


def test_insertion_targets_match_brute_force():
  rng = np.random.default_rng(6)
  for _ in range(500):
    n = int(rng.integers(1, 16))
    visible = rng.uniform(size=n) < rng.uniform()
    targets = flowception.insertion_targets(visible)
    np.testing.assert_array_equal(targets, _brute_targets(visible.tolist()))
    if visible[0]:
      assert visible.sum() + targets.sum() == n


@pytest.mark.parametrize('name', KAPPA_NAMES)
def test_targets_account_for_every_frame(name):
  kappa = flowception.get_kappa(name)
  rng = np.random.default_rng(7)
  for _ in range(200):
    n = int(rng.integers(1, 20))
    ext = flowception.sample_extended_time(rng, n, kappa=kappa, num_start_frames=2)
    targets = flowception.insertion_targets(ext.visible)
    assert ext.visible.sum() + targets.sum() == n
    if ext.tau_global >= 1:
      assert ext.visible.all() and not targets.any()


def test_compact():
  rng = np.random.default_rng(8)
  for _ in range(200):
    n = int(rng.integers(1, 16))
    visible = rng.uniform(size=n) < 0.5
    visible[0] = True
    count = int(visible.sum())
    capacity = count + int(rng.integers(0, 4))
    index = flowception.compact(visible, capacity)
    assert index.shape == (capacity,) and index.dtype == np.int32
    np.testing.assert_array_equal(index[:count], [i for i in range(n) if visible[i]])
    assert np.all(np.diff(index[:count]) > 0)
    assert np.all(visible[index])
  with pytest.raises(ValueError):
    flowception.compact(np.ones(5, bool), 4)


# Losses.


def test_velocity_loss_matches_brute_force_and_ignores_unmasked():
  rng = np.random.default_rng(9)
  shape = (3, 5, 4, 4, 2)
  velocity = rng.normal(size=shape).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  mask = rng.uniform(size=shape[:2]) < 0.5
  mask[0, 0] = True
  expected = np.mean([np.mean((velocity[b, f] - target[b, f])**2)
                      for b in range(3) for f in range(5) if mask[b, f]])
  loss = _velocity_loss(velocity, target, mask)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  changed = velocity.copy()
  changed[~mask] = 1e3
  loss_changed = _velocity_loss(changed, target, mask)
  np.testing.assert_allclose(float(loss_changed), float(loss), rtol=1e-6)
  empty = _velocity_loss(velocity, target, np.zeros(shape[:2], bool))
  assert float(empty) == 0.0


def _brute_poisson_nll(log_rate, targets, mask):
  values = []
  for lr, k, m in zip(log_rate.ravel(), targets.ravel(), mask.ravel()):
    if m:
      rate = np.exp(min(float(lr), flowception.MAX_LOG_RATE))
      values.append(rate - float(k) * np.log(rate + 1e-8))
  return np.mean(values)


def test_rate_loss_matches_brute_force():
  rng = np.random.default_rng(10)
  log_rate = rng.normal(size=(4, 6)).astype(np.float32) * 2
  log_rate[0, 0] = 50.0  # Clipped at MAX_LOG_RATE.
  targets = rng.integers(0, 6, size=(4, 6)).astype(np.int32)
  mask = rng.uniform(size=(4, 6)) < 0.7
  mask[0, 0] = True
  loss = _rate_loss(log_rate, targets, mask)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), _brute_poisson_nll(log_rate, targets, mask), rtol=1e-5)
  # Masked slots do not matter.
  changed_rate, changed_targets = log_rate.copy(), targets.copy()
  changed_rate[~mask] = -7.0
  changed_targets[~mask] = 99
  loss_changed = _rate_loss(changed_rate, changed_targets, mask)
  np.testing.assert_allclose(float(loss_changed), float(loss), rtol=1e-6)
  empty = _rate_loss(log_rate, targets, np.zeros((4, 6), bool))
  assert float(empty) == 0.0


def test_rate_loss_minimised_at_mean_target():
  targets = np.array([[0, 1, 4, 3, 2, 0]], np.int32)
  mean = targets.mean()
  grid = np.linspace(0.1, 5.0, 491)
  losses = [float(_rate_loss(np.full((1, 6), np.log(lam), np.float32), targets,
                             np.ones((1, 6), bool)))
            for lam in grid]
  assert abs(grid[int(np.argmin(losses))] - mean) < 0.011


# Knobs of the time distribution and the velocity-loss weighting.


def test_logit_normal_global_time_follows_its_location_and_scale():
  draw = lambda loc, scale: np.array([flowception.sample_global_ratio(
      np.random.default_rng(i), 'logit_normal', loc=loc, scale=scale) for i in range(2000)])
  default = draw(0.0, 1.0)
  np.testing.assert_array_equal(default, [flowception.sample_global_ratio(
      np.random.default_rng(i), 'logit_normal') for i in range(2000)])
  logits = np.log(default) - np.log1p(-default)
  assert abs(logits.mean()) < 0.1 and abs(logits.std() - 1) < 0.05
  shifted = draw(1.5, 0.5)
  logits = np.log(shifted) - np.log1p(-shifted)
  assert abs(logits.mean() - 1.5) < 0.05 and abs(logits.std() - 0.5) < 0.03


def test_time_weight_is_the_logit_normal_density():
  t = (np.arange(100_000) + 0.5) / 100_000
  np.testing.assert_array_equal(_time_weight(jnp.asarray(t), 'uniform'), 1.0)
  rng = np.random.default_rng(0)
  for loc, scale in ((0.0, 1.0), (-0.5, 0.7)):
    weight = np.asarray(_time_weight(jnp.asarray(t), 'logit_normal', loc, scale))
    assert abs(weight.mean() - 1.0) < 1e-3  # A density on [0, 1]: mean 1 over uniform times.
    draws = 1 / (1 + np.exp(-rng.normal(loc, scale, 100_000)))
    histogram = np.histogram(draws, bins=20, range=(0, 1), density=True)[0]
    np.testing.assert_allclose(weight.reshape(20, -1).mean(axis=1), histogram, atol=0.06)
  edges = _time_weight(jnp.array([0.0, 1.0]), 'logit_normal')
  assert np.all(np.isfinite(edges)) and np.all(np.asarray(edges) < 1e-3)
  with pytest.raises(ValueError, match='--config.flow.velocity_weighting'):
    _time_weight(jnp.asarray(t), 'snr')


def test_weighted_velocity_loss_matches_brute_force():
  rng = np.random.default_rng(3)
  velocity, target = rng.normal(size=(2, 3, 4, 2, 2, 1)).astype(np.float32)
  mask = np.array([[True, False, True, True], [False, True, True, False]])
  weight = rng.uniform(0, 2, size=(3, 4)).astype(np.float32)
  expected = sum(weight[b, f] * np.mean((velocity[b, f] - target[b, f])**2)
                 for b in range(3) for f in range(4) if mask[b % 2, f]) / mask[[0, 1, 0]].sum()
  loss = _velocity_loss(velocity, target, mask[[0, 1, 0]], weight)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  unweighted = _velocity_loss(velocity, target, mask[[0, 1, 0]])
  unit_weights = _velocity_loss(velocity, target, mask[[0, 1, 0]], np.ones((3, 4), np.float32))
  np.testing.assert_allclose(float(unit_weights), float(unweighted), rtol=1e-6)
