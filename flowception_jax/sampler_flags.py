"""The sampler flags of the `sample` and `evaluate` commands: each overrides the trained config."""

from absl import flags

from flowception_jax.core import orders
from flowception_jax.core import sampler as sampler_lib


def define_flags() -> None:
  """Defines the flags (once per program, by the command that runs)."""
  flags.DEFINE_integer('num_steps', None, 'Flow steps per unit time (default: the config).')
  flags.DEFINE_enum('insertion', None, sampler_lib.INSERTION_MODES,
                    'Insertion law per gap and step (default: the config).')
  flags.DEFINE_float('guidance_scale', None, 'Velocity guidance (default: the config).')
  flags.DEFINE_float('rate_guidance', None, 'Rate guidance (default: the config).')
  flags.DEFINE_enum('order', None, orders.ORDERS,
                    'Insertion order: learned or prescribed (default: the config).')
  flags.DEFINE_enum('solver', None, sampler_lib.SOLVERS, 'Flow ODE step (default: the config).')
  flags.DEFINE_bool('staged', None, 'Sample in stages of growing capacity: the same videos for '
                    'less compute (default: the config; see core/staged_sampler.py).')


def overrides() -> dict:
  """The `config.sampler` fields the command line sets, with their values."""
  names = [f.name for f in flags.FLAGS.get_flags_for_module(__name__)]
  return {name: flags.FLAGS[name].value for name in names if flags.FLAGS[name].value is not None}
