"""DiT properties: shapes, padding isolation, relative positions, conditioning, dtypes,
partitioning, the key-value cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flowception_jax.core import model as model_lib
from flowception_jax.training import sharding
from tests import tiny_params

B, F, H, W, C = 2, 5, 8, 8, 3


def _model(num_classes=0, dtype='float32', size='tiny', patch_size=4):
  config = ml_collections.ConfigDict(
      dict(size=size, patch_size=patch_size, mlp_ratio=2.0, dtype=dtype))
  return model_lib.build_model(config, channels=C, num_classes=num_classes)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  frames = jnp.asarray(rng.normal(size=(B, F, H, W, C)), jnp.float32)
  context = jnp.zeros_like(frames)
  times = jnp.asarray(rng.uniform(size=(B, F)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(F), (B, F))
  mask = jnp.array([[True] * F, [True, True, True, False, False]])
  return frames, context, times, positions, mask


def _params(net, inputs, *labels):
  """Initialised parameters, perturbed so the zero-initialised heads and gates are active."""
  return tiny_params.perturbed_init(net, *inputs, *labels)


def test_output_shapes_and_zero_initialised_heads():
  net, inputs = _model(), _inputs()
  velocity, log_rate = tiny_params.apply(net, tiny_params.init(net, *inputs), *inputs)
  assert velocity.shape == (B, F, H, W, C) and velocity.dtype == jnp.float32
  assert log_rate.shape == (B, F) and log_rate.dtype == jnp.float32
  # adaLN-Zero and zero-initialised output layers: the untrained model predicts v = 0, rate 1.
  np.testing.assert_array_equal(velocity, 0.0)
  np.testing.assert_array_equal(log_rate, 0.0)


def test_padded_slots_do_not_change_real_frames():
  net, inputs = _model(), _inputs()
  params = _params(net, inputs)
  frames, context, times, positions, mask = inputs
  pad = ~mask[:, :, None, None, None]
  noise = jax.random.normal(jax.random.key(3), frames.shape)
  changed = (jnp.where(pad, noise, frames), jnp.where(pad, noise, context),
             jnp.where(mask, times, 0.77), jnp.where(mask, positions, 11), mask)
  v1, r1 = tiny_params.apply(net, params, *inputs)
  v2, r2 = tiny_params.apply(net, params, *changed)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(v1)[real], np.asarray(v2)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(r1)[real], np.asarray(r2)[real], atol=1e-5)
  assert not np.allclose(np.asarray(v1)[~real], np.asarray(v2)[~real])


def test_only_relative_slot_positions_matter():
  net, inputs = _model(), _inputs()
  params = _params(net, inputs)
  frames, context, times, positions, mask = inputs
  v1, r1 = tiny_params.apply(net, params, *inputs)
  v2, r2 = tiny_params.apply(net, params, frames, context, times, positions + 7, mask)
  np.testing.assert_allclose(v1, v2, atol=2e-4)
  np.testing.assert_allclose(r1, r2, atol=2e-4)
  # Swapping two slots' positions is not a no-op: order is visible to the model.
  swapped = positions.at[:, 0].set(1).at[:, 1].set(0)
  v3, _ = tiny_params.apply(net, params, frames, context, times, swapped, mask)
  assert not np.allclose(v1, v3, atol=1e-3)


@pytest.mark.parametrize('attn_window', [0, 1])
def test_frames_called_against_a_cache_get_the_outputs_of_the_whole_sequence(attn_window):
  """Frames 3 and 4 called alone against the keys and values of frames 0 to 2 (`return_kv`,
  `past`) get the outputs of one call on all five in which frames 0 to 2 do not see 3 and 4 (the
  autoregressive samplers' case), within the band of `attn_window`."""
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=4, mlp_ratio=2.0,
                                          dtype='float32', attn_window=attn_window))
  net, inputs = model_lib.build_model(config, channels=C, num_classes=0), _inputs()
  params = _params(net, inputs)
  inputs = (*inputs[:4], jnp.ones((B, F), bool))
  new = np.arange(F) >= 3
  whole = jnp.asarray(np.broadcast_to(~new[None, :] | new[:, None], (B, F, F)))
  velocity, log_rate = tiny_params.apply(net, params, *inputs, frame_attention=whole)
  first, later = ([x[:, :3] for x in inputs], [x[:, 3:] for x in inputs])
  _, _, past = jax.jit(lambda *a: net.apply(params, *a, return_kv=True))(*first)
  tokens = (H // 4) * (W // 4) + 1
  assert len(past.keys) == len(past.values) == model_lib.MODEL_SIZES['tiny'][1]
  assert past.keys[0].shape == (B, 3 * tokens, 2, 16)
  np.testing.assert_array_equal(past.positions, inputs[3][:, :3])
  got_velocity, got_log_rate = jax.jit(lambda *a: net.apply(params, *a, past=past))(*later)
  np.testing.assert_allclose(got_velocity, velocity[:, 3:], atol=1e-5)
  np.testing.assert_allclose(got_log_rate, log_rate[:, 3:], atol=1e-5)
  # Without the past frames, frames 3 and 4 are other frames.
  alone, _ = tiny_params.apply(net, params, *later)
  assert np.abs(np.asarray(alone) - np.asarray(velocity[:, 3:])).max() > 1e-2


def test_time_conditioning_is_per_frame():
  net, inputs = _model(), _inputs()
  params = _params(net, inputs)
  frames, context, times, positions, mask = inputs
  v1, _ = tiny_params.apply(net, params, *inputs)
  v2, _ = tiny_params.apply(net, params, frames, context, times.at[:, 2].add(0.3), positions, mask)
  delta = np.abs(np.asarray(v1 - v2)).reshape(B, F, -1).max(-1)
  # Frame 2's own modulation changes; the others change only through attention, much less.
  assert delta[0, 2] > 0
  assert delta[0, 2] > 3 * np.delete(delta[0], 2).max()


def test_context_channels_and_labels_condition_the_output():
  net = _model(num_classes=4)
  inputs = _inputs()
  params = _params(net, inputs, jnp.zeros((B,), jnp.int32))
  frames, context, times, positions, mask = inputs
  base, _ = tiny_params.apply(net, params, *inputs, jnp.array([0, 1]))
  other, _ = tiny_params.apply(net, params, *inputs, jnp.array([2, 1]))
  null, _ = tiny_params.apply(net, params, *inputs)  # No labels: the null class.
  explicit_null, _ = tiny_params.apply(net, params, *inputs, jnp.array([4, 4]))
  np.testing.assert_allclose(null, explicit_null, atol=1e-6)
  assert not np.allclose(base[0], other[0]) and np.allclose(base[1], other[1], atol=1e-6)
  with_context, _ = tiny_params.apply(net, params, frames, frames, times, positions, mask,
                                      jnp.array([0, 1]))
  assert not np.allclose(base, with_context)


def test_bfloat16_activations_keep_float32_parameters_and_outputs():
  net, inputs = _model(dtype='bfloat16'), _inputs()
  params = tiny_params.init(net, *inputs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  velocity, log_rate = tiny_params.apply(net, params, *inputs)
  assert velocity.dtype == jnp.float32 and log_rate.dtype == jnp.float32


def test_parameters_are_logically_partitioned_onto_the_mesh():
  net, inputs = _model(), _inputs()
  boxed = jax.eval_shape(lambda k: net.init(k, *inputs), jax.random.key(0))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=len(jax.devices()))))
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    shardings = sharding.logical_shardings(boxed, mesh)
  kernel = shardings['params']['block_0']['mlp_in']['kernel']
  assert kernel.spec[0] == 'fsdp'  # ('embed', 'mlp') -> ('fsdp', None).


@pytest.mark.parametrize('field, value, match', [
    ('patch_size', 3, 'patch_size'),
    ('size', 'huge', 'model.size'),
    ('dtype', 'float16', 'model.dtype'),
])
def test_bad_config_names_the_fix(field, value, match):
  kwargs = {field: value}
  with pytest.raises(ValueError, match=match):
    net = _model(**kwargs)
    net.init(jax.random.key(0), *_inputs())


def test_per_frame_labels_equal_per_video_labels_broadcast():
  net = _model(num_classes=4)
  inputs = _inputs()
  params = _params(net, inputs, jnp.zeros((B,), jnp.int32))
  per_video, _ = tiny_params.apply(net, params, *inputs, jnp.array([0, 3]))
  per_frame, _ = tiny_params.apply(net, params, *inputs, jnp.array([[0] * F, [3] * F]))
  np.testing.assert_allclose(per_video, per_frame, atol=1e-6)
  mixed, _ = tiny_params.apply(net, params, *inputs, jnp.array([[0, 2, 0, 0, 0], [3, 3, 3, 1, 1]]))
  assert not np.allclose(np.asarray(per_video)[0, 1], np.asarray(mixed)[0, 1], atol=1e-6)
  # Row 1's last two slots are padding: their labels reach no real frame.
  np.testing.assert_allclose(np.asarray(per_video)[1, :3], np.asarray(mixed)[1, :3], atol=1e-6)


def test_data_prediction_implies_the_straight_path_velocity():
  rng = np.random.default_rng(0)
  x1, x0 = rng.normal(size=(2, B, F, H, W, C)).astype(np.float32)
  t = rng.uniform(0, 0.9, size=(B, F)).astype(np.float32)
  x_t = t[..., None, None, None] * x1 + (1 - t[..., None, None, None]) * x0
  np.testing.assert_allclose(model_lib.velocity_of_data(x1, x_t, t), x1 - x0, atol=1e-4)
  assert np.isfinite(model_lib.velocity_of_data(x1, x1, np.ones((B, F), np.float32))).all()
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=4, mlp_ratio=2.0,
                                          dtype='float32', prediction='data'))
  net = model_lib.build_model(config, channels=C, num_classes=0)
  inputs = _inputs()
  params = tiny_params.init(net, *inputs)
  frames, _, times, *_ = inputs
  # Zero-initialised head: the clean frame is 0.
  velocity, _ = tiny_params.apply(net, params, *inputs)
  np.testing.assert_allclose(velocity, model_lib.velocity_of_data(jnp.zeros_like(frames), frames,
                                                                  times), atol=1e-5)
  with pytest.raises(ValueError, match='--config.model.prediction'):
    model_lib.build_model(ml_collections.ConfigDict(dict(config, prediction='noise')),
                          channels=C, num_classes=0)


def test_local_mixing_reaches_grid_neighbours_only():
  """With attention switched off (its gates at zero), a change in one patch reaches the patches
  next to it on the grid through the mixing layers, and nothing beyond the blocks' reach."""
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=2, mlp_ratio=2.0,
                                          dtype='float32', local_mixing=True))
  net = model_lib.build_model(config, channels=C, num_classes=0)
  inputs = _inputs()
  params = _params(net, inputs)
  d = net.hidden_size
  for i in range(net.depth):
    adaln = params['params'][f'block_{i}']['adaln']
    adaln['kernel'] = adaln['kernel'].at[:, 2 * d:3 * d].set(0)
    adaln['bias'] = adaln['bias'].at[2 * d:3 * d].set(0)
  frames, context, times, positions, mask = inputs
  v1, _ = tiny_params.apply(net, params, *inputs)
  v2, _ = tiny_params.apply(net, params, frames.at[:, 0, :2, :2].add(1.0), context, times,
                            positions, mask)
  change = np.abs(np.asarray(v1 - v2))[:, 0].reshape(B, 4, 2, 4, 2, C).max(axis=(0, 2, 4, 5))
  assert change[0, 0] > 0 and change[1, 1] > 0  # Its own patch and a diagonal neighbour.
  assert change[2, 2] > 0  # Two blocks of 3x3 mixing reach two patches away.
  assert change[3, 3] == 0 and change[0, 3] == 0  # Three away: out of reach.
  np.testing.assert_array_equal(np.asarray(v1)[:, 1:], np.asarray(v2)[:, 1:])  # Other frames.


def test_depthwise_mixing_equals_a_grouped_convolution():
  """The shifted-add depthwise convolution matches XLA's grouped convolution, parameters and all."""
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
  mixing = model_lib.DepthwiseConv3x3(jnp.float32, jnp.float32)
  params = mixing.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, nn.meta.unbox(params))  # A non-zero bias too.
  reference = nn.Conv(6, (3, 3), padding='SAME', feature_group_count=6)
  assert jax.tree.map(jnp.shape, reference.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(mixing.apply(params, x), reference.apply(params, x), atol=1e-5)


@pytest.mark.e2e  # A training run: 400 optimizer steps.
def test_attention_learns_to_route_by_position():
  """The backbone can learn what the shapes set needs of it: each patch's output is its right
  neighbour's input (wrapping), which only position-aware attention can compute."""
  # Wide enough to carry a patch's 48 values through the residual stream.
  net = model_lib.DiT(patch_size=4, channels=C, hidden_size=64, depth=2, num_heads=2)
  frames = lambda key: jax.random.normal(key, (8, 1, H, W, C))
  apply = lambda p, x: net.apply(p, x, jnp.zeros_like(x), jnp.full((8, 1), 0.5),
                                 jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1), bool))[0]
  loss = lambda p, x: jnp.mean((apply(p, x) - jnp.roll(x, -4, axis=3))**2)
  params = nn.unbox(net.init(jax.random.key(0), *model_lib.init_inputs((H, W, C), 1, 0)))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(loss)(params, frames(key))
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(400):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  # Ignoring position (the best mean-pool answer) leaves about the target's variance, 1.
  assert float(loss(params, frames(jax.random.key(10_000)))) < 0.2


def test_a_single_patch_frame_is_one_token_that_gives_velocity_and_rate():
  net = _model(patch_size=8)  # 8x8 frames: one patch each.
  inputs = _inputs()
  params = _params(net, inputs)
  assert 'rate_token' not in params['params']
  assert 'rate_token' in jax.eval_shape(_model().init, jax.random.key(0), *inputs)['params']
  lowered = tiny_params.apply.lower(net, params, *inputs)
  assert f'{B}x{F}x' in lowered.as_text() and f'{B}x{F * 2}x' not in lowered.as_text()
  velocity, log_rate = tiny_params.apply(net, params, *inputs)
  assert velocity.shape == (B, F, H, W, C) and log_rate.shape == (B, F)
  # The rate reads the frame's own token: its pixels move it.
  frames = inputs[0].at[:, 1].add(1.0)
  _, moved = tiny_params.apply(net, params, frames, *inputs[1:])
  assert np.all(np.abs(np.asarray(moved - log_rate))[:, 1] > 1e-4)
  assert [tuple(cell) for cell in model_lib.token_grid(1, 1)] == [(0, 0)]
  assert [tuple(cell) for cell in model_lib.token_grid(2, 1)] == [(0, 0), (1, 0), (2, 1)]
