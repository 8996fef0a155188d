"""DiT properties: shapes, padding isolation, relative positions, conditioning, dtypes, partitioning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowception_jax import model as model_lib
from flowception_jax import sharding

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


def _params(net, inputs, labels=None):
  """Initialised parameters, perturbed so the zero-initialised heads and gates are active."""
  params = nn.unbox(net.init(jax.random.key(0), *inputs, labels))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def test_output_shapes_and_zero_initialised_heads():
  net, inputs = _model(), _inputs()
  velocity, log_rate = net.apply(nn.unbox(net.init(jax.random.key(0), *inputs)), *inputs)
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
  v1, r1 = net.apply(params, *inputs)
  v2, r2 = net.apply(params, *changed)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(v1)[real], np.asarray(v2)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(r1)[real], np.asarray(r2)[real], atol=1e-5)
  assert not np.allclose(np.asarray(v1)[~real], np.asarray(v2)[~real])


def test_only_relative_slot_positions_matter():
  net, inputs = _model(), _inputs()
  params = _params(net, inputs)
  frames, context, times, positions, mask = inputs
  v1, r1 = net.apply(params, *inputs)
  v2, r2 = net.apply(params, frames, context, times, positions + 7, mask)
  np.testing.assert_allclose(v1, v2, atol=2e-4)
  np.testing.assert_allclose(r1, r2, atol=2e-4)
  # Swapping two slots' positions is not a no-op: order is visible to the model.
  swapped = positions.at[:, 0].set(1).at[:, 1].set(0)
  v3, _ = net.apply(params, frames, context, times, swapped, mask)
  assert not np.allclose(v1, v3, atol=1e-3)


def test_time_conditioning_is_per_frame():
  net, inputs = _model(), _inputs()
  params = _params(net, inputs)
  frames, context, times, positions, mask = inputs
  v1, _ = net.apply(params, *inputs)
  v2, _ = net.apply(params, frames, context, times.at[:, 2].add(0.3), positions, mask)
  delta = np.abs(np.asarray(v1 - v2)).reshape(B, F, -1).max(-1)
  # Frame 2's own modulation changes; the others change only through attention, much less.
  assert delta[0, 2] > 0
  assert delta[0, 2] > 3 * np.delete(delta[0], 2).max()


def test_context_channels_and_labels_condition_the_output():
  net = _model(num_classes=4)
  inputs = _inputs()
  params = _params(net, inputs, jnp.zeros((B,), jnp.int32))
  frames, context, times, positions, mask = inputs
  base, _ = net.apply(params, *inputs, jnp.array([0, 1]))
  other, _ = net.apply(params, *inputs, jnp.array([2, 1]))
  null, _ = net.apply(params, *inputs)  # No labels: the null class.
  explicit_null, _ = net.apply(params, *inputs, jnp.array([4, 4]))
  np.testing.assert_allclose(null, explicit_null, atol=1e-6)
  assert not np.allclose(base[0], other[0]) and np.allclose(base[1], other[1], atol=1e-6)
  with_context, _ = net.apply(params, frames, frames, times, positions, mask, jnp.array([0, 1]))
  assert not np.allclose(base, with_context)


def test_bfloat16_activations_keep_float32_parameters_and_outputs():
  net, inputs = _model(dtype='bfloat16'), _inputs()
  params = nn.unbox(net.init(jax.random.key(0), *inputs))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  velocity, log_rate = net.apply(params, *inputs)
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
