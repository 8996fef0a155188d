"""Test setup that must run before JAX or Grain is imported.

XLA only reads `--xla_force_host_platform_device_count` when the CPU backend starts, so it is set
here, first, to give the tests two fake CPU devices on which the sharding paths actually split data.
Grain's multiprocessing and other absl-using code read absl flags, which are only parsed inside
`app.run`; the flags are parsed here so that such code also works under pytest. The fake object
store (`fake_gcs.py`, fixture `fake_gcs`) is imported before any test imports TensorFlow, whose GCS
filesystem reads its cache settings when it starts.
"""

import os

_DEVICE_FLAG = '--xla_force_host_platform_device_count=2'
if _DEVICE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_DEVICE_FLAG}'.strip()

from absl import flags  # pylint: disable=g-import-not-at-top

from tests.fake_gcs import fake_gcs, fake_gcs_server  # pylint: disable=g-import-not-at-top,unused-import

if not flags.FLAGS.is_parsed():
  flags.FLAGS(['pytest'])
