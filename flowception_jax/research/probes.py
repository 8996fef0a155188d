r"""Diagnostics of a trained DiT: do its patches see each other, does position matter, where does
its attention go?

  python -m flowception_jax.research.probes --workdir=/tmp/shapes --num_clips=8 --frames=6

A model that denoises each patch on its own (attention as a mean pool) shows it here before its
samples do: noise in one patch barely moves the others (`patch_influence`), scrambling a frame's
patches barely changes the velocity or its error (`position_sensitivity`), and each block's
attention is close to uniform, with a patch paying its grid neighbours no more than their share
(`attention_stats`). Every probe feeds data clips at one flow time `t` to `model.apply`, all frames
real and in flow, slots at their indices. Prints one JSON object.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax import datasets


def data_clips(data_config, num_clips: int, frames: int) -> np.ndarray:
  """float32 [B, F, H, W, C] in [-1, 1]: the first `frames` frames of the first `num_clips`
  records of at least that many frames (a procedural or prepared pixel source)."""
  source, info = datasets.make_source(data_config)
  if not info.pixels:
    raise ValueError('probes read pixel clips; this model was trained on latents')
  if frames > info.max_frames:
    raise ValueError(f'the data has no clips of {frames} frames (at most {info.max_frames}); '
                     'lower --frames')
  clips = []
  for index in range(len(source)):
    video = np.asarray(source[index]['video'], np.float32)
    if video.shape[0] >= frames:
      clips.append(video[:frames] * 2.0 - 1.0)
    if len(clips) == num_clips:
      return np.stack(clips)
  raise ValueError(f'the data has fewer than {num_clips} clips of {frames} frames; lower '
                   '--num_clips or --frames')


def _apply(model: model_lib.DiT, params, x_t: jax.Array, t: float, **kwargs):
  b, f = x_t.shape[:2]
  return model.apply({'params': params}, x_t, jnp.zeros_like(x_t), jnp.full((b, f), t, jnp.float32),
                     jnp.broadcast_to(jnp.arange(f), (b, f)), jnp.ones((b, f), bool), **kwargs)


def _noisy(clips: np.ndarray, t: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(x_t, x0) of clips at flow time t."""
  x0 = np.random.default_rng(seed).standard_normal(clips.shape).astype(np.float32)
  return (t * clips + (1 - t) * x0).astype(np.float32), x0


def patch_influence(model: model_lib.DiT, params, clips: np.ndarray, t: float,
                    seed: int = 0) -> dict[str, float]:
  """Mean |change of velocity| when frame 0's top-left patch is replaced by noise: in that patch,
  in the other patches of frame 0, and in the other frames."""
  p = model.patch_size
  x_t, _ = _noisy(clips, t, seed)
  changed = x_t.copy()
  changed[:, 0, :p, :p] = np.random.default_rng(seed + 1).standard_normal(
      changed[:, 0, :p, :p].shape)
  delta = np.abs(np.asarray(_apply(model, params, changed, t)[0])
                 - np.asarray(_apply(model, params, x_t, t)[0]))
  outside = np.ones(delta.shape[2:4], bool)
  outside[:p, :p] = False
  return {'own_patch': float(delta[:, 0, :p, :p].mean()),
          'other_patches': float(delta[:, 0][:, outside].mean()),
          'other_frames': float(delta[:, 1:].mean()) if delta.shape[1] > 1 else 0.0}


def position_sensitivity(model: model_lib.DiT, params, clips: np.ndarray, t: float,
                         seed: int = 0) -> dict[str, float]:
  """What scrambling every frame's patches (one permutation) does.

  output_change: the velocity of the scrambled input, unscrambled, against the real input's, over
  the mean |velocity|: 0 for a model blind to position. mse_real, mse_scrambled: velocity error on
  real clips and on scrambled ones (whose patches make no shapes): equal for a model that does not
  use the arrangement of patches.
  """
  b, f, h, w, c = clips.shape
  p = model.patch_size
  gh, gw = h // p, w // p
  perm = np.random.default_rng(seed).permutation(gh * gw)
  to_patches = lambda x: x.reshape(b, f, gh, p, gw, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(
      b, f, gh * gw, p, p, c)
  to_frames = lambda x: x.reshape(b, f, gh, gw, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(
      b, f, h, w, c)
  scramble = lambda x: to_frames(to_patches(x)[:, :, perm])
  unscramble = lambda x: to_frames(to_patches(x)[:, :, np.argsort(perm)])
  x_t, x0 = _noisy(clips, t, seed)
  v = np.asarray(_apply(model, params, x_t, t)[0])
  v_scrambled = np.asarray(_apply(model, params, scramble(x_t), t)[0])
  return {'output_change': float(np.abs(unscramble(v_scrambled) - v).mean() / np.abs(v).mean()),
          'mse_real': float(np.mean((v - (clips - x0))**2)),
          'mse_scrambled': float(np.mean((v_scrambled - scramble(clips - x0))**2))}


def attention_stats(model: model_lib.DiT, params, clips: np.ndarray, t: float,
                    seed: int = 0) -> list[dict[str, float]]:
  """Per block, from its queries and keys (captured after QK normalisation, rotated here):

  entropy and uniform_entropy (nats, over all tokens); own_frame and uniform_own_frame (share of a
  token's attention on its own frame's tokens); neighbours and uniform_neighbours (share of a patch
  token's attention on the patches of its 3x3 grid neighbourhood in its frame, itself excluded);
  max_weight (mean largest weight); logit_std.
  """
  b, f, h, w, _ = clips.shape
  p, heads = model.patch_size, model.num_heads
  gh, gw = h // p, w // p
  spatial = model_lib.token_grid(gh, gw)
  tokens = len(spatial)
  x_t, _ = _noisy(clips, t, seed)
  _, state = _apply(model, params, x_t, t, capture_intermediates=True, mutable=['intermediates'])
  coords = np.concatenate([np.broadcast_to(np.arange(f)[:, None, None], (f, tokens, 1)),
                           np.broadcast_to(spatial, (f, tokens, 2))], -1).reshape(1, f * tokens, 3)
  angles = model_lib.rotary_angles(jnp.asarray(coords), model.hidden_size // heads,
                                   model.rope_theta)
  frame = np.repeat(np.arange(f), tokens)
  same_frame = frame[:, None] == frame[None, :]
  is_patch = np.tile(np.arange(tokens) < gh * gw, f)
  cell = np.tile(np.where(np.arange(tokens)[:, None] < gh * gw, spatial, -9), (f, 1))
  near = (np.abs(cell[:, None] - cell[None, :]).max(-1) == 1) & same_frame
  near &= is_patch[:, None] & is_patch[None, :]
  stats = []
  blocks = state['intermediates']
  for i in range(model.depth):
    attn = blocks[f'block_{i}']['attn']
    q = model_lib.apply_rotary(attn['q_norm']['__call__'][0], angles)
    k = model_lib.apply_rotary(attn['k_norm']['__call__'][0], angles)
    logits = np.asarray(jnp.einsum('bqhd,bkhd->bhqk', q, k)) / np.sqrt(q.shape[-1])
    weights = np.asarray(jax.nn.softmax(logits, axis=-1))
    patch_rows = weights[:, :, is_patch]
    stats.append({
        'entropy': float(-(weights * np.log(weights + 1e-12)).sum(-1).mean()),
        'uniform_entropy': float(np.log(f * tokens)),
        'own_frame': float((weights * same_frame).sum(-1).mean()),
        'uniform_own_frame': 1.0 / f,
        'neighbours': float((patch_rows * near[is_patch]).sum(-1).mean()),
        'uniform_neighbours': float(near[is_patch].sum(-1).mean() / (f * tokens)),
        'max_weight': float(weights.max(-1).mean()),
        'logit_std': float(logits.std())})
  return stats


def probe(model: model_lib.DiT, params, clips: np.ndarray,
          times: tuple[float, ...] = (0.3, 0.6, 0.9)) -> dict:
  """Every probe at every time."""
  return {f't={t}': {'patch_influence': patch_influence(model, params, clips, t),
                     'position_sensitivity': position_sensitivity(model, params, clips, t),
                     'attention': attention_stats(model, params, clips, t)} for t in times}


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('num_clips', 8, 'Data clips probed.')
  flags.DEFINE_integer('frames', 6, 'Frames of each probed clip.')
  flags.DEFINE_list('times', ['0.3', '0.6', '0.9'], 'Flow times probed.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  trained = inference.load(args.workdir, step=args.step)
  clips = data_clips(trained.config.data, args.num_clips, args.frames)
  report = probe(trained.model, trained.params, clips, tuple(float(t) for t in args.times))
  print(json.dumps({'workdir': args.workdir, 'step': trained.step, **report}, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
