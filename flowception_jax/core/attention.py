"""Attention over frames of tokens, by the kernel the config chooses.

Every kernel takes the mask at the level where it is defined, per frame (`FrameMask`): which frames
are real (the only keys) and, optionally, which query frame may see which key frame (causal or
windowed attention, packed clips). The kernels:
  dense      `jax.nn.dot_product_attention` (XLA) with the token-level mask; memory grows with the
             square of the sequence (logits of every query against every key).
  blockwise  flash-style attention in plain JAX: keys in blocks of `block` tokens, an online softmax
             forward, and a backward pass that recomputes each block from the saved softmax
             statistics, so memory grows linearly with the sequence. Runs on every backend.
  cudnn      `jax.nn.dot_product_attention(implementation='cudnn')`, the fused GPU kernel.
  splash     the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`), memory
             linear in the sequence, in a shard_map under a mesh. Real frames only (segment ids),
             no frame-level mask. Off TPU it runs in Pallas interpret mode: for tests only, slow.
They agree to float rounding, in values and gradients, on every query a loss reads. A query that may
see no key (a padding frame's, which no loss reads) gets the mean of every token's value, as
`jax.nn` computes it; under splash it attends to the other padding tokens instead.
"""

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention

IMPLEMENTATIONS = ('dense', 'blockwise', 'cudnn', 'splash')


@flax.struct.dataclass
class FrameMask:
  """Who attends to whom, per frame of `tokens` tokens.

  frame_mask: bool [B, F] real frames, the only keys.
  frame_attention: bool [B, F, F] (query frame, key frame) pairs that may attend, or None for all.
  """
  frame_mask: jax.Array
  frame_attention: jax.Array | None
  tokens: int = flax.struct.field(pytree_node=False)

  def token_mask(self) -> jax.Array:
    """The token-level mask of `jax.nn.dot_product_attention`: bool [B, 1, 1, S] (keys only)
    without a frame-level mask, else [B, 1, S, S], for S = F * tokens."""
    keys = jnp.repeat(self.frame_mask, self.tokens, axis=1)
    if self.frame_attention is None:
      return keys[:, None, None, :]
    allowed = jnp.repeat(jnp.repeat(self.frame_attention, self.tokens, axis=1), self.tokens, axis=2)
    return (allowed & keys[:, None, :])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: FrameMask, *,
           implementation: str = 'dense', block: int = 512) -> jax.Array:
  """Attention of q, k, v [B, S, H, D] under `mask`; returns [B, S, H, D]. `block`: the key block
  of the blockwise kernel, the query and key block of the splash kernel, in tokens."""
  if implementation == 'dense':
    return jax.nn.dot_product_attention(q, k, v, mask=mask.token_mask())
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, mask=mask.token_mask(), implementation='cudnn')
  if implementation == 'blockwise':
    frame_attention = mask.frame_attention
    if frame_attention is None:
      frame_attention = jnp.ones(mask.frame_mask.shape + mask.frame_mask.shape[-1:], bool)
    return _blockwise(q, k, v, mask.frame_mask, frame_attention, mask.tokens, block)
  if implementation == 'splash':
    if mask.frame_attention is not None:
      raise ValueError('splash attention takes no frame-level mask (causal or windowed attention, '
                       'packed clips); set --config.model.attention to dense or blockwise')
    return _splash(q, k, v, mask.frame_mask, mask.tokens, block)
  raise ValueError(f'unknown attention {implementation!r}; set --config.model.attention to one of '
                   f'{", ".join(IMPLEMENTATIONS)}')


# Masked logits, as `jax.nn.dot_product_attention` fills them: a row with no allowed key then
# averages every real key, as the dense kernel does. Padding keys of the last block get -inf.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, S, ...] padded to whole blocks and split: [S_pad / block, B, block, ...]."""
  b, s = x.shape[:2]
  pad = -s % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, (s + pad) // block, block) + x.shape[2:]), 1, 0)


def _block_logits(q, k_blk, frame_mask, frame_attention, tokens, start, block, seq):
  """Float32 logits [B, S, H, block] of every query against the key block at `start`, masked, and
  where they are allowed (bool [B, S, 1, block])."""
  logits = jnp.einsum('bqhd,bkhd->bqhk', q, k_blk, preferred_element_type=jnp.float32)
  keys = start + jnp.arange(block)
  key_frames = jnp.minimum(keys // tokens, frame_mask.shape[1] - 1)
  query_frames = jnp.arange(q.shape[1]) // tokens
  allowed = (frame_attention[:, query_frames][:, :, key_frames]
             & frame_mask[:, None, key_frames])[:, :, None, :]
  logits = jnp.where(allowed, logits, _MASKED)
  return jnp.where((keys < seq)[None, None, None, :], logits, -jnp.inf), allowed


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise(q, k, v, frame_mask, frame_attention, tokens, block):
  return _blockwise_forward(q, k, v, frame_mask, frame_attention, tokens, block)[0]


def _blockwise_forward(q, k, v, frame_mask, frame_attention, tokens, block):
  """Online-softmax forward: the output, and each query's largest logit and sum of exponentials
  [B, S, H] (kept apart: a row of masked logits has a largest logit too large for a log-sum-exp
  in float32 to resolve its sum)."""
  b, s, h, d = q.shape
  scaled = q * jnp.asarray(d ** -0.5, q.dtype)

  def step(carry, xs):
    top, total, acc = carry
    index, k_blk, v_blk = xs
    logits, _ = _block_logits(scaled, k_blk, frame_mask, frame_attention, tokens,
                              index * block, block, s)
    new_top = jnp.maximum(top, logits.max(axis=-1))
    p = jnp.exp(logits - new_top[..., None])
    decay = jnp.exp(top - new_top)
    total = total * decay + p.sum(axis=-1)
    acc = acc * decay[..., None] + jnp.einsum('bqhk,bkhd->bqhd', p, v_blk.astype(jnp.float32))
    return (new_top, total, acc), None

  k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
  init = (jnp.full((b, s, h), _MASKED, jnp.float32), jnp.zeros((b, s, h), jnp.float32),
          jnp.zeros((b, s, h, d), jnp.float32))
  (top, total, acc), _ = jax.lax.scan(step, init,
                                      (jnp.arange(len(k_blocks)), k_blocks, v_blocks))
  out = (acc / total[..., None]).astype(q.dtype)
  return out, (q, k, v, frame_mask, frame_attention, out, top, total)


def _blockwise_backward(tokens, block, residuals, d_out):
  """Gradients block by block from the saved softmax statistics: no [S, S] array is ever held."""
  q, k, v, frame_mask, frame_attention, out, top, total = residuals
  b, s, h, d = q.shape
  scale = d ** -0.5
  scaled = q * jnp.asarray(scale, q.dtype)
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, S, H]

  def step(d_q, xs):
    index, k_blk, v_blk = xs
    logits, allowed = _block_logits(scaled, k_blk, frame_mask, frame_attention, tokens,
                                    index * block, block, s)
    p = jnp.exp(logits - top[..., None]) / total[..., None]  # [B, S, H, block]
    d_v = jnp.einsum('bqhk,bqhd->bkhd', p, d_out)
    d_p = jnp.einsum('bqhd,bkhd->bqhk', d_out, v_blk.astype(jnp.float32))
    # A masked logit is a constant: the weight it gives still carries values, but no gradient
    # reaches its query or key.
    d_logits = jnp.where(allowed, p * (d_p - delta[..., None]), 0.0)
    d_q = d_q + scale * jnp.einsum('bqhk,bkhd->bqhd', d_logits, k_blk.astype(jnp.float32))
    d_k = scale * jnp.einsum('bqhk,bqhd->bkhd', d_logits, q.astype(jnp.float32))
    return d_q, (d_k, d_v)

  k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
  d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros((b, s, h, d), jnp.float32),
                                 (jnp.arange(len(k_blocks)), k_blocks, v_blocks))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1, h, d))[:, :s]
  return (d_q.astype(q.dtype), unblock(d_k).astype(k.dtype), unblock(d_v).astype(v.dtype),
          None, None)


_blockwise.defvjp(
    lambda q, k, v, frame_mask, frame_attention, tokens, block: _blockwise_forward(
        q, k, v, frame_mask, frame_attention, tokens, block),
    _blockwise_backward)


# The splash kernel tiles queries and keys in multiples of its 128 lanes.
_SPLASH_LANES = 128


def _splash(q, k, v, frame_mask, tokens, block):
  """Splash attention of q, k, v [B, S, H, D] to the tokens of real frames (bool [B, F]); returns
  [B, S, H, D].

  A Mosaic kernel is not partitioned by the compiler, so under a mesh it runs in a shard_map that
  splits the examples and heads as the logical axis rules split 'batch' and 'heads' (a split that
  does not divide them, as at initialisation on one example, is dropped); without `check_vma`, which
  the kernel's Pallas call does not support (its outputs do not say how they vary over the mesh).
  """
  shard = functools.partial(_splash_shard, tokens=tokens, block=block)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return shard(q, k, v, frame_mask)

  def dividing(name, size):
    axes = nn.logical_to_mesh_axes((name,))[0]
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    return axes if size % ways == 0 else None

  batch = dividing('batch', q.shape[0])
  spec = jax.P(batch, None, dividing('heads', q.shape[2]), None)
  return jax.shard_map(shard, in_specs=(spec, spec, spec, jax.P(batch)), out_specs=spec,
                       check_vma=False)(q, k, v, frame_mask)


def _splash_shard(q, k, v, frame_mask, tokens, block):
  """`_splash` on one device's examples and heads.

  Real tokens are one segment, every other token (padding frames, and the padding of the sequence to
  whole blocks) another, so every query sees at least itself. Blocks are `block` rounded up to a
  multiple of 128 tokens, at most the sequence so rounded. The kernel takes one example [H, S, D],
  so it is mapped over the batch, and does not scale q, so q is scaled here. Off TPU it runs in
  Pallas interpret mode: for tests only, and slow.
  """
  _, s, h, d = q.shape
  lanes = lambda n: -(-n // _SPLASH_LANES) * _SPLASH_LANES
  size = min(lanes(block), lanes(s))
  pad = -s % size
  to_heads = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  segments = jnp.pad(~jnp.repeat(frame_mask, tokens, axis=1), ((0, 0), (0, pad)),
                     constant_values=True).astype(jnp.int32)  # [B, S + pad], 0 for real tokens.
  block_sizes = splash_attention.BlockSizes(**dict.fromkeys(
      ('block_q', 'block_kv', 'block_q_dkv', 'block_kv_dkv', 'block_q_dq', 'block_kv_dq'), size))
  kernel = splash_attention.make_splash_mha_single_device(
      splash_attention.MultiHeadMask([splash_attention.FullMask((s + pad, s + pad))] * h),
      block_sizes=block_sizes, interpret=jax.default_backend() != 'tpu')
  out = jax.vmap(kernel)(to_heads(q * jnp.asarray(d ** -0.5, q.dtype)), to_heads(k), to_heads(v),
                         splash_attention.SegmentIds(segments, segments))
  return out.transpose(0, 2, 1, 3)[:, :s]
