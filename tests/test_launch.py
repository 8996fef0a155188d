"""Launch scripts against fake `gcloud`, `srun` and workers on PATH; real local processes."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import coloring
from flowception_jax import datasets
from flowception_jax.training import checkpoint
from flowception_jax.training import sharding
from flowception_jax.training import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH = os.path.join(_ROOT, 'launch')

# Records its arguments; `scp` copies to the fake worker's home; `ssh --command=...` runs the
# command there with bash, as every worker would.
_FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as log:
  log.write(json.dumps(['gcloud'] + args) + '\\n')
home = os.environ['FAKE_HOME']
if args[3] == 'scp':
  shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
if args[3] == 'ssh':
  command = next(a for a in args if a.startswith('--command='))[len('--command='):]
  sys.exit(subprocess.run(['bash', '-c', command], env=dict(os.environ, HOME=home)).returncode)
if args[3] == 'describe':
  print('READY')
"""

# A worker's `python3`: pip succeeds; training records its flags and runs until SIGTERM.
_FAKE_WORKER_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_HOME/python3_calls"
if [[ "$*" == *flowception_jax.main* ]]; then
  trap 'echo terminated >> "$FAKE_HOME/signals"; exit 0' TERM
  for _ in $(seq 600); do sleep 0.1; done
fi
"""

_FAKE_SUDO = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_HOME/sudo_calls"
[[ "$1" != lsof ]]  # No process holds the TPU.
"""

# `srun`: records its arguments and runs the task command once per task with SLURM's variables.
_FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as log:
  log.write(json.dumps(['srun'] + args) + '\\n')
tasks = int(next(a for a in args if a.startswith('--ntasks=')).split('=')[1])
command = args[next(i for i, a in enumerate(args) if not a.startswith('--')):]
for task in range(tasks):
  env = dict(os.environ, SLURM_PROCID=str(task), SLURM_NTASKS=str(tasks),
             SLURM_JOB_NODELIST='node-[07-08]')
  subprocess.run(command, env=env, check=True)
"""

_FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$*" == "show hostnames node-[07-08]" ]] && printf 'node-07\\nnode-08\\n'
"""

_FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.environ['FAKE_LOG'], 'a') as log:
  log.write(json.dumps(['python'] + sys.argv[1:]) + '\\n')
"""


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def fakes(tmp_path):
  """A PATH with the fake commands, the log of their calls and a fake worker home."""
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  for name, text in [('gcloud', _FAKE_GCLOUD), ('python3', _FAKE_WORKER_PYTHON),
                     ('sudo', _FAKE_SUDO), ('srun', _FAKE_SRUN), ('scontrol', _FAKE_SCONTROL),
                     ('fake_python', _FAKE_PYTHON)]:
    _write(bin_dir / name, textwrap.dedent(text))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'FLOWCEPTION_', 'SLURM_', 'OMPI_', 'LOCAL_'))}
  env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_LOG=str(tmp_path / 'calls.jsonl'),
             FAKE_HOME=str(home))
  yield env, tmp_path / 'calls.jsonl', home
  pid_file = home / 'flowception_train.pid'  # A failed test leaves no fake training behind.
  if pid_file.exists():
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
      pass


def _calls(log):
  if not log.exists():
    return []
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  log.unlink()
  return calls


def _run(script, *args, env, check=True):
  result = subprocess.run([os.path.join(_LAUNCH, script), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def test_tpu_vm_from_creation_to_deletion(fakes):
  env, log, home = fakes
  env.update(TPU_NAME='run1', TPU_ZONE='europe-west4-b', TPU_PROJECT='proj',
             TPU_ACCELERATOR_TYPE='v4-32', TPU_RUNTIME_VERSION='tpu-ubuntu2204-base',
             FLOWCEPTION_CONFIG='configs/coloring.py', FLOWCEPTION_WORKDIR='gs://bucket/runs/run1',
             STOP_GRACE='20')
  where = ['--zone=europe-west4-b', '--project=proj']
  tpu_vm = ['gcloud', 'compute', 'tpus', 'tpu-vm']

  _run('tpu_vm.sh', 'create', '--spot', env=env)
  assert _calls(log) == [tpu_vm + ['create', 'run1', *where, '--accelerator-type=v4-32',
                                   '--version=tpu-ubuntu2204-base', '--spot']]

  _run('tpu_vm.sh', 'setup', env=env)
  scp, ssh = _calls(log)
  assert scp[:5] == tpu_vm + ['scp'] and scp[6:] == ['run1:flowception_jax.tar.gz', *where,
                                                     '--worker=all']
  assert ssh[:6] == tpu_vm + ['ssh', 'run1'] and '--worker=all' in ssh
  # The worker now holds this repository, and pip installed it.
  assert (home / 'flowception_jax' / 'flowception_jax' / 'training' / 'train.py').exists()
  assert not (home / 'flowception_jax' / '.git').exists()
  assert 'pip install -q -e' in (home / 'python3_calls').read_text()

  _run('tpu_vm.sh', 'train', '--zone=europe-west4-b', '--overrides=--config.seed=3', '--',
       '--config.batch_size=64', env=env)
  (ssh,) = _calls(log)
  assert ssh[:6] == tpu_vm + ['ssh', 'run1'] and '--worker=all' in ssh
  for _ in range(100):  # Training starts in the background.
    if 'flowception_jax.main' in (home / 'python3_calls').read_text():
      break
    time.sleep(0.05)
  main_call = (home / 'python3_calls').read_text().splitlines()[-1]
  assert main_call == ('-m flowception_jax.main --config=configs/coloring.py '
                       '--workdir=gs://bucket/runs/run1 --config.seed=3 --config.batch_size=64')

  status = _run('tpu_vm.sh', 'status', env=env)
  assert 'READY' in status.stdout and 'training (pid' in status.stdout
  assert [c[4] for c in _calls(log)] == ['describe', 'ssh']

  stopped = _run('tpu_vm.sh', 'stop', env=env)
  assert 'stopped' in stopped.stdout and (home / 'signals').read_text() == 'terminated\n'
  assert not (home / 'flowception_train.pid').exists()
  assert 'rm -f /tmp/libtpu_lockfile' in (home / 'sudo_calls').read_text()
  assert 'not training' in _run('tpu_vm.sh', 'status', env=env).stdout
  _calls(log)

  _run('tpu_vm.sh', 'delete', env=env)
  assert _calls(log) == [tpu_vm + ['delete', 'run1', *where, '--quiet']]


def test_tpu_vm_dry_run_help_and_errors(fakes):
  env, log, _ = fakes
  env['TPU_ACCELERATOR_TYPE'] = 'v5p-64'
  dry = _run('tpu_vm.sh', '--dry_run', '--name=other', 'create', env=env)
  assert dry.stdout.startswith('gcloud compute tpus tpu-vm create other --zone=us-west4-a ')
  assert '--accelerator-type=v5p-64' in dry.stdout and '--project' not in dry.stdout
  assert _calls(log) == []  # Nothing was run.
  help_text = _run('tpu_vm.sh', '--help', env=env).stdout
  assert 'accelerator_type=v5p-64' in help_text
  assert 'runtime_version=v2-alpha-tpuv5-lite' in help_text
  missing = _run('tpu_vm.sh', 'train', env=env, check=False)
  assert missing.returncode == 2 and '--workdir' in missing.stderr
  assert _run('tpu_vm.sh', 'launch', env=env, check=False).returncode == 2


def test_gpu_multinode_under_slurm(fakes):
  env, log, _ = fakes
  env.update(SLURM_JOB_ID='42', PYTHON='fake_python', FLOWCEPTION_WORKDIR='/shared/run')
  _run('gpu_multinode.sh', '--nodes=2', '--gpus_per_node=4', '--port=1234',
       '--config=configs/coloring.py', '--', '--config.batch_size=64', env=env)
  srun, *workers = _calls(log)
  script = os.path.join(_LAUNCH, 'gpu_multinode.sh')
  assert srun == ['srun', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1', '--gpus-per-node=4',
                  script, '--worker', '--port=1234', '--config=configs/coloring.py', '--',
                  '--config.batch_size=64']
  assert workers == [
      ['python', '-m', 'flowception_jax.main', '--config=configs/coloring.py',
       '--workdir=/shared/run', '--coordinator_address=node-07:1234', '--num_processes=2',
       f'--process_id={i}', '--config.batch_size=64'] for i in range(2)]

  dry = _run('gpu_multinode.sh', '--dry_run', '--nodes=3', env=env)
  assert dry.stdout.startswith('srun --nodes=3 --ntasks=3 ') and _calls(log) == []
  by_hand = _run('gpu_multinode.sh', '--worker', '--dry_run', '--coordinator=h0:9',
                 '--num_processes=4', '--process_id=3', env=env)
  assert '--coordinator_address=h0:9 --num_processes=4 --process_id=3' in by_hand.stdout
  del env['SLURM_JOB_ID']
  lost = _run('gpu_multinode.sh', '--worker', env=env, check=False)
  assert lost.returncode == 2 and '--process_id' in lost.stderr


def test_local_processes_stop_together_on_the_first_failure(fakes, tmp_path):
  env, _, _ = fakes
  pid_dir = tmp_path / 'pids'
  pid_dir.mkdir()
  _write(tmp_path / 'python', textwrap.dedent(f"""\
      #!/usr/bin/env bash
      [[ "$1" == -c ]] && exec {sys.executable} "$@"
      id="${{@: -1}}"; id="${{id#--process_id=}}"
      echo $$ > {pid_dir}/$id
      [[ "$id" == 1 ]] && {{ sleep 0.5; exit 7; }}
      exec sleep 300
      """))
  env['PYTHON'] = str(tmp_path / 'python')
  start = time.monotonic()
  result = _run('local.sh', '--devices_per_process=3', '3', '--flag=x', env=env, check=False)
  assert result.returncode == 7 and 'process 1 failed with status 7' in result.stderr
  assert time.monotonic() - start < 60
  pids = [int((pid_dir / str(i)).read_text()) for i in range(3)]
  for pid in pids:  # Every process is gone (not even a zombie of the script's children).
    assert not os.path.exists(f'/proc/{pid}') or 'Z' in open(f'/proc/{pid}/stat').read().split()[2]
  dry = _run('local.sh', '--dry_run', '2', '--workdir=/w', env=env)
  lines = dry.stdout.splitlines()
  assert len(lines) == 2 and '--xla_force_host_platform_device_count=2' in lines[0]
  assert lines[1].endswith('--process_id=1 > LOG_DIR/process_1.log 2>&1')


def _restore_params(workdir, config):
  source, info = datasets.make_source(config.data)
  _, _, init_fn = train.build(train.resolve(config, source, info), info)
  abstract, _ = train.state_layout(init_fn, sharding.make_mesh(config.mesh))
  manager = checkpoint.make_manager(workdir, read_only=True)
  state = checkpoint.restore_state(manager, manager.latest_step(), abstract)
  manager.close()
  return jax.device_get(state)


@pytest.mark.e2e
def test_two_processes_train_like_one_process_of_all_devices(tmp_path):
  flags = ['--config=configs/coloring.py:tiny', '--config.total_steps=3',
           '--config.checkpoint_every=3', '--config.data.buckets=(30,)',
           '--config.data.num_threads=1', '--config.evals.samples.num_videos=4']
  env = {k: v for k, v in os.environ.items() if not k.startswith('LOCAL_')}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes')
  two = subprocess.Popen(
      [os.path.join(_LAUNCH, 'local.sh'), f'--log_dir={tmp_path}', '2', *flags,
       f'--workdir={tmp_path / "two"}', '--config.mesh.dcn_data=2'],
      cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  one = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.main', *flags, f'--workdir={tmp_path / "one"}',
       '--config.profile_steps=1', '--config.profile_first_step=1'],
      cwd=_ROOT,
      env=dict(env, XLA_FLAGS=env['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=4'),
      capture_output=True, text=True, timeout=900, check=False)
  two_output = two.communicate(timeout=900)[0]
  assert one.returncode == 0, one.stderr[-3000:]
  assert two.returncode == 0, two_output[-3000:] + open(tmp_path / 'process_1.log').read()[-3000:]
  assert 'mesh {\'data\': 4, \'fsdp\': 1, \'tensor\': 1} over 4 devices, 2 processes' in two_output
  assert 'train step per device (bucket 30): state' in two_output  # Memory analysis, logged.

  config = coloring.get_config('tiny')
  two_state = _restore_params(str(tmp_path / 'two'), config)
  one_state = _restore_params(str(tmp_path / 'one'), config)
  assert int(two_state.step) == int(one_state.step) == 3
  # Gloo and the in-process all-reduce sum in different orders; AdamW divides by the root of the
  # squared gradient, which magnifies that rounding where a gradient is near zero (seen: 1.4e-6).
  # One update moves a parameter by about the learning rate (1e-3 here), far above atol.
  for a, b in zip(jax.tree.leaves(two_state.params), jax.tree.leaves(one_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6)
  data_files = os.listdir(tmp_path / 'two' / 'checkpoints' / '3' / 'data')
  assert len([f for f in data_files if f.endswith('.json')]) == 2  # Each process's data position.
  assert os.path.exists(tmp_path / 'two' / 'samples_000003.gif')  # Written by process 0.
  traces = [f for _, _, files in os.walk(tmp_path / 'one' / 'plugins' / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces)


@pytest.mark.e2e
def test_processes_with_different_configs_all_stop_with_a_message(tmp_path):
  port = subprocess.run([sys.executable, '-c', 'import socket; s = socket.socket(); '
                         's.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  code = textwrap.dedent("""\
      import sys
      from flowception_jax.training import distributed
      distributed.initialize(f'127.0.0.1:{sys.argv[1]}', 2, int(sys.argv[2]))
      distributed.check_same('config', {'seed': int(sys.argv[3])})
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  processes = [subprocess.Popen([sys.executable, '-c', code, port, str(i), str(i)], cwd=_ROOT,
                                env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errors = [p.communicate(timeout=300)[1] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert all(p.returncode != 0 for p in processes)
  for error in errors:
    assert 'processes [1] were started with a different config from process 0' in error
