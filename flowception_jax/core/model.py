"""The Flowception DiT: a transformer over space-time tokens with a time and a rate per frame.

Each frame is patchified (its channels doubled by the clean context frame at the same slot) and gets
one extra learnable rate token, unless it is a single patch, whose token then carries both. All
tokens of all frames attend to each other (padded frames are masked as keys) unless a frame-level
mask restricts which frames see which: causal, or non-causal (clean past frames both ways, the frame
being made hidden from them), for the autoregressive baselines, a band of `attn_window` neighbouring
frames for any method. adaLN-Zero modulation is computed per frame from that frame's own time and
the class, and broadcast to its tokens. Rotary embeddings encode (slot, row, column). After the last
block the patch tokens give the velocity and the rate token gives the frame's insertion log-rate
(`token_grid`). A call may return every block's keys and values (`KVCache`), and a later call on a
few frames may attend to them besides its own: the autoregressive samplers compute the clean
frames once per frame they make.

Parameters carry logical axis names ('embed', 'mlp', 'heads', 'kv', 'patch', 'vocab') that
`sharding.LOGICAL_RULES` maps onto the mesh; activations are constrained to ('batch', 'length',
'embed'), and inside attention and the MLP to 'heads' and 'mlp', so that a tensor-parallel mesh
axis splits them (Megatron style: one all-reduce after each of the two).
"""

import math
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowception_jax.core import attention as attention_lib

# Named sizes: (hidden size, depth, heads). 'tiny' is for tests; 'tutorial' is the model of the
# paper authors' coloring tutorial; S..XL follow DiT; 'paper' is the main model of the Flowception
# paper (its latent configs: `config.long_clip_config`).
MODEL_SIZES = {
    'tiny': (32, 2, 2),
    'mini': (128, 4, 4),
    'small': (256, 6, 4),
    'tutorial': (256, 8, 8),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
    'paper': (1536, 38, 24),
}
_TIME_FEATURES = 256


def _dense(features: int, axes: tuple[str, str], name: str, dtype, param_dtype,
           zero: bool = False, use_bias: bool = True) -> nn.Dense:
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _fan_avg_uniform(in_axis, out_axis):
  """Xavier-uniform initialiser for kernels whose fan-in and fan-out span several axes."""
  return nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=in_axis,
                                          out_axis=out_axis)


def _constrain(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


def _constrain_heads(x: jax.Array) -> jax.Array:
  """Per-head activations [B, S, N, D_head], split by heads on a tensor-parallel mesh."""
  return nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))


# `model.remat`: what the backward pass keeps of a block's forward pass (it recomputes the rest).
REMAT_POLICIES = {
    'none': None,  # Keep everything (no recomputation).
    'full': jax.checkpoint_policies.nothing_saveable,  # Keep only each block's inputs.
    'dots': jax.checkpoint_policies.dots_saveable,  # Keep matrix-product outputs.
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Not attention's.
}


def timestep_features(t: jax.Array, dim: int = _TIME_FEATURES) -> jax.Array:
  """Sinusoidal features of times in [0, 1], [...] -> [..., dim] (DiT scaling by 1000)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def token_grid(rows: int, cols: int) -> np.ndarray:
  """(row, column) int [T, 2] of a frame's tokens, for a grid of rows x cols patches: the patches
  in row-major order, then the rate token at (rows, cols), except for a frame of a single patch,
  whose one token also gives the rate (a second token would double the sequence for nothing)."""
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  grid = np.stack([r.ravel(), c.ravel()], axis=-1)
  return grid if rows * cols == 1 else np.concatenate([grid, [[rows, cols]]])


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Rotary frequency pairs given to the (slot, row, column) axes of one attention head."""
  if head_dim % 2:
    raise ValueError(f'attention head size {head_dim} must be even for rotary embeddings')
  pairs = head_dim // 2
  spatial = pairs // 3
  return pairs - 2 * spatial, spatial, spatial


def rotary_angles(coords: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Angles [..., head_dim // 2] for integer coordinates [..., 3] (slot, row, column)."""
  parts = []
  for axis, pairs in enumerate(rope_split(head_dim)):
    if pairs:
      freqs = theta ** (-jnp.arange(pairs, dtype=jnp.float32) / pairs)
      parts.append(coords[..., axis, None].astype(jnp.float32) * freqs)
  return jnp.concatenate(parts, axis=-1)


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates pairs (x[..., :d/2], x[..., d/2:]) of x [B, S, N, D] by angles [B, S, D/2]."""
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


# `model.prediction`: what the network's frame output is. 'velocity': `x1 - x0` itself. 'data': the
# clean frame `x1` (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"); the
# model returns the velocity it implies, so losses and sampler are the same for both.
PREDICTIONS = ('velocity', 'data')
# 'data': `1 - t` is floored here, so frames near t = 1 do not divide by zero.
_MIN_DATA_DENOMINATOR = 0.05


def velocity_of_data(clean: jax.Array, noisy: jax.Array, times: jax.Array) -> jax.Array:
  """The velocity `(x1 - x_t) / (1 - t)` implied by clean frames [B, F, H, W, C] predicted from
  `noisy` frames at (model) times [B, F]; equals `x1 - x0` on the straight path."""
  denominator = jnp.maximum(1.0 - times.astype(jnp.float32), _MIN_DATA_DENOMINATOR)
  return (clean - noisy.astype(jnp.float32)) / denominator[..., None, None, None]


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation of x [B, F, T, D] by per-frame shift and scale [B, F, D]."""
  return x * (1.0 + scale[:, :, None, :]) + shift[:, :, None, :]


def causal_attention(positions: jax.Array, noisy: jax.Array | None = None) -> jax.Array:
  """Frame-level causal mask: every frame sees itself and the clean frames at earlier positions.

  positions: int [B, F] frame indices; noisy: bool [B, F] frames no other frame may see (the noisy
  copies of teacher forcing, which share their position with the clean frame they learn to make),
  None for none. Returns bool [B, F, F], `[b, q, k]` True where query frame q may attend to key k.
  With distinct positions and no noisy frames this is block-causal attention.
  """
  earlier = positions[:, None, :] < positions[:, :, None]
  if noisy is not None:
    earlier &= ~noisy[:, None, :]
  return earlier | jnp.eye(positions.shape[1], dtype=bool)


def noncausal_attention(noisy: jax.Array) -> jax.Array:
  """Frame-level mask of the non-causal autoregressive baseline: the clean frames see each other,
  both ways, and a noisy frame sees them and itself; no frame sees another's noisy one.

  noisy: bool [B, F] frames being made. Returns bool [B, F, F], `[b, q, k]` True where query frame q
  may attend to key k. Hidden from the clean frames, the frame being made cannot change their
  outputs, the end-of-video logit of the last clean one included.
  """
  return ~noisy[:, None, :] | jnp.eye(noisy.shape[1], dtype=bool)


def window_attention(positions: jax.Array, window: int) -> jax.Array:
  """Frame-level band mask bool [B, F, F]: frames at most `window` positions apart see each other."""
  return jnp.abs(positions[:, None, :] - positions[:, :, None]) <= window


@flax.struct.dataclass
class KVCache:
  """What a call of the DiT on a few frames attends to besides them: the keys and values of frames
  an earlier call computed (`DiT.__call__`'s `return_kv`, `past`).

  keys, values: one [B, S, H, D_head] per block (S = frames x tokens; keys after their QK-norm and
  rotary embedding); positions: int [B, F] those frames' slots.
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  positions: jax.Array


class Attention(nn.Module):
  """Multi-head self-attention with QK normalisation, rotary embeddings and a frame-level mask,
  computed by the kernel `implementation` names (`attention_lib.IMPLEMENTATIONS`); also the keys
  and values, for a `KVCache`."""
  num_heads: int
  dtype: Any
  param_dtype: Any
  implementation: str = 'dense'
  block: int = 512  # Key block of the blockwise kernel, query and key block of splash, in tokens.

  @nn.compact
  def __call__(self, x: jax.Array, angles: jax.Array, mask: attention_lib.FrameMask,
               past: tuple[jax.Array, jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B, S, D], angles [B, S, D_head / 2] -> [B, S, D]; also the keys and values [B, S, H, D_head].

    With `past`, keys and values [B, S_past, H, D_head] and a token-level mask bool
    [B, 1, S, S_past + S] (the past keys first), the queries attend to the past and to themselves
    by dense attention, which suits the few frames such a call makes.
    """
    b, s, d = x.shape
    h, head_dim = self.num_heads, d // self.num_heads
    # Kernels are declared in their head layout (not through DenseGeneral, which initialises a
    # flattened kernel that its 4-axis partitioning cannot constrain under a mesh).
    qkv_kernel = self.param('qkv_kernel', nn.with_logical_partitioning(
        _fan_avg_uniform(in_axis=0, out_axis=(1, 2, 3)), ('embed', None, 'heads', 'kv')),
        (d, 3, h, head_dim), self.param_dtype)
    qkv_bias = self.param('qkv_bias', nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, 'heads', 'kv')), (3, h, head_dim), self.param_dtype)
    qkv = jnp.einsum('bsd,dthk->bsthk', x.astype(self.dtype), qkv_kernel.astype(self.dtype))
    qkv = qkv + qkv_bias.astype(self.dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='q_norm')(q)
    k = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='k_norm')(k)
    q, k = apply_rotary(q, angles), apply_rotary(k, angles)
    q, k, v = _constrain_heads(q), _constrain_heads(k), _constrain_heads(v)
    if past is None:
      out = attention_lib.attend(q, k, v, mask, implementation=self.implementation,
                                 block=self.block)
    else:
      past_k, past_v, token_mask = past
      out = jax.nn.dot_product_attention(q, jnp.concatenate([past_k, k], axis=1),
                                         jnp.concatenate([past_v, v], axis=1), mask=token_mask)
    out = _constrain_heads(out)
    out_kernel = self.param('out_kernel', nn.with_logical_partitioning(
        _fan_avg_uniform(in_axis=(0, 1), out_axis=2), ('heads', 'kv', 'embed')),
        (h, head_dim, d), self.param_dtype)
    out_bias = self.param('out_bias', nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ('embed',)), (d,), self.param_dtype)
    out = jnp.einsum('bshk,hkd->bsd', out, out_kernel.astype(self.dtype))
    return out + out_bias.astype(self.dtype), (k, v)


class Block(nn.Module):
  """A DiT block with adaLN-Zero modulation computed per frame.

  With `grid` (the patch grid's rows and columns) the MLP's hidden layer also mixes each patch with
  its 3x3 neighbours on the grid (a depthwise convolution, as in SegFormer's Mix-FFN); the rate
  token, last in each frame, is left out of it.
  """
  num_heads: int
  mlp_ratio: float
  dtype: Any
  param_dtype: Any
  grid: tuple[int, int] | None = None
  attention: str = 'dense'  # The attention kernel (`attention_lib.IMPLEMENTATIONS`).
  attention_block: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, angles: jax.Array,
               mask: attention_lib.FrameMask, past: tuple | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B, F, T, D] tokens of F frames, cond [B, F, D] -> [B, F, T, D], and the attention's keys
    and values (`Attention`, which takes `past`)."""
    b, f, t, d = x.shape
    mod = _dense(6 * d, ('embed', 'mlp'), 'adaln', self.dtype, self.param_dtype,
                 zero=True)(nn.silu(cond))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    norm = lambda name: nn.LayerNorm(use_bias=False, use_scale=False, dtype=self.dtype, name=name)

    h = _modulate(norm('norm1')(x), shift1, scale1).reshape(b, f * t, d)
    h, kv = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention,
                      self.attention_block, name='attn')(_constrain(h), angles, mask, past)
    x = x + gate1[:, :, None, :] * h.reshape(b, f, t, d)

    h = _modulate(norm('norm2')(x), shift2, scale2)
    h = _dense(int(d * self.mlp_ratio), ('embed', 'mlp'), 'mlp_in', self.dtype, self.param_dtype)(h)
    h = nn.with_logical_constraint(h, ('batch', None, None, 'mlp'))
    if self.grid is not None:
      h = h + self._local_mixing(h)
    h = _dense(d, ('mlp', 'embed'), 'mlp_out', self.dtype, self.param_dtype)(nn.gelu(h))
    return x + gate2[:, :, None, :] * h, kv

  def _local_mixing(self, h: jax.Array) -> jax.Array:
    """Depthwise 3x3 convolution of the patch tokens of h [B, F, T, M] over their grid."""
    b, f, t, m = h.shape
    rows, cols = self.grid
    patches = h[:, :, :-1].reshape(b * f, rows, cols, m)
    mixed = DepthwiseConv3x3(self.dtype, self.param_dtype, name='mlp_mix')(patches)
    return jnp.concatenate([mixed.reshape(b, f, t - 1, m), jnp.zeros_like(h[:, :, -1:])], axis=2)


class DepthwiseConv3x3(nn.Module):
  """A depthwise 3x3 'SAME' convolution with bias, as nine shifted multiply-adds.

  Same parameters as `nn.Conv(m, (3, 3), feature_group_count=m)`; XLA's grouped convolution is
  about 8x slower on CPU in the backward pass, while shifted adds fuse into one loop everywhere.
  """
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [N, rows, cols, M] -> [N, rows, cols, M]."""
    _, rows, cols, m = x.shape
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, 'mlp')), (3, 3, 1, m), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)),
                      (m,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = bias
    for i in range(3):
      for j in range(3):
        out = out + padded[:, i:i + rows, j:j + cols] * kernel[i, j, 0]
    return out


class DiT(nn.Module):
  """Flowception DiT: per-frame velocity and insertion log-rate of a padded frame sequence."""
  patch_size: int
  channels: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  rope_theta: float = 10_000.0
  attn_window: int = 0  # Frames attend only to frames at most this many positions away; 0: all.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'  # A key of `REMAT_POLICIES`.
  prediction: str = 'velocity'  # What the network outputs, a key of `PREDICTIONS`.
  local_mixing: bool = False  # The MLPs also mix neighbouring patches (`Block`).
  attention: str = 'dense'  # The attention kernel, a key of `attention_lib.IMPLEMENTATIONS`.
  attention_block: int = 512  # Key block of blockwise, query and key block of splash, in tokens.

  @nn.compact
  def __call__(self, frames: jax.Array, context: jax.Array, frame_times: jax.Array,
               positions: jax.Array, frame_mask: jax.Array,
               labels: jax.Array | None = None, frame_attention: jax.Array | None = None,
               past: KVCache | None = None, return_kv: bool = False) -> tuple[jax.Array, ...]:
    """Velocity and log-rate of every frame slot.

    Args:
      frames: [B, F, H, W, C] noisy frames (clean for done and context frames).
      context: [B, F, H, W, C] clean context frames, zeros in other slots.
      frame_times: [B, F] per-frame flow times in [0, 1].
      positions: int [B, F] slot indices of the compacted sequence.
      frame_mask: bool [B, F] real frames; padded slots are masked as keys.
      labels: int [B] class labels, or [B, F] one per frame (packed rows), `num_classes` meaning
        none; ignored if `num_classes == 0`.
      frame_attention: bool [B, F, F], True where query frame q may attend to key frame k (e.g.
        `causal_attention`); None lets every frame see every real frame. `attn_window` further
        restricts it. With `past` of F_past frames: bool [B, F, F_past + F], the past frames first
        (None: all of them).
      past: the keys and values of frames computed before (`return_kv`), which these frames also
        attend to: a sampler that makes a few frames at a time computes the others once.
      return_kv: also return the `KVCache` of these frames.

    Returns:
      velocity float32 [B, F, H, W, C] and log_rate float32 [B, F]; with `return_kv`, the
      `KVCache` too. With `prediction='data'` the network predicts the clean frames and the
      velocity is the one they imply (`PREDICTIONS`).
    """
    b, f, hgt, wid, c = frames.shape
    p, d = self.patch_size, self.hidden_size
    chex.assert_shape([frames, context], (b, f, hgt, wid, self.channels))
    chex.assert_shape([frame_times, positions, frame_mask], (b, f))
    if hgt % p or wid % p:
      raise ValueError(f'frame size {hgt}x{wid} is not divisible by the patch size {p}; '
                       'set --config.model.patch_size to a divisor of both')
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by {self.num_heads} heads')
    gh, gw = hgt // p, wid // p

    # ---- Tokens: patches of [noisy | context] plus one rate token per frame (`token_grid`) -------
    x = jnp.concatenate([frames, context], axis=-1).astype(self.dtype)
    x = x.reshape(b, f, gh, p, gw, p, 2 * c).transpose(0, 1, 2, 4, 3, 5, 6)
    x = x.reshape(b, f, gh * gw, p * p * 2 * c)
    x = _dense(d, ('patch', 'embed'), 'patch_embed', self.dtype, self.param_dtype)(x)
    spatial = token_grid(gh, gw)
    tokens = len(spatial)
    if tokens > gh * gw:
      rate_token = self.param('rate_token', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('embed',)), (d,), self.param_dtype)
      x = jnp.concatenate(
          [x, jnp.broadcast_to(rate_token.astype(self.dtype), (b, f, 1, d))], axis=2)

    # ---- Per-frame conditioning: time (+ class) ---------------------------------------------------
    cond = _dense(d, ('mlp', 'embed'), 'time_in', self.dtype, self.param_dtype)(
        timestep_features(frame_times))
    cond = _dense(d, ('embed', 'mlp'), 'time_out', self.dtype, self.param_dtype)(nn.silu(cond))
    if self.num_classes:
      labels = jnp.full((b,), self.num_classes, jnp.int32) if labels is None else labels
      embed = nn.Embed(
          self.num_classes + 1, d, dtype=self.dtype, param_dtype=self.param_dtype, name='class_embed',
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      ('vocab', 'embed')))
      embedded = embed(labels)
      cond = cond + (embedded[:, None, :] if labels.ndim == 1 else embedded)

    cond = _constrain(cond)  # [B, F, D]; see the heads below for why.

    # ---- Rotary coordinates (slot, row, column) and the attention mask ---------------------------
    coords = jnp.concatenate([
        jnp.broadcast_to(positions[:, :, None, None], (b, f, tokens, 1)),
        jnp.broadcast_to(spatial, (b, f, tokens, 2))], axis=-1).reshape(b, f * tokens, 3)
    angles = rotary_angles(coords, d // self.num_heads, self.rope_theta)
    if past is None:
      if self.attn_window:
        band = window_attention(positions, self.attn_window)
        frame_attention = band if frame_attention is None else frame_attention & band
      mask = attention_lib.FrameMask(frame_mask, frame_attention, tokens)
      past_masks = [None] * self.depth
    else:
      past_masks = self._past_masks(past, positions, frame_mask, frame_attention, tokens)
      mask = None

    block = Block
    if self.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat])
    keys, values = [], []
    for i, past_mask in enumerate(past_masks):
      x, (k, v) = block(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype,
                        grid=(gh, gw) if self.local_mixing and tokens > gh * gw else None,
                        attention=self.attention,
                        attention_block=self.attention_block, name=f'block_{i}')(
                            x, cond, angles, mask, past_mask)
      keys.append(k)
      values.append(v)

    # ---- Heads: velocity from patch tokens, log-rate from the rate token -------------------------
    # Both heads read the tokens split over the batch only. Without this constraint (and the one
    # on `cond`) XLA's SPMD partitioner (checked with jax 0.10.2 on CPU) builds a wrong gradient of
    # `x` (and `cond`) from their several readers on a mesh whose data, fsdp and tensor axes all
    # exceed 1.
    x = nn.with_logical_constraint(x, ('batch', 'length', None, 'embed'))
    mod = _dense(2 * d, ('embed', 'mlp'), 'final_adaln', self.dtype, self.param_dtype,
                 zero=True)(nn.silu(cond))
    shift, scale = jnp.split(mod, 2, axis=-1)
    patches = nn.LayerNorm(use_bias=False, use_scale=False, dtype=self.dtype,
                           name='final_norm')(x[:, :, :gh * gw])
    patches = _dense(p * p * c, ('embed', 'patch'), 'velocity_out', self.dtype, self.param_dtype,
                     zero=True)(_modulate(patches, shift, scale))
    velocity = patches.reshape(b, f, gh, gw, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    velocity = velocity.reshape(b, f, hgt, wid, c).astype(jnp.float32)
    if self.prediction == 'data':
      velocity = velocity_of_data(velocity, frames, frame_times)

    r = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='rate_norm')(x[:, :, -1])
    r = _dense(d, ('embed', 'mlp'), 'rate_hidden', self.dtype, self.param_dtype)(r)
    log_rate = _dense(1, ('mlp', None), 'rate_out', self.dtype, self.param_dtype,
                      zero=True)(nn.silu(r))[..., 0]
    if return_kv:
      return velocity, log_rate.astype(jnp.float32), KVCache(tuple(keys), tuple(values), positions)
    return velocity, log_rate.astype(jnp.float32)

  def _past_masks(self, past: KVCache, positions: jax.Array, frame_mask: jax.Array,
                  frame_attention: jax.Array | None, tokens: int) -> list[tuple]:
    """Each block's `Attention` past: keys, values, token-level mask [B, 1, S, S_past + S]."""
    b, f = frame_mask.shape
    key_positions = jnp.concatenate([past.positions, positions], axis=1)
    chex.assert_shape(past.keys[0], (b, past.positions.shape[1] * tokens, None, None))
    allowed = jnp.ones((b, f, key_positions.shape[1]), bool)
    if frame_attention is not None:
      chex.assert_shape(frame_attention, allowed.shape)
      allowed = frame_attention
    if self.attn_window:
      allowed &= jnp.abs(key_positions[:, None, :] - positions[:, :, None]) <= self.attn_window
    allowed &= jnp.concatenate([jnp.ones_like(past.positions, bool), frame_mask], axis=1)[:, None]
    token_mask = jnp.repeat(jnp.repeat(allowed, tokens, axis=1), tokens, axis=2)[:, None]
    return [(k, v, token_mask) for k, v in zip(past.keys, past.values)]


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(model_config, *, channels: int, num_classes: int) -> DiT:
  """The DiT named by `model_config.size`, for frames with `channels` channels."""
  if model_config.size not in MODEL_SIZES:
    raise ValueError(f'unknown model size {model_config.size!r}; set --config.model.size to one of '
                     f'{sorted(MODEL_SIZES)}')
  if model_config.dtype not in _DTYPES:
    raise ValueError(f'unknown activation dtype {model_config.dtype!r}; set --config.model.dtype '
                     f'to one of {sorted(_DTYPES)}')
  attn_window = model_config.get('attn_window', 0)
  if attn_window < 0:
    raise ValueError(f'attn_window must be >= 0 (0: unrestricted), got {attn_window}; set '
                     '--config.model.attn_window')
  # Configs saved before these fields existed mean the defaults.
  param_dtype = model_config.get('param_dtype', 'float32')
  remat = model_config.get('remat', 'none')
  if param_dtype not in _DTYPES:
    raise ValueError(f'unknown parameter dtype {param_dtype!r}; set --config.model.param_dtype '
                     f'to one of {sorted(_DTYPES)}')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {remat!r}; set --config.model.remat to one of '
                     f'{sorted(REMAT_POLICIES)}')
  implementation = model_config.get('attention', 'dense')
  if implementation not in attention_lib.IMPLEMENTATIONS:
    raise ValueError(f'unknown attention {implementation!r}; set --config.model.attention to one '
                     f'of {", ".join(attention_lib.IMPLEMENTATIONS)}')
  if implementation == 'cudnn' and (jax.default_backend() != 'gpu'
                                   or model_config.dtype != 'bfloat16'):
    raise ValueError(f'--config.model.attention=cudnn needs a GPU and bfloat16 activations, and '
                     f'this run has {jax.default_backend()} and {model_config.dtype}; set '
                     '--config.model.dtype=bfloat16 on a GPU, or use dense or blockwise')
  if implementation == 'splash' and attn_window:
    raise ValueError('--config.model.attention=splash takes no frame-level mask, and '
                     '--config.model.attn_window makes one; use dense or blockwise')
  prediction = model_config.get('prediction', 'velocity')
  if prediction not in PREDICTIONS:
    raise ValueError(f'unknown prediction target {prediction!r}; set --config.model.prediction '
                     f'to one of {", ".join(PREDICTIONS)}')
  hidden, depth, heads = MODEL_SIZES[model_config.size]
  return DiT(patch_size=model_config.patch_size, channels=channels, hidden_size=hidden, depth=depth,
             num_heads=heads, mlp_ratio=model_config.mlp_ratio, num_classes=num_classes,
             attn_window=attn_window, dtype=_DTYPES[model_config.dtype],
             param_dtype=_DTYPES[param_dtype], remat=remat, prediction=prediction,
             local_mixing=model_config.get('local_mixing', False), attention=implementation,
             attention_block=model_config.get('attention_block', 512))


def init_inputs(frame_shape: tuple[int, int, int], frames: int, num_classes: int) -> tuple:
  """Zero arguments of `DiT.__call__` for one video of `frames` slots, to initialise or trace."""
  shape = (1, frames)
  labels = jnp.zeros((1,), jnp.int32) if num_classes else None
  return (jnp.zeros(shape + tuple(frame_shape), jnp.float32),
          jnp.zeros(shape + tuple(frame_shape), jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.broadcast_to(jnp.arange(frames, dtype=jnp.int32), shape), jnp.ones(shape, bool),
          labels)


def build_for(config, info) -> DiT:
  """The DiT of `config.model` for the frames and classes of `info` (a `datasets.SourceInfo`)."""
  return build_model(config.model, channels=info.frame_shape[-1], num_classes=info.num_classes)


def init_params(model: DiT, info, frames: int, key: jax.Array):
  """Fresh boxed (logically partitioned) parameters of `model`, traced on `frames` slots."""
  return model.init(key, *init_inputs(info.frame_shape, frames, info.num_classes))['params']
