"""The Flowception process maths: insertion schedulers, extended time, targets and losses.

Conventions: flow time `t = 0` is noise and `t = 1` is data, `x_t = t x1 + (1 - t) x0`, target velocity
`x1 - x0`. Every frame has its own time. A frame with delay `u_i` is inserted when the global extended
time `tau_g` passes `u_i` and is clean one unit later.

The training-side sampler (`sample_extended_time`, `compact`, `insertion_targets`) works on one example
in NumPy because it runs on the host inside the input pipeline, where each example is compacted to its
own length before bucketing. The schedulers and SNR shift accept NumPy or JAX arrays; the losses and
the insertion hazard are JAX, used inside jit.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Poisson NLL: log-rates are clipped here before `exp` so that a large logit cannot overflow.
MAX_LOG_RATE = 11.0


def _xp(x):
  """The array namespace of `x`: jnp for JAX arrays and tracers, np otherwise."""
  return jnp if isinstance(x, jax.Array) else np


@dataclasses.dataclass(frozen=True)
class Kappa:
  """An insertion scheduler: `kappa(t)` is the probability that a frame is inserted by global time t.

  Monotone on [0, 1] with kappa(0) = 0 and kappa(1) = 1; `inverse` maps a uniform draw to a delay.
  """
  name: str
  fn: Callable
  derivative: Callable
  inverse: Callable


def _linear():
  return Kappa('linear', lambda t: t, lambda t: t * 0 + 1.0, lambda u: u)


def _cubic():
  return Kappa('cubic', lambda t: t**3, lambda t: 3 * t**2, lambda u: u ** (1.0 / 3.0))


def _cosine():
  def fn(t):
    return 1 - _xp(t).cos(np.pi * t / 2)

  def derivative(t):
    return np.pi / 2 * _xp(t).sin(np.pi * t / 2)

  def inverse(u):
    xp = _xp(u)
    return 2 / np.pi * xp.arccos(xp.clip(1 - u, -1.0, 1.0))

  return Kappa('cosine', fn, derivative, inverse)


KAPPAS = {'linear': _linear, 'cubic': _cubic, 'cosine': _cosine}


def get_kappa(name: str) -> Kappa:
  """The insertion scheduler called `name` (one of `KAPPAS`)."""
  if name not in KAPPAS:
    raise ValueError(f'unknown kappa {name!r}; known: {", ".join(KAPPAS)}; set --config.flow.kappa')
  return KAPPAS[name]()


def snr_shift(t, shift: float):
  """Shifts denoising time towards noise: `t / (t + s (1 - t))`; identity for `shift == 1`."""
  if shift == 1.0:
    return t
  return t / (t + shift * (1 - t))


def insertion_probability_mass(kappa: Kappa, t_global, step):
  """Expected insertions per unit rate in [t_g, t_g + step]: `(k(t+h) - k(t)) / (1 - k(t))`.

  This is the exact integral of the scheduler's hazard `k'(t) / (1 - k(t))`; multiplied by a
  predicted rate `lambda_i` it gives the Poisson mean of insertions in gap i during the step.
  """
  t_next = jnp.minimum(t_global + step, 1.0)
  k_now = kappa.fn(t_global)
  remaining = jnp.maximum(1.0 - k_now, 1e-6)
  return jnp.clip((kappa.fn(t_next) - k_now) / remaining, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ExtendedTime:
  """One training example's extended-time state, over its `N` valid frames (uncompacted).

  delays: float32 [N], 0 for start and context frames.
  tau: float32 [N], per-frame extended time `tau_g - delays` (context frames are pinned to >= 1).
  tau_global: float32 scalar.
  """
  delays: np.ndarray
  tau: np.ndarray
  tau_global: float

  @property
  def visible(self) -> np.ndarray:
    """bool [N]: inserted frames (in flow or done)."""
    return self.tau >= 0

  @property
  def in_flow(self) -> np.ndarray:
    """bool [N]: visible frames still being denoised."""
    return (self.tau >= 0) & (self.tau < 1)

  @property
  def times(self) -> np.ndarray:
    """float32 [N]: per-frame flow time `clip(tau, 0, 1)`."""
    return np.clip(self.tau, 0.0, 1.0).astype(np.float32)


def sample_global_ratio(rng: np.random.Generator, distribution: str, size: int | None = None, *,
                        loc: float = 0.0, scale: float = 1.0):
  """Draws `r` in (0, 1), with `tau_g = r * tau_max`: 'uniform', or 'logit_normal' (`r =
  sigmoid(z)`, `z ~ N(loc, scale^2)`).

  Returns a float, or float32 [size] independent draws if `size` is given.
  """
  if distribution == 'uniform':
    r = rng.uniform(size=size)
  elif distribution == 'logit_normal':
    r = 1.0 / (1.0 + np.exp(-(loc + scale * rng.normal(size=size))))
  else:
    raise ValueError(f'unknown tau distribution {distribution!r}; known: uniform, logit_normal; '
                     'set --config.flow.tau_distribution')
  return float(r) if size is None else r.astype(np.float32)


def sample_extended_time(rng: np.random.Generator, num_frames: int, *, kappa: Kappa,
                         num_start_frames: int, tau_distribution: str = 'uniform',
                         tau_loc: float = 0.0, tau_scale: float = 1.0,
                         context: np.ndarray | None = None, passive: np.ndarray | None = None,
                         max_tries: int = 8) -> ExtendedTime:
  """Samples start frames, delays and a global time for one video of `num_frames` frames.

  Frame 0 and `num_start_frames - 1` other random frames start at delay 0; every other frame gets
  `kappa^-1(U)`. The global time ratio follows `tau_distribution` (`sample_global_ratio`, with
  `tau_loc` and `tau_scale`). `context` (bool [N]) marks clean conditioning frames: delay 0 and done
  from the start. With context, the start frames are `num_start_frames` non-context frames (frame 0
  first if it is not context), as the sampler starts from noise frames plus the context; `passive`
  (bool [N], context frames that never insert) also makes the frame right after each passive one a
  start frame, since no insertion can reach it.
  If no frame is in flow the global time is redrawn (at most `max_tries` times); after that the most
  recently inserted non-context frame (or, if none is visible, the next one to be inserted) is put
  in flow at time 0, so every example trains the velocity.
  """
  n = num_frames
  context = np.zeros(n, bool) if context is None else np.asarray(context, bool)
  passive = np.zeros(n, bool) if passive is None else np.asarray(passive, bool) & context
  delays = kappa.inverse(rng.uniform(size=n)).astype(np.float32)
  starts = np.zeros(n, bool)
  starts[0] = not context[0]
  others = np.flatnonzero(~context & ~starts)
  extra = min(num_start_frames - int(starts[0]), others.size)
  if extra > 0:
    starts[rng.choice(others, size=extra, replace=False)] = True
  starts[1:] |= passive[:-1]
  delays[starts | context] = 0.0
  tau_max = float(delays.max()) + 1.0
  flowing = ~context
  tau = -delays  # Before any draw only the start frames are visible.
  for _ in range(max_tries):
    tau_global = sample_global_ratio(rng, tau_distribution, loc=tau_loc, scale=tau_scale) * tau_max
    tau = tau_global - delays
    if np.any((tau >= 0) & (tau < 1) & flowing) or not flowing.any():
      break
  else:
    # Pin the global time so that a non-context frame has just entered the flow: the last one
    # inserted, or the first one to be inserted if none is visible yet.
    seen = flowing & (tau >= 0)
    if seen.any():
      tau_global = float(delays[seen].max())
    else:
      tau_global = float(delays[flowing].min()) if flowing.any() else 0.0
    tau = tau_global - delays
  tau = np.where(context, np.maximum(tau, 1.0), tau).astype(np.float32)
  return ExtendedTime(delays=delays, tau=tau, tau_global=float(tau_global))


def insertion_targets(visible: np.ndarray) -> np.ndarray:
  """For each frame, the number of invisible frames after it up to the next visible frame.

  visible: bool [N] over the valid frames of one video. Returns int32 [N]; entries of invisible frames
  are 0. The last visible frame counts every invisible frame after it.
  """
  visible = np.asarray(visible, bool)
  # Each invisible frame belongs to the gap of the last visible frame before it.
  owner = np.maximum.accumulate(np.where(visible, np.arange(visible.size), -1))
  counts = np.bincount(owner[(~visible) & (owner >= 0)], minlength=visible.size)
  return np.where(visible, counts, 0).astype(np.int32)


def compact(visible: np.ndarray, capacity: int) -> np.ndarray:
  """Gather indices that move the visible frames to the front, keeping their order.

  visible: bool [N]. Returns int32 [capacity]: slot s holds original frame `index[s]` for
  `s < visible.sum()`; the remaining slots repeat index 0 and must be masked out.
  """
  order = np.flatnonzero(visible)
  if order.size > capacity:
    raise ValueError(f'{order.size} visible frames do not fit in {capacity} slots')
  return np.pad(order, (0, capacity - order.size)).astype(np.int32)


LOSS_NORMALISATIONS = ('clip', 'frame')


def masked_mean(values, mask, segment_ids=None):
  """Mean of `values` [B, F] over the frames in `mask` bool [B, F]; 0 when the mask is empty.

  With `segment_ids` int [B, F] (the clip of each slot, 1.. per row, 0 for padding; see
  `input_pipeline.py`) each clip's frames are averaged first, then the clips that have any: every
  clip weighs the same, whatever its phase or how many frames it shows. Without, every frame weighs
  the same. Reduced in float32.
  """
  values = values.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  if segment_ids is None:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  counts = _clip_sums(mask, segment_ids)
  present = (counts > 0).astype(jnp.float32)
  per_clip = _clip_sums(values * mask, segment_ids) / jnp.maximum(counts, 1.0)
  return jnp.sum(per_clip * present) / jnp.maximum(jnp.sum(present), 1.0)


def mean_count(mask, segment_ids=None):
  """How many terms `masked_mean` averages: frames in `mask`, or clips with any (float32 scalar)."""
  mask = mask.astype(jnp.float32)
  if segment_ids is None:
    return jnp.sum(mask)
  return jnp.sum(_clip_sums(mask, segment_ids) > 0).astype(jnp.float32)


def _clip_sums(values, segment_ids):
  """Sums of `values` [B, F] over each row's segments: [B, F + 1], column s for segment id s."""
  clips = jax.nn.one_hot(segment_ids, segment_ids.shape[1] + 1, dtype=jnp.float32)
  return jnp.einsum('bf,bfs->bs', values, clips)


def velocity_loss(velocity, target, mask, weight=None, segment_ids=None):
  """Mean squared error over the elements of frames in `mask`, each frame weighed by `weight`.

  velocity, target: [B, F, H, W, C]; mask: bool [B, F] (frames in flow, not context, not padding);
  weight: float [B, F] or None (all 1), e.g. `time_weight` of the frames' times. The sum is divided
  by the number of masked frames, not by the weights, so weights of mean 1 keep the loss's scale.
  segment_ids: int [B, F] or None, see `masked_mean`. Returns a float32 scalar; 0 when the mask is
  empty.
  """
  per_frame = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32)),
                       axis=(2, 3, 4))
  if weight is not None:
    per_frame = per_frame * weight.astype(jnp.float32)
  return masked_mean(per_frame, mask, segment_ids)


TIME_WEIGHTINGS = ('uniform', 'logit_normal')


def time_weight(t, weighting: str, loc: float = 0.0, scale: float = 1.0):
  """Weight of a frame's velocity loss at its (model) time `t` in [0, 1], any shape.

  'uniform' is 1. 'logit_normal' is the density of `sigmoid(N(loc, scale^2))` at `t`: it stresses
  the times that density favours as if frames were drawn there, while the states the model trains
  on keep the law the sampler visits; its mean over uniform times is 1.
  """
  if weighting == 'uniform':
    return jnp.ones_like(t)
  if weighting == 'logit_normal':
    t = jnp.clip(t, 1e-6, 1 - 1e-6)
    z = (jnp.log(t) - jnp.log1p(-t) - loc) / scale
    return jnp.exp(-0.5 * z**2) / (scale * np.sqrt(2 * np.pi) * t * (1 - t))
  raise ValueError(f'unknown velocity weighting {weighting!r}; known: '
                   f'{", ".join(TIME_WEIGHTINGS)}; set --config.flow.velocity_weighting')


def rate_loss(log_rate, targets, mask, segment_ids=None):
  """Poisson negative log-likelihood of the insertion counts, averaged over frames in `mask`.

  log_rate: [B, F] predicted log-rates; targets: int [B, F] insertion counts; mask: bool [B, F]
  (visible frames that may insert); segment_ids: see `masked_mean`. Its minimiser is
  `lambda = E[k]`.
  """
  rate = jnp.exp(jnp.minimum(log_rate.astype(jnp.float32), MAX_LOG_RATE))
  nll = rate - targets.astype(jnp.float32) * jnp.log(rate + 1e-8)
  return masked_mean(nll, mask, segment_ids)
