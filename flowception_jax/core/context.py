"""Context patterns: which frames of a training clip are given, so one model learns every task.

Each training clip draws one pattern with the probabilities of `config.context` (METHOD section 8):
  none       no context: unconditional (or class-conditional) generation.
  first      frame 0: image-to-video.
  prefix     frames 0..K-1, K uniform in [1, N - 1]: extension.
  keyframes  frames 0 and N - 1 plus up to `max_keyframes - 2` random frames between them, the last
             one passive: interpolation.
  random     each frame with a per-clip random probability, each of them passive with probability 1/2:
             any mix of given frames.
Context frames are clean, at `t = 1`, and out of the velocity loss; passive ones never insert, so
they are out of the rate loss too. A pattern always leaves a frame to generate: a clip too short
for its pattern is drawn without context.
"""

import dataclasses

import numpy as np

PATTERNS = ('none', 'first', 'prefix', 'keyframes', 'random')


@dataclasses.dataclass(frozen=True)
class ContextPatterns:
  """The per-clip law of context patterns.

  probabilities: one per entry of `PATTERNS`, summing to 1.
  max_keyframes: most key frames of the 'keyframes' pattern (at least 2: the first and last frame).
  """
  probabilities: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0)
  max_keyframes: int = 4

  def __post_init__(self):
    names = ', '.join(f'--config.context.p_{name}' for name in PATTERNS)
    p = np.asarray(self.probabilities, np.float64)
    if p.shape != (len(PATTERNS),) or np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
      raise ValueError(f'context pattern probabilities must be {len(PATTERNS)} non-negative numbers '
                       f'summing to 1, got {self.probabilities}; set {names}')
    if self.max_keyframes < 2:
      raise ValueError(f'interpolation needs at least 2 key frames, got max_keyframes='
                       f'{self.max_keyframes}; set --config.context.max_keyframes >= 2')

  def draw(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """One clip's context: (context bool [N], passive bool [N]), passive frames among context ones."""
    n = num_frames
    context = np.zeros(n, bool)
    passive = np.zeros(n, bool)
    p = np.asarray(self.probabilities, np.float64)
    pattern = PATTERNS[rng.choice(len(PATTERNS), p=p / p.sum())]
    if pattern == 'first' and n >= 2:
      context[0] = True
    elif pattern == 'prefix' and n >= 2:
      context[:rng.integers(1, n)] = True
    elif pattern == 'keyframes' and n >= 3:
      inner = rng.integers(0, min(self.max_keyframes - 2, n - 3) + 1)
      context[[0, n - 1]] = True
      context[1 + rng.choice(n - 2, size=inner, replace=False)] = True
      passive[n - 1] = True
    elif pattern == 'random' and n >= 2:
      context = rng.uniform(size=n) < rng.uniform()
      if context.all():
        context[rng.integers(n)] = False
      passive = context & (rng.uniform(size=n) < 0.5)
    return context, passive


def from_config(context_config) -> ContextPatterns:
  """The patterns of `config.context` (`p_<pattern>` for each of `PATTERNS`, `max_keyframes`)."""
  return ContextPatterns(
      probabilities=tuple(float(context_config[f'p_{name}']) for name in PATTERNS),
      max_keyframes=int(context_config.max_keyframes))
