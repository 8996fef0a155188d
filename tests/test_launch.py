"""Launch scripts against fake `gcloud`, `srun` and workers on PATH; real local processes."""

import glob
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

# Every fake appends its call, as a JSON list, to FAKE_ROOT/calls.jsonl.
_RECORD = """
def record(*call):
  with open(os.path.join(os.environ['FAKE_ROOT'], 'calls.jsonl'), 'a') as log:
    log.write(json.dumps(list(call)) + '\\n')
"""

# `gcloud`: one slice (FAKE_ROOT/slice.json: a TPU VM, or a queued resource with one worker per
# node) whose workers are folders FAKE_ROOT/hosts/host-I, each its own home; `ssh` runs the command
# there with bash, as every worker would; a queued resource is PROVISIONING until described once;
# `delete` ends what ran on the workers and wipes their disks. gs://BUCKET/PATH is
# FAKE_ROOT/gcs/BUCKET/PATH (FAKE_GCS_DENIED: no write access).
_FAKE_GCLOUD = f"""#!{sys.executable}
import glob, json, os, shutil, signal, subprocess, sys
{_RECORD}
args = sys.argv[1:]
record('gcloud', *args)
root = os.environ['FAKE_ROOT']


def fail(message):
  print(f'ERROR: (gcloud) {{message}}', file=sys.stderr)
  sys.exit(1)


def flag(name, default=None):
  return next((a.split('=', 1)[1] for a in args if a.startswith(name + '=')), default)


if args[:2] == ['storage', 'cp']:
  if os.environ.get('FAKE_GCS_DENIED'):
    fail('HTTPError 403: caller does not have storage.objects.create access')
  target = os.path.join(root, 'gcs', args[3][len('gs://'):])
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copy(args[2], target)
  sys.exit(0)

kind, verb = args[2], args[3]
name = args[5].split(':')[0] if verb == 'scp' else args[4]
state_file = os.path.join(root, 'slice.json')
current = json.load(open(state_file)) if os.path.exists(state_file) else None
if current and current['kind'] != kind:
  current = None


def save():
  with open(state_file, 'w') as f:
    json.dump(current, f)


if verb == 'create':
  if current:
    fail(f'ALREADY_EXISTS: {{name}}')
  current = {{'kind': kind, 'nodes': int(flag('--node-count', 1)),
             'state': 'READY' if kind == 'tpu-vm' else 'PROVISIONING'}}
  save()
elif current is None:
  fail(f'NOT_FOUND: {{name}} was not found')
elif verb == 'describe':
  print(current['state'])
  if current['state'] == 'PROVISIONING':
    current['state'] = 'ACTIVE'
    save()
elif verb == 'delete':
  for pid_file in glob.glob(os.path.join(root, 'hosts', '*', '.flowception_job', '*', 'pid')):
    try:
      os.killpg(int(open(pid_file).read()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  shutil.rmtree(os.path.join(root, 'hosts'), ignore_errors=True)
  os.remove(state_file)
else:
  for i in range(current['nodes']):
    home = os.path.join(root, 'hosts', f'host-{{i}}')
    os.makedirs(home, exist_ok=True)
    if verb == 'scp':
      shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
    elif subprocess.run(['bash', '-c', flag('--command')],
                        env=dict(os.environ, HOME=home, FAKE_HOSTNAME=f'host-{{i}}')).returncode:
      sys.exit(1)
"""

# A host's `python3`: has the venv module; `-m venv DIR` makes a virtualenv of fake pythons.
_FAKE_SYSTEM_PYTHON = f"""#!{sys.executable}
import json, os, shutil, sys
{_RECORD}
args = sys.argv[1:]
if args[:1] != ['-c']:  # `-c 'import ensurepip'` succeeds unrecorded.
  record('python3', *args)
if args[:2] == ['-m', 'venv']:
  os.makedirs(os.path.join(args[2], 'bin'))
  for name in ('python', 'python3'):
    shutil.copy(os.path.join(os.path.dirname(__file__), 'venv_python'),
                os.path.join(args[2], 'bin', name))
"""

# The virtualenv's `python`: records its arguments and surroundings; pip succeeds; any module
# prints to stdout and stderr, then runs FAKE_JOB_SECONDS (or until SIGTERM, when it "saves") and
# exits with FAKE_JOB_EXIT.
_FAKE_VENV_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
{_RECORD}
args = sys.argv[1:]
record('venv python', {{'argv': args, 'python': sys.argv[0], 'cwd': os.getcwd(),
                       'virtual_env': os.environ.get('VIRTUAL_ENV'),
                       'host': os.environ.get('FAKE_HOSTNAME', 'launcher')}})
if args[:2] == ['-m', 'pip']:
  sys.exit(0)


def saved(*_):
  print('fake job: saved a checkpoint, exiting', flush=True)
  sys.exit(0)


signal.signal(signal.SIGTERM, saved)
print('fake job: step 1', flush=True)
print('fake job: a warning on stderr', file=sys.stderr, flush=True)
deadline = time.monotonic() + float(os.environ.get('FAKE_JOB_SECONDS', '0'))
while time.monotonic() < deadline:
  time.sleep(0.05)
sys.exit(int(os.environ.get('FAKE_JOB_EXIT', '0')))
"""

_FAKE_SUDO = f"""#!{sys.executable}
import json, os, sys
{_RECORD}
record('sudo', *sys.argv[1:])
sys.exit(1 if sys.argv[1] == 'lsof' else 0)  # No process holds the TPU.
"""

# `srun`: records its arguments and runs the task command once per task with SLURM's variables.
_FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
{_RECORD}
args = sys.argv[1:]
record('srun', *args)
tasks = int(next(a for a in args if a.startswith('--ntasks=')).split('=')[1])
command = args[next(i for i, a in enumerate(args) if not a.startswith('--')):]
for task in range(tasks):
  env = dict(os.environ, SLURM_PROCID=str(task), SLURM_NTASKS=str(tasks),
             SLURM_JOB_NODELIST='node-[07-08]', FAKE_HOSTNAME=f'node-{{7 + task:02d}}')
  subprocess.run(command, env=env, check=True)
"""

_FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$*" == "show hostnames node-[07-08]" ]] && printf 'node-07\\nnode-08\\n'
"""

_FAKE_HOSTNAME = """#!/usr/bin/env bash
echo "${FAKE_HOSTNAME:-launcher}"
"""

# Settings of the scripts under test, which the tests' own environment must not leak into.
_SETTINGS = ('TPU_', 'FLOWCEPTION_', 'SLURM_', 'OMPI_', 'LOCAL_', 'GPUS_PER_NODE', 'NODES',
             'COORDINATOR_', 'NUM_PROCESSES', 'PROCESS_ID', 'LOG_SYNC', 'STOP_GRACE',
             'JAX_REQUIREMENT', 'PYTHON', 'VIRTUAL_ENV')


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


class _Fakes:
  """The fake commands' world: the environment that puts them on PATH, and what they did."""

  def __init__(self, root):
    self.root = root
    self._log = root / 'calls.jsonl'
    self._seen = 0
    bin_dir = root / 'bin'
    bin_dir.mkdir()
    (root / 'home').mkdir()
    for name, text in [('gcloud', _FAKE_GCLOUD), ('python3', _FAKE_SYSTEM_PYTHON),
                       ('venv_python', _FAKE_VENV_PYTHON), ('sudo', _FAKE_SUDO),
                       ('srun', _FAKE_SRUN), ('scontrol', _FAKE_SCONTROL),
                       ('hostname', _FAKE_HOSTNAME)]:
      _write(bin_dir / name, textwrap.dedent(text))
    self.env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS)}
    self.env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_ROOT=str(root),
                    HOME=str(root / 'home'))

  def calls(self):
    """The calls since the last look."""
    if not self._log.exists():
      return []
    lines = self._log.read_text().split('\n')[:-1]  # A line still being written is left.
    new, self._seen = lines[self._seen:], len(lines)
    return [json.loads(line) for line in new]

  def wait_for(self, what, count=1, timeout=90):
    """The calls since the last look, once `count` of them are `what(call)`."""
    found, deadline = [], time.monotonic() + timeout
    while sum(map(what, found)) < count:
      assert time.monotonic() < deadline, found
      time.sleep(0.05)
      found += self.calls()
    return found

  def home(self, i):
    return self.root / 'hosts' / f'host-{i}'

  def bucket(self, path):
    return self.root / 'gcs' / path[len('gs://'):]

  def preempt(self):
    """What a preemption does: the jobs die, the slice is PREEMPTED (or SUSPENDED) and stays."""
    self.end_jobs()
    with open(self.root / 'slice.json') as f:
      current = json.load(f)
    current['state'] = 'PREEMPTED' if current['kind'] == 'tpu-vm' else 'SUSPENDED'
    with open(self.root / 'slice.json', 'w') as f:
      json.dump(current, f)

  def end_jobs(self):
    for pid_file in glob.glob(str(self.root / '*' / '**' / '.flowception_job' / '*' / 'pid'),
                              recursive=True):
      try:
        os.killpg(int(open(pid_file).read()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


@pytest.fixture
def fakes(tmp_path):
  world = _Fakes(tmp_path)
  yield world
  world.end_jobs()  # A failed test leaves no job behind.


def _run(script, *args, env, check=True):
  result = subprocess.run([os.path.join(_LAUNCH, script), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _eventually(check, timeout=90):
  """Waits until `check()` is true (it may raise meanwhile), then returns its value."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      value = check()
      if value:
        return value
    except (FileNotFoundError, StopIteration):
      pass
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)


def _is_job(call):
  """Whether `call` is a job's start (a flowception_jax module in the virtualenv)."""
  return call[0] == 'venv python' and call[1]['argv'][1].startswith('flowception_jax')


# Words a shell would split, expand or run, which must reach the job as they are.
_AWKWARD = '--config.data.root=/data/my videos/$USER "q" \'s\'; echo $(owned) `x` *'

def _tpu_verbs(calls):
  """The verbs of the TPU calls among `calls` (not the workers' copies of their logs)."""
  return [c[4] for c in calls if c[:3] == ['gcloud', 'compute', 'tpus']]


_TPU_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']
_QUEUED = ['gcloud', 'compute', 'tpus', 'queued-resources']


@pytest.mark.e2e
def test_tpu_vm_from_creation_to_deletion(fakes):
  env = fakes.env
  env.update(TPU_NAME='run1', TPU_ZONE='europe-west4-b', TPU_PROJECT='proj',
             TPU_ACCELERATOR_TYPE='v4-32', TPU_RUNTIME_VERSION='tpu-ubuntu2204-base',
             STOP_GRACE='20', LOG_SYNC='0.2', FAKE_JOB_SECONDS='60')
  where = ['--zone=europe-west4-b', '--project=proj']

  _run('tpu_vm.sh', 'create', '--spot', env=env)
  assert fakes.calls() == [_TPU_VM + ['create', 'run1', *where, '--accelerator-type=v4-32',
                                      '--version=tpu-ubuntu2204-base', '--spot']]

  _run('tpu_vm.sh', 'setup', env=env)
  home, venv = fakes.home(0), fakes.home(0) / 'flowception_venv'
  scp, ssh, make_venv, pip = fakes.calls()
  assert scp[:5] == _TPU_VM + ['scp'] and scp[6:] == ['run1:flowception_jax.tar.gz', *where,
                                                      '--worker=all']
  assert ssh[:6] == _TPU_VM + ['ssh', 'run1'] and ssh[6:-1] == [*where, '--worker=all']
  # The worker holds this repository and a virtualenv with the package and JAX for TPU.
  assert (home / 'flowception_jax' / 'flowception_jax' / 'training' / 'train.py').exists()
  assert not (home / 'flowception_jax' / '.git').exists()
  assert make_venv == ['python3', '-m', 'venv', str(venv)]
  assert pip[1]['argv'] == ['-m', 'pip', 'install', '-q', '-U', 'jax[tpu]', '-e',
                            str(home / 'flowception_jax')]
  assert pip[1]['python'] == str(venv / 'bin' / 'python')
  # Setting up again copies the code again and keeps the virtualenv as it is.
  _run('tpu_vm.sh', 'setup', env=env)
  assert [c[:1] + c[4:5] for c in fakes.calls()] == [['gcloud', 'scp'], ['gcloud', 'ssh']]

  job = ['python', '-m', 'flowception_jax.main', '--config=configs/coloring.py',
         '--workdir=gs://bucket/runs/run1', _AWKWARD, '--config.seed=3']
  started = _run('tpu_vm.sh', 'run', '--', *job, env=env)
  assert 'host-0: started python -m flowception_jax.main' in started.stdout
  ssh, (_, main) = fakes.wait_for(_is_job)
  assert ssh[:6] == _TPU_VM + ['ssh', 'run1'] and '--worker=all' in ssh
  assert main == {'argv': job[1:], 'python': str(venv / 'bin' / 'python'),
                  'cwd': str(home / 'flowception_jax'), 'virtual_env': str(venv), 'host': 'host-0'}
  # The worker's output reaches the workdir, one log per worker under the run's start time.
  log = _eventually(lambda: next(fakes.bucket('gs://bucket/runs/run1/logs').glob('*/host-0.log')))
  _eventually(lambda: 'fake job: a warning on stderr' in log.read_text())
  assert 'fake job: step 1' in log.read_text()
  again = _run('tpu_vm.sh', 'run', '--', *job, env=env, check=False)
  assert again.returncode != 0 and 'a job is running here already' in again.stderr
  fakes.calls()

  status = _run('tpu_vm.sh', 'status', env=env).stdout
  assert 'READY' in status and 'host-0: running (pid' in status
  assert f'(copied to gs://bucket/runs/run1/logs/{log.parent.name}/host-0.log)' in status
  assert 'fake job: step 1' in status
  assert _tpu_verbs(fakes.calls()) == ['describe', 'ssh']

  stopped = _run('tpu_vm.sh', 'stop', env=env)
  assert 'host-0: stopped' in stopped.stdout
  # The job saved on SIGTERM, and the copy in the workdir has its last words.
  assert 'fake job: saved a checkpoint, exiting' in log.read_text()
  assert ['sudo', 'rm', '-f', '/tmp/libtpu_lockfile'] in fakes.calls()
  assert 'host-0: not running' in _run('tpu_vm.sh', 'status', env=env).stdout

  # Any module runs the same way.
  env.update(FAKE_JOB_SECONDS='0')
  sample = ['python', '-m', 'flowception_jax.sample', '--workdir=gs://bucket/runs/run1',
            '--output=/tmp/my samples/$HOME.npz', '--num_videos=2']
  _run('tpu_vm.sh', 'run', '--', *sample, env=env)
  (_, sampled), = [c for c in fakes.wait_for(_is_job) if _is_job(c)]
  assert sampled['argv'] == sample[1:] and sampled['python'] == str(venv / 'bin' / 'python')

  fakes.calls()
  _run('tpu_vm.sh', 'delete', env=env)
  assert [c for c in fakes.calls() if c[:2] == ['gcloud', 'compute']] == [
      _TPU_VM + ['delete', 'run1', *where, '--quiet']]


@pytest.mark.e2e
def test_tpu_vm_multislice_is_a_queued_resource_as_wide_as_the_mesh(fakes, tmp_path):
  env = fakes.env
  env.update(TPU_ZONE='us-central2-b', TPU_ACCELERATOR_TYPE='v4-16',
             TPU_RUNTIME_VERSION='tpu-ubuntu2204-base', TPU_POLL='0.1', STOP_GRACE='20',
             FAKE_JOB_SECONDS='60')
  where = ['--zone=us-central2-b']

  created = _run('tpu_vm.sh', '--num_slices=2', 'create', env=env)
  describe = _QUEUED + ['describe', 'flowception', *where, '--format=value(state.state)']
  assert fakes.calls() == [
      _QUEUED + ['create', 'flowception', *where, '--accelerator-type=v4-16',
                 '--runtime-version=tpu-ubuntu2204-base', '--node-count=2',
                 '--node-prefix=flowception'],
      describe, describe]  # It waits until the queued resource is ACTIVE.
  assert 'flowception is PROVISIONING; checking again' in created.stderr

  env['TPU_NUM_SLICES'] = '2'
  _run('tpu_vm.sh', 'setup', env=env)
  scp, ssh, *installs = fakes.calls()
  assert scp[:5] == _QUEUED + ['scp'] and scp[-3:] == [*where, '--node=all', '--worker=all']
  assert ssh[:6] == _QUEUED + ['ssh', 'flowception']
  assert ssh[6:-1] == [*where, '--node=all', '--worker=all']
  assert [c for c in installs if c[0] == 'python3'] == [
      ['python3', '-m', 'venv', str(fakes.home(i) / 'flowception_venv')] for i in range(2)]

  workdir = tmp_path / 'shared runs' / 'two slices'  # A filesystem every worker mounts.
  job = ['python', '-m', 'flowception_jax.main', '--config=configs/shapes.py',
         f'--workdir={workdir}']
  refused = _run('tpu_vm.sh', 'run', '--', *job, '--config.mesh.dcn_fsdp=1', env=env, check=False)
  assert refused.returncode == 2 and 'dcn_data x dcn_fsdp = 1 x 1' in refused.stderr
  assert 'add --config.mesh.dcn_data=2' in refused.stderr and fakes.calls() == []

  _run('tpu_vm.sh', 'run', '--', *job, '--config.mesh.dcn_data=2', env=env)
  jobs = [c[1] for c in fakes.wait_for(_is_job, count=2) if _is_job(c)]
  assert sorted(j['host'] for j in jobs) == ['host-0', 'host-1']
  assert all(j['argv'] == job[1:] + ['--config.mesh.dcn_data=2'] for j in jobs)
  logs = sorted(workdir.glob('logs/*/*.log'))
  assert [p.name for p in logs] == ['host-0.log', 'host-1.log']
  for log in logs:
    _eventually(lambda: 'fake job: step 1' in log.read_text())  # pylint: disable=cell-var-from-loop

  assert _run('tpu_vm.sh', 'stop', env=env).stdout.count('stopped') == 2
  fakes.calls()
  _run('tpu_vm.sh', 'delete', env=env)
  assert fakes.calls() == [_QUEUED + ['delete', 'flowception', *where, '--force', '--quiet']]


@pytest.mark.e2e
@pytest.mark.parametrize('num_slices', [1, 2])
def test_tpu_vm_recovers_a_preempted_slice_and_runs_the_job_again(fakes, num_slices):
  env = fakes.env
  env.update(TPU_ZONE='us-west4-a', TPU_ACCELERATOR_TYPE='v5litepod-16',
             TPU_RUNTIME_VERSION='v2-alpha-tpuv5-lite', TPU_NUM_SLICES=str(num_slices),
             TPU_POLL='0.1', STOP_GRACE='20', FAKE_JOB_SECONDS='60')
  job = ['python', '-m', 'flowception_jax.main', '--config=configs/shapes.py',
         '--workdir=gs://bucket/runs/spot', f'--config.mesh.dcn_data={num_slices}', _AWKWARD]
  _run('tpu_vm.sh', 'create', env=env)
  _run('tpu_vm.sh', 'setup', env=env)
  _run('tpu_vm.sh', 'run', '--', *job, env=env)
  fakes.wait_for(_is_job, count=num_slices)

  up = _run('tpu_vm.sh', 'recover', '--', *job, env=env, check=False)
  assert up.returncode == 2 and 'not preempted' in up.stderr and 'tpu_vm.sh stop' in up.stderr
  assert _tpu_verbs(fakes.calls()) == ['describe']  # A slice that is up is left alone.

  fakes.preempt()
  _run('tpu_vm.sh', 'recover', '--', *job, env=env)
  calls = fakes.wait_for(_is_job, count=num_slices)
  provisioning = ['describe', 'describe'] if num_slices > 1 else []
  assert _tpu_verbs(calls) == [
      'describe', 'delete', 'create', *provisioning, 'scp', 'ssh', 'ssh']
  delete = next(c for c in calls if c[4:5] == ['delete'])
  assert ('--force' in delete) == (num_slices > 1)
  # The new workers got a new virtualenv, and run the same job, which resumes from the workdir.
  assert len([c for c in calls if c[:3] == ['python3', '-m', 'venv']]) == num_slices
  assert [c[1]['argv'] for c in calls if _is_job(c)] == [job[1:]] * num_slices


def test_tpu_vm_asks_for_each_missing_setting_by_name(fakes):
  env = fakes.env
  no_zone = _run('tpu_vm.sh', 'status', env=env, check=False)
  assert no_zone.returncode == 2 and 'needs --zone=... (or TPU_ZONE)' in no_zone.stderr
  env['TPU_ZONE'] = 'us-west4-a'
  no_type = _run('tpu_vm.sh', 'create', env=env, check=False)
  assert no_type.returncode == 2
  assert 'needs --accelerator_type=... (or TPU_ACCELERATOR_TYPE)' in no_type.stderr
  env['TPU_ACCELERATOR_TYPE'] = 'v5p-64'
  no_runtime = _run('tpu_vm.sh', 'recover', '--', 'python', '-m', 'flowception_jax.main',
                    '--workdir=gs://b/r', env=env, check=False)
  assert no_runtime.returncode == 2
  assert 'needs --runtime_version=... (or TPU_RUNTIME_VERSION)' in no_runtime.stderr
  no_job = _run('tpu_vm.sh', 'run', env=env, check=False)
  assert no_job.returncode == 2 and 'needs the job after --' in no_job.stderr
  no_workdir = _run('tpu_vm.sh', 'run', '--', 'python', '-m', 'flowception_jax.sample',
                    '--num_videos=2', env=env, check=False)
  assert no_workdir.returncode == 2 and 'needs a workdir for the logs' in no_workdir.stderr
  assert _run('tpu_vm.sh', 'train', env=env, check=False).returncode == 2
  assert _run('tpu_vm.sh', 'create', '--', 'python', env=env, check=False).returncode == 2
  assert fakes.calls() == []  # Nothing ran.

  help_text = _run('tpu_vm.sh', '--help', env=env).stdout
  assert 'zone=us-west4-a accelerator_type=v5p-64' in help_text
  assert 'runtime_version=<required>' in help_text and 'MEGASCALE_NUM_SLICES' in help_text
  dry = _run('tpu_vm.sh', '--dry_run', '--name=other', '--runtime_version=v2-alpha-tpuv5',
             'create', env=env)
  assert dry.stdout.startswith('gcloud compute tpus tpu-vm create other --zone=us-west4-a ')
  assert '--accelerator-type=v5p-64' in dry.stdout and '--project' not in dry.stdout
  assert fakes.calls() == []


@pytest.mark.e2e
def test_gpu_multinode_under_slurm(fakes, tmp_path):
  env = fakes.env
  env.update(SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='2', SLURM_GPUS_PER_NODE='a100:4')
  venv, workdir = tmp_path / 'venv', tmp_path / 'shared' / 'run 1'
  job = ['python', '-m', 'flowception_jax.main', '--config=configs/coloring.py',
         f'--workdir={workdir}', _AWKWARD]
  launched = _run('gpu_multinode.sh', f'--venv={venv}', '--port=1234', '--', *job, env=env)
  make_venv, pip, srun, *workers = fakes.calls()
  assert make_venv == ['python3', '-m', 'venv', str(venv)]
  assert pip[1]['argv'] == ['-m', 'pip', 'install', '-q', '-U', 'jax[cuda12]', '-e', _ROOT]
  (log_dir,) = (workdir / 'logs').iterdir()
  assert srun == ['srun', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1', '--gpus-per-node=4',
                  os.path.join(_LAUNCH, 'gpu_multinode.sh'), '--worker', '--port=1234',
                  f'--venv={venv}', f'--log_dir={log_dir}', '--log_sync=60', '--', *job]
  assert [w[1] for w in workers] == [
      {'argv': job[1:] + ['--coordinator_address=node-07:1234', '--num_processes=2',
                          f'--process_id={i}'],
       'python': str(venv / 'bin' / 'python'), 'cwd': _ROOT, 'virtual_env': str(venv),
       'host': f'node-0{7 + i}'} for i in range(2)]
  for i in range(2):  # Each process's output: in its log in the workdir, and on the task's stdout.
    assert 'fake job: a warning on stderr' in (log_dir / f'process_{i}.log').read_text()
  assert launched.stdout.count('fake job: step 1') == 2

  # The next launch reuses the virtualenv as it is; another JAX is installed into it.
  _run('gpu_multinode.sh', '--gpus_per_node=8', f'--venv={venv}', '--', *job, env=env)
  assert [c[0] for c in fakes.calls()] == ['srun', 'venv python', 'venv python']
  _run('gpu_multinode.sh', f'--venv={venv}', '--jax=jax[cuda13]', '--', *job, env=env)
  pip, *_ = fakes.calls()
  assert pip[1]['argv'][:6] == ['-m', 'pip', 'install', '-q', '-U', 'jax[cuda13]']

  dry = _run('gpu_multinode.sh', '--dry_run', '--nodes=3', f'--venv={venv}', '--', *job, env=env)
  setup, srun_line = dry.stdout.splitlines()
  assert setup.endswith(f'job.sh setup --venv={venv} --python=python3 --jax=jax\\[cuda12\\] ')
  assert srun_line.startswith('srun --nodes=3 --ntasks=3 ') and fakes.calls() == []


def test_gpu_multinode_by_hand_and_its_errors(fakes, tmp_path):
  env = fakes.env
  venv = tmp_path / 'venv'
  job = ['python', '-m', 'flowception_jax.sample', f'--workdir={tmp_path / "w"}',
         '--output=/tmp/my samples/$HOME.npz']
  by_hand = [f'--venv={venv}', '--coordinator=h0:9', '--num_processes=2', '--process_id=1']
  outside = _run('gpu_multinode.sh', '--', *job, env=env, check=False)
  assert outside.returncode == 2 and 'not inside a SLURM allocation' in outside.stderr
  not_set_up = _run('gpu_multinode.sh', '--worker', *by_hand, '--', *job, env=env, check=False)
  assert not_set_up.returncode == 2 and 'gpu_multinode.sh --setup' in not_set_up.stderr

  _run('gpu_multinode.sh', '--setup', f'--venv={venv}', '--jax=jax[cuda13]', env=env)
  _, pip = fakes.calls()
  assert pip[1]['argv'][:6] == ['-m', 'pip', 'install', '-q', '-U', 'jax[cuda13]']
  env['FAKE_JOB_EXIT'] = '3'
  failed = _run('gpu_multinode.sh', '--worker', *by_hand, '--log_dir=gs://bucket/logs/x', '--',
                *job, env=env, check=False)
  assert failed.returncode == 3  # The job's own status.
  (_, sample), copy = fakes.calls()
  local_log = fakes.root / 'home' / '.flowception_job' / 'launcher' / 'process_1.log'
  assert copy == ['gcloud', 'storage', 'cp', str(local_log), 'gs://bucket/logs/x/process_1.log']
  assert sample['argv'] == job[1:] + ['--coordinator_address=h0:9', '--num_processes=2',
                                      '--process_id=1']
  assert 'fake job: step 1' in fakes.bucket('gs://bucket/logs/x/process_1.log').read_text()
  # A log that cannot reach the bucket says so, and stays on the host.
  env['FAKE_GCS_DENIED'] = '1'
  denied = _run('gpu_multinode.sh', '--worker', *by_hand, '--log_dir=gs://bucket/logs/y', '--',
                *job, env=env, check=False)
  assert 'could not copy the log to gs://bucket/logs/y/process_1.log' in denied.stderr
  assert denied.returncode == 3 and '403' in denied.stderr
  assert 'fake job: step 1' in local_log.read_text()
  assert 'could not copy the log' in local_log.read_text()
  assert [c[:3] for c in fakes.calls()][1:] == [['gcloud', 'storage', 'cp']]

  env['SLURM_JOB_ID'] = '42'
  no_gpus = _run('gpu_multinode.sh', '--nodes=2', '--', *job, env=env, check=False)
  assert no_gpus.returncode == 2 and '--gpus_per_node=G (or GPUS_PER_NODE)' in no_gpus.stderr
  no_job = _run('gpu_multinode.sh', '--gpus_per_node=8', '--nodes=2', env=env, check=False)
  assert no_job.returncode == 2 and 'give the job after --' in no_job.stderr
  no_workdir = _run('gpu_multinode.sh', '--gpus_per_node=8', '--nodes=2', '--', 'python', '-m',
                    'flowception_jax.sample', env=env, check=False)
  assert no_workdir.returncode == 2 and 'no directory for the logs' in no_workdir.stderr
  del env['SLURM_JOB_ID']
  lost = _run('gpu_multinode.sh', '--worker', f'--venv={venv}', '--', *job, env=env, check=False)
  assert lost.returncode == 2 and '--process_id' in lost.stderr
  dry = _run('gpu_multinode.sh', '--worker', '--dry_run', *by_hand, '--', *job, env=env)
  assert '--coordinator_address=h0:9 --num_processes=2 --process_id=1' in dry.stdout
  assert fakes.calls() == []


def test_launch_scripts_pass_shellcheck():
  scripts = sorted(glob.glob(os.path.join(_LAUNCH, '*.sh')))
  result = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_local_processes_stop_together_on_the_first_failure(fakes, tmp_path):
  env = fakes.env
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
