"""Counts XLA compilations per jitted function, through JAX's public monitoring events.

For jitted functions a test does not own (the trainer's step, module-level jits); where a test owns
the traced function it wraps it with `chex.assert_max_traces` instead.
"""

import collections
import contextlib

import jax

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def counted():
  """Yields a Counter of the compilations made in the block, by function name ('train_step' for a
  `jax.jit(train_step)`, which JAX reports as 'jit(train_step)')."""
  counts = collections.Counter()

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == _BACKEND_COMPILE:
      name = kwargs['fun_name']
      counts[name[len('jit('):-1] if name.startswith('jit(') else name] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
