"""Runs `python -m flowception_jax.main` and sends it SIGTERM at one chosen moment of one step.

  python tests/sigterm_at.py MOMENT STEP [flags of flowception_jax.main...]

The moments are the waits of the training loop, where a preemption's signal usually lands:
- `fetch`: inside the blocking fetch of step STEP's metrics;
- `samples`: inside the writing of step STEP's sample GIF;
- `checkpoint`: inside the asynchronous write of step STEP's checkpoint (from Orbax's writing
  thread, just before it renames the finished temporary directory), which is then held for a
  second, so that the loop meets that write unfinished.
The package has no test hook: the functions are wrapped here, in this process only.
"""

import os
import runpy
import signal
import sys
import time

import jax

from flowception_jax.storage import video_io


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)


def main():
  moment, step, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  if moment == 'fetch':
    device_get = jax.device_get

    def fetch(tree):
      caller = sys._getframe(1)  # pylint: disable=protected-access
      if caller.f_code.co_name == 'check_and_log' and caller.f_locals['step'] == step:
        _sigterm()
      return device_get(tree)
    jax.device_get = fetch
  elif moment == 'samples':
    write_gif = video_io.write_gif

    def write(path, *args, **kwargs):
      if os.path.basename(path) == f'samples_{step:06d}.gif':
        _sigterm()
      return write_gif(path, *args, **kwargs)
    video_io.write_gif = write
  elif moment == 'checkpoint':
    rename = os.rename

    def finalize(source, target, *args, **kwargs):
      if os.path.basename(source) == f'{step}.orbax-checkpoint-tmp':
        _sigterm()
        time.sleep(1)
      return rename(source, target, *args, **kwargs)
    os.rename = finalize
  else:
    raise ValueError(f'unknown moment {moment!r}')
  sys.argv = [sys.argv[0]] + flags
  runpy.run_module('flowception_jax.main', run_name='__main__')


if __name__ == '__main__':
  main()
