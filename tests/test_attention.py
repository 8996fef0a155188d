"""Attention kernels: the blockwise and splash ones equal the dense one, in values and gradients,
and the blockwise one's memory grows linearly with the sequence."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.core import attention
from flowception_jax.core import model as model_lib
from flowception_jax.training import config as config_lib
from flowception_jax.training import memory
from flowception_jax.training import sharding
from flowception_jax.training import train
from tests import tiny_params


def _inputs(seed, b=2, frames=5, tokens=3, heads=2, dim=8):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (b, frames * tokens, heads, dim)) for key in keys[:3])
  frame_mask = jnp.arange(frames)[None, :] < jnp.array([[3], [frames]])[:b]  # Padded frames.
  frame_attention = jax.random.bernoulli(keys[3], 0.6, (b, frames, frames)) | jnp.eye(frames,
                                                                                     dtype=bool)
  return q, k, v, frame_mask, frame_attention


@functools.partial(jax.jit, static_argnums=(0, 5))
def _value_and_grads(implementation, q, k, v, mask, block, rows=None):
  """The output [B, S, H, D] and the gradients of q, k, v under a loss that reads the queries
  `rows` (bool [B, S]; None: all). Compiled once per kernel, block and shapes."""
  def loss(q, k, v):
    out = attention.attend(q, k, v, mask, implementation=implementation, block=block)
    weights = jnp.arange(out.size).reshape(out.shape) / out.size
    if rows is not None:
      weights = jnp.where(rows[:, :, None, None], weights, 0.0)
    return jnp.sum(jnp.sin(out) * weights), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize('block', [1, 4, 15, 64])  # Blocks that do and do not divide the tokens.
@pytest.mark.parametrize('with_frame_attention', [False, True])
def test_blockwise_attention_equals_dense_in_values_and_gradients(block, with_frame_attention):
  q, k, v, frame_mask, frame_attention = _inputs(block)
  mask = attention.FrameMask(frame_mask, frame_attention if with_frame_attention else None, 3)
  dense, dense_grads = _value_and_grads('dense', q, k, v, mask, block)
  blockwise, blockwise_grads = _value_and_grads('blockwise', q, k, v, mask, block)
  np.testing.assert_allclose(blockwise, dense, atol=1e-5)
  for got, want in zip(blockwise_grads, dense_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # The mask matters: a key frame taken away changes what its queries see.
  changed = attention.FrameMask(frame_mask.at[1, 0].set(False), mask.frame_attention, 3)
  assert not np.allclose(_value_and_grads('blockwise', q, k, v, changed, block)[0], blockwise,
                         atol=1e-3)


def test_splash_attention_equals_dense_on_the_queries_a_loss_reads():
  # 200 tokens: two blocks of 128, the second part padding; two padding frames in one example.
  q, k, v, frame_mask, _ = _inputs(0, tokens=40)
  mask = attention.FrameMask(frame_mask, None, 40)
  real = jnp.repeat(frame_mask, 40, axis=1)  # Padding frames' queries are read by no loss.
  dense, dense_grads = _value_and_grads('dense', q, k, v, mask, 128, rows=real)
  # The examples split over two devices (a shard_map); one example alone is not split.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    splash, splash_grads = jax.jit(
        lambda q, k, v: _value_and_grads('splash', q, k, v, mask, 128, rows=real))(q, k, v)
    alone = jax.jit(lambda q, k, v: attention.attend(
        q, k, v, attention.FrameMask(frame_mask[:1], None, 40), implementation='splash',
        block=128))(q[:1], k[:1], v[:1])
  np.testing.assert_allclose(splash[real], dense[real], atol=1e-5)
  for got, want in zip(splash_grads, dense_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(alone[real[:1]], dense[:1][real[:1]], atol=1e-5)


def _model(implementation, block=7):
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=4, mlp_ratio=2.0,
                                          dtype='float32', attention=implementation,
                                          attention_block=block))
  return model_lib.build_model(config, channels=3, num_classes=0)


@functools.partial(jax.jit, static_argnums=0)
def _dit_loss_and_grads(net, params, inputs, frame_attention):
  """A loss of `net`'s outputs on the real frames of `inputs`, and its parameter gradients."""
  frames, times, positions, frame_mask = inputs

  def loss(params):
    velocity, log_rate = net.apply(params, frames, jnp.zeros_like(frames), times, positions,
                                   frame_mask, frame_attention=frame_attention)
    real = frame_mask[:, :, None, None, None]
    return jnp.sum(jnp.where(real, velocity, 0.0) ** 2) + jnp.sum(jnp.where(frame_mask, log_rate,
                                                                            0.0))

  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize('implementation', ['blockwise', 'splash'])
def test_dit_equals_dense_with_padding_and_causal_masks(implementation):
  b, f = 2, 4
  dense, other = _model('dense'), _model(implementation)
  keys = jax.random.split(jax.random.key(0), 2)
  frames = jax.random.normal(keys[0], (b, f, 8, 8, 3))
  times = jax.random.uniform(keys[1], (b, f))
  positions = jnp.broadcast_to(jnp.arange(f), (b, f))
  frame_mask = jnp.array([[True, True, True, False], [True] * f])
  causal = model_lib.causal_attention(positions)
  # adaLN-Zero starts every block as the identity: the weights are moved off it.
  params = tiny_params.perturbed_init(dense, *model_lib.init_inputs((8, 8, 3), f, 0))
  inputs = (frames, times, positions, frame_mask)
  # Splash takes no frame-level mask.
  for frame_attention in (None, causal) if implementation == 'blockwise' else (None,):
    want, want_grads = _dit_loss_and_grads(dense, params, inputs, frame_attention)
    got, got_grads = _dit_loss_and_grads(other, params, inputs, frame_attention)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _gradient_temp_bytes(implementation, tokens):
  q = jax.ShapeDtypeStruct((1, tokens, 1, 16), jnp.float32)
  mask = attention.FrameMask(jnp.ones((1, tokens // 16), bool), None, 16)
  grad = jax.grad(lambda q, k, v: attention.attend(q, k, v, mask, implementation=implementation,
                                                   block=128).sum(), argnums=(0, 1, 2))
  return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_where_dense_grows_quadratically():
  dense = [_gradient_temp_bytes('dense', s) for s in (1024, 2048)]
  blockwise = [_gradient_temp_bytes('blockwise', s) for s in (1024, 2048)]
  assert dense[1] > 3.5 * dense[0]  # [S, S] logits and probabilities.
  assert blockwise[1] < 2.5 * blockwise[0]
  assert blockwise[1] < dense[1] / 4


def test_unknown_or_unavailable_kernels_are_refused_with_the_fix():
  with pytest.raises(ValueError, match='--config.model.attention to one of dense, blockwise'):
    _model('flash')
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='needs a GPU'):
      _model('cudnn')
  q, k, v, frame_mask, frame_attention = _inputs(0)
  with pytest.raises(ValueError, match='splash attention takes no frame-level mask.*dense or '
                                       'blockwise'):
    attention.attend(q, k, v, attention.FrameMask(frame_mask, frame_attention, 3),
                     implementation='splash')
  config = ml_collections.ConfigDict(dict(size='tiny', patch_size=4, mlp_ratio=2.0,
                                          dtype='float32', attention='splash', attn_window=2))
  with pytest.raises(ValueError, match='attn_window makes one; use dense or blockwise'):
    model_lib.build_model(config, channels=3, num_classes=0)
  info = datasets.SourceInfo(frame_shape=(8, 8, 3), max_frames=4, num_classes=0)
  for method, packing in (('autoregressive', False), ('flowception', True)):
    config = config_lib.base_config()
    config.model.attention, config.method, config.data.packing = 'splash', method, packing
    with pytest.raises(ValueError, match=re.escape(
        f'makes one (method {method}, data.packing {packing}); use dense or blockwise')):
      train.resolve(config, None, info)


def test_the_memory_estimate_counts_the_kernel():
  estimate = lambda implementation, frames: memory.activation_bytes(
      _model(implementation, block=512), examples=1, frames=frames, tokens_per_frame=256, tensor=1)
  # 145 frames of 256 tokens: the pixel-space long clip.
  dense, blockwise = estimate('dense', 145), estimate('blockwise', 145)
  assert blockwise < dense / 20
  assert estimate('splash', 145) == blockwise
  assert estimate('dense', 290) > 3.5 * dense  # Quadratic.
  assert estimate('blockwise', 290) < 2.1 * blockwise  # Linear.
