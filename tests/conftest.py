"""Test setup that must run before JAX or Grain is imported.

XLA reads its flags when the CPU backend starts, so they are set here, first (and inherited by the
commands the tests run): two fake CPU devices, on which the sharding paths actually split data;
no LLVM optimisation of the compiled code, since the tests' small programs take longer to compile
than to run (a quarter less time for the suite; the numerics are XLA's either way); and XLA:CPU's
older fusion emitters, which compile them faster still (the fast subset, `-m "not e2e"`: 258 s with
the newer, 203 s with the older, on a quiet 2-core machine).
Grain's multiprocessing and other absl-using code read absl flags, which are only parsed inside
`app.run`; the flags are parsed here so that such code also works under pytest. The fake object
store (`fake_gcs.py`, fixture `fake_gcs`) is imported before any test imports TensorFlow, whose GCS
filesystem reads its cache settings when it starts.
"""

import importlib.metadata
import os

_TEST_FLAGS = {'--xla_force_host_platform_device_count': '2',
               '--xla_backend_optimization_level': '0'}
if importlib.metadata.version('jaxlib').startswith('0.10.'):  # XLA stops on a flag it lacks.
  _TEST_FLAGS['--xla_cpu_use_fusion_emitters'] = 'false'
for _flag, _value in _TEST_FLAGS.items():
  if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_flag}={_value}'.strip()

from absl import flags  # pylint: disable=g-import-not-at-top

from tests.fake_gcs import fake_gcs, fake_gcs_server  # pylint: disable=g-import-not-at-top,unused-import

if not flags.FLAGS.is_parsed():
  flags.FLAGS(['pytest'])
