"""The multi-process runtime: joining it, and stopping at once when the processes disagree.

Every process of a multi-host run executes the same command. `initialize` joins them into one JAX
runtime, either from explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`) or
through JAX's detection of TPU pod slices and cluster managers (SLURM, Open MPI, Kubernetes).
`check_same` compares a value (the config, the flags) across processes: if any process differs,
every process raises the same error instead of some of them waiting for the others forever.
`any_process` shares a flag (a preemption one process saw) so that every process acts on it alike.
"""

import hashlib
import json
import os
from typing import Any, Callable

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# Environment variables with which launchers announce several tasks; if they are set, failing to
# detect the cluster is an error, not a single-process run.
_TASK_COUNT_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE', 'WORLD_SIZE')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the multi-process runtime; call before any other JAX computation.

  With all three arguments, they define the runtime (process 0 runs the coordinator at
  `coordinator_address`, host:port). With none, JAX detects the cluster; if there is none, this is
  a single-process run.
  """
  given = [coordinator_address, num_processes, process_id]
  # CPU processes exchange collectives through Gloo (accelerators use their own interconnect).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if all(v is not None for v in given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(v is not None for v in given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together; give '
                     'all three, or none to detect the cluster automatically')
  else:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # No cluster, or JAX already running in this process.
      announced = {v: os.environ[v] for v in _TASK_COUNT_VARIABLES
                   if os.environ.get(v, '1').isdigit() and int(os.environ.get(v, '1')) > 1}
      if announced:
        raise ValueError(f'the environment announces several tasks ({announced}) but JAX could not '
                         f'join them ({e}); pass --coordinator_address, --num_processes and '
                         '--process_id') from e
      logging.debug('no cluster detected (%s): running as a single process', e)
  if jax.process_count() > 1:
    logging.info('process %d of %d, local devices %s', jax.process_index(), jax.process_count(),
                 jax.local_devices())


def define_flags() -> Callable[[], None]:
  """Defines a program's runtime flags; returns the function that joins the runtime from them."""
  coordinator = flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0 in a multi-process run (default: detect).')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
  process_id = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')
  return lambda: initialize(coordinator.value, num_processes.value, process_id.value)


def any_process(flag: bool) -> bool:
  """Whether `flag` is True on any process; every process must call it, and gets the same answer."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.array([flag], np.int32))))


def check_same(what: str, value: Any) -> None:
  """Raises on every process if the processes hold different `value`s (JSON-able) of `what`."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
  every = multihost_utils.process_allgather(np.frombuffer(digest[:8], np.uint32))
  differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ValueError(f'processes {differ} were started with a different {what} from process 0; '
                     'start every process with the same command and flags')
