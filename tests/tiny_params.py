"""Parameters of the tests' small models, and their calls, without compiling op by op.

Run op by op, initialising or applying a DiT compiles each of its operations separately. Here the
initialisation and the calls are each one compiled program, with the module a static argument, so
every test that makes the same module and shapes reuses them; the perturbation is drawn on the host,
which costs less than compiling a random draw per leaf.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def init(net: nn.Module, *inputs):
  """Unboxed `net.init(key(0), *inputs)`."""
  return nn.unbox(net.init(jax.random.key(0), *inputs))


def perturbed_init(net: nn.Module, *inputs, scale: float = 0.1, seed: int = 1):
  """`init(net, *inputs)`, each leaf plus `scale` times standard normal noise.

  adaLN-Zero starts every block as the identity and the heads at zero: the noise moves the weights
  off them, so that gates and heads carry signal.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
                            x.dtype), init(net, *inputs))


@functools.partial(jax.jit, static_argnums=0)
def apply(net: nn.Module, variables, *args, **kwargs):
  """`net.apply(variables, *args, **kwargs)`, compiled once per module and argument shapes."""
  return net.apply(variables, *args, **kwargs)
