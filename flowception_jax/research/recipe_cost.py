"""What the extended-time recipe costs: visible frames and attention against the full sequence.

For every insertion scheduler (`flowception.KAPPAS`) and global-time law, the expected number of
visible frames of a training clip and its square (attention grows with it), two ways: by numerical
integration (`expected_visible`) and as the pipeline's own transform draws them (`recipe_study`).
The benchmark (`bench.py`) reports both.
"""

import numpy as np

from flowception_jax.core import context as context_lib
from flowception_jax.core import flowception
from flowception_jax.training import input_pipeline

TAU_DISTRIBUTIONS = ('uniform', 'logit_normal')


def _ratio_density(distribution: str, r: np.ndarray, loc: float, scale: float) -> np.ndarray:
  """Density of the global-time ratio `r` in (0, 1) (`flowception.sample_global_ratio`)."""
  if distribution == 'uniform':
    return np.ones_like(r)
  z = (np.log(r) - np.log1p(-r) - loc) / scale
  return np.exp(-0.5 * z**2) / (scale * np.sqrt(2 * np.pi) * r * (1 - r))


def expected_visible(kappa: flowception.Kappa, distribution: str, num_frames: int,
                     num_start_frames: int, loc: float = 0.0, scale: float = 1.0,
                     grid: int = 2000) -> tuple[float, float]:
  """(E[V], E[V^2]) of the visible frame count V of a clip of `num_frames`, by integration.

  The `n = N - s` non-start delays are i.i.d. with CDF `kappa`; their maximum `m` has density
  `n kappa(m)^(n-1) kappa'(m)`, and `tau_g = r (m + 1)` with `r` of the global-time law. If
  `tau_g >= m` every frame is visible; otherwise the latest frame is not, and each of the other
  `n - 1` (i.i.d. below `m`) is with probability `kappa(tau_g) / kappa(m)`: a Binomial. Both
  variables are integrated by the midpoint rule on `grid` points. Leaves out the redraw of global
  times that put no frame in flow (rare: tests/test_bench.py bounds the difference).
  """
  s = min(num_start_frames, num_frames)
  n = num_frames - s
  if n == 0:
    return float(s), float(s * s)
  m = r = (np.arange(grid) + 0.5) / grid
  m_weight = n * kappa.fn(m) ** (n - 1) * kappa.derivative(m)
  r_weight = _ratio_density(distribution, r, loc, scale)
  y = r[None, :] * (m[:, None] + 1)
  all_in = y >= m[:, None]
  p = np.where(all_in, 1.0, kappa.fn(np.minimum(y, 1.0)) / kappa.fn(m)[:, None])
  mean_k = np.where(all_in, n, (n - 1) * p)  # Below the maximum: the Binomial's moments.
  second_k = np.where(all_in, n * n, (n - 1) * p * (1 - p) + ((n - 1) * p) ** 2)
  weight = m_weight[:, None] * r_weight[None, :]
  weight = weight / weight.sum()  # Normalised on the grid: the densities' quadrature error.
  e_k, e_k2 = float((weight * mean_k).sum()), float((weight * second_k).sum())
  return s + e_k, s * s + 2 * s * e_k + e_k2


def recipe_study(config, source, info, num_examples: int) -> dict[str, dict[str, float]]:
  """Visible fraction and attention-cost ratio of every (kappa, global-time law), two ways.

  `analytic`: `expected_visible` averaged over the source's clip lengths; `pipeline`: drawn by the
  pipeline's own transform (`input_pipeline.ExtendedTimeTransform`, no context frames) on
  `num_examples` clips of the source. Fractions are of frames (sum of visible over sum of clip
  frames); the attention ratio is sum V^2 over sum N^2 (quadratic cost, unpadded); `padded_*`
  compare the bucket sizes with those of the full clips.
  """
  clips = [source[i] for i in range(num_examples)]
  lengths = np.bincount([np.asarray(c['video']).shape[0] for c in clips],
                        minlength=info.max_frames + 1)
  buckets = input_pipeline.check_buckets(config.data.buckets, info.max_frames)
  loc, scale = config.flow.tau_loc, config.flow.tau_scale
  rng = np.random.default_rng(config.seed)
  study = {}
  for kappa_name in flowception.KAPPAS:
    kappa = flowception.get_kappa(kappa_name)
    for distribution in TAU_DISTRIBUTIONS:
      moments = {n: expected_visible(kappa, distribution, n, config.flow.num_start_frames, loc,
                                     scale) for n in np.flatnonzero(lengths)}
      frames = sum(lengths[n] * n for n in moments)
      squares = sum(lengths[n] * n * n for n in moments)
      full = np.array([input_pipeline.bucket_for(n, buckets) for n in moments])
      weights = np.array([lengths[n] for n in moments])
      transform = input_pipeline.ExtendedTimeTransform(
          kappa=kappa_name, num_start_frames=config.flow.num_start_frames,
          tau_distribution=distribution, buckets=buckets, tau_loc=loc, tau_scale=scale,
          pixels=info.pixels, context=context_lib.ContextPatterns())
      visible, padded = [], []
      for clip in clips:
        example = transform.random_map(clip, rng)
        visible.append(int(example['frame_mask'].sum()))
        padded.append(example['frame_mask'].shape[0])
      visible, padded = np.array(visible), np.array(padded)
      study[f'{kappa_name}/{distribution}'] = {
          'analytic_visible_fraction': sum(lengths[n] * v for n, (v, _) in moments.items())
                                       / frames,
          'analytic_attention_ratio': sum(lengths[n] * v2 for n, (_, v2) in moments.items())
                                      / squares,
          'pipeline_visible_fraction': float(visible.sum() / frames),
          'pipeline_attention_ratio': float((visible**2).sum() / squares),
          'pipeline_padded_fraction': float(padded.sum() / (weights * full).sum()),
          'pipeline_padded_attention_ratio': float((padded**2).sum() / (weights * full**2).sum()),
      }
  return study
