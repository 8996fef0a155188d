#!/usr/bin/env bash
# Flowception on N GPU hosts: one process per host, using all of its GPUs, joined through an
# explicit coordinator (process 0's host).
#
#   launch/gpu_multinode.sh [settings] -- JOB...           under SLURM
#   launch/gpu_multinode.sh --setup [settings]             the virtualenv only
#   launch/gpu_multinode.sh --worker [settings] -- JOB...  on each host, by any launcher
#
# JOB is what every process runs, e.g. `python -m flowception_jax.main --config=... --workdir=...`:
# its words exactly as given, from the repository root, in the virtualenv, with
#   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
# added at the end (flowception_jax.main and flowception_jax.sample take them). Process I's output
# goes to LOG_DIR/process_I.log (to a gs:// LOG_DIR as a copy every LOG_SYNC seconds and at the
# end) and to its stdout.
#
# Under SLURM (inside an allocation: an sbatch script or salloc), the script sets up the
# virtualenv (as --setup does), then runs
#   srun --nodes=N --ntasks=N --ntasks-per-node=1 --gpus-per-node=G launch/gpu_multinode.sh --worker
# Each task (a `--worker`) takes its process id and count from the cluster manager's environment
# (SLURM_PROCID and SLURM_NTASKS, or Open MPI's OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE) and
# the coordinator from the first host of the allocation (SLURM_JOB_NODELIST). Without a cluster
# manager, run --setup once, then --worker on every host with --coordinator, --num_processes,
# --process_id and one --log_dir for all.
#
# --setup creates the virtualenv (once; later launches reuse it) and installs the package with its
# requirements and JAX into it, again only when requirements.txt, pyproject.toml or --jax changed.
#
# Settings (option, or environment variable):
#   --gpus_per_node=G       GPUS_PER_NODE          required: GPUs of each host (default: the
#                                                  allocation's SLURM_GPUS_PER_NODE, where set)
#   --nodes=N               NODES                  hosts (default: the allocation's)
#   --port=PORT             COORDINATOR_PORT       port of the coordinator (default 29500)
#   --coordinator=HOST:PORT COORDINATOR_ADDRESS    (worker) the coordinator (default: first host)
#   --num_processes=N       NUM_PROCESSES          (worker) instead of the cluster manager's count
#   --process_id=I          PROCESS_ID             (worker) instead of the cluster manager's id
#   --workdir=DIR           FLOWCEPTION_WORKDIR    where the logs go (default: the JOB's own
#                                                  --workdir)
#   --log_dir=DIR           FLOWCEPTION_LOG_DIR    the logs (default WORKDIR/logs/<UTC start time>)
#   --venv=DIR              FLOWCEPTION_VENV       the virtualenv, on storage every host sees
#                                                  (default: .venv in the repository)
#   --jax=REQUIREMENT       JAX_REQUIREMENT        JAX for these GPUs (default jax[cuda12])
#   --log_sync=SECONDS      LOG_SYNC               period of the copy to gs:// (default 60)
#   --dry_run                                      print the commands instead of running them
#   -h, --help                                     this text
#   PYTHON                                         interpreter of the virtualenv (default python3)

set -euo pipefail

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo="$(dirname "$(dirname "$script")")"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-}}"
gpus_per_node="${gpus_per_node##*:}"  # SLURM writes a typed request as TYPE:COUNT.
nodes="${NODES:-${SLURM_JOB_NUM_NODES:-}}"
port="${COORDINATOR_PORT:-29500}"
coordinator="${COORDINATOR_ADDRESS:-}"
num_processes="${NUM_PROCESSES:-${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-}}}"
process_id="${PROCESS_ID:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-}}}"
workdir="${FLOWCEPTION_WORKDIR:-}"
log_dir="${FLOWCEPTION_LOG_DIR:-}"
venv="${FLOWCEPTION_VENV:-${repo}/.venv}"
jax="${JAX_REQUIREMENT:-jax[cuda12]}"
log_sync="${LOG_SYNC:-60}"
python="${PYTHON:-python3}"
mode=launch
dry_run=0

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  cat <<EOF
Current settings: gpus_per_node=${gpus_per_node:-<required>} nodes=${nodes:-<the allocation>}
  port=${port} coordinator=${coordinator:-<first host>}
  num_processes=${num_processes:-<cluster manager>} process_id=${process_id:-<cluster manager>}
  workdir=${workdir:-<the --workdir of the job>} log_dir=${log_dir:-<WORKDIR/logs/TIME>}
  venv=${venv} jax=${jax} log_sync=${log_sync} python=${python}
EOF
}

die() {
  echo "gpu_multinode.sh: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --coordinator=*) coordinator="${1#*=}" ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --process_id=*) process_id="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --jax=*) jax="${1#*=}" ;;
    --log_sync=*) log_sync="${1#*=}" ;;
    --setup) mode=setup ;;
    --worker) mode=worker ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
job=("$@")

run() {  # Runs a command, or prints it with --dry_run.
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

setup_venv() {
  run "${repo}/launch/job.sh" setup --venv="$venv" --python="$python" --jax="$jax"
}

check_job() {  # The JOB is given, and so is the directory of its logs.
  ((${#job[@]})) || die "give the job after --, e.g. -- python -m flowception_jax.main" \
    "--config=configs/shapes.py --workdir=/shared/runs/NAME"
  [[ -z "$log_dir" ]] || return 0
  local i
  for ((i = 0; i < ${#job[@]}; i++)); do
    case "${job[i]}" in
      --workdir=*) [[ -n "$workdir" ]] || workdir="${job[i]#*=}" ;;
      --workdir) [[ -n "$workdir" ]] || workdir="${job[i + 1]:-}" ;;
    esac
  done
  [[ -n "$workdir" ]] || die "no directory for the logs: give --workdir=DIR among the job's" \
    "flags, or --workdir=DIR (FLOWCEPTION_WORKDIR) or --log_dir=DIR before --"
  log_dir="${workdir%/}/logs/$(date -u +%Y%m%d-%H%M%S)"
}

launch() {  # Under SLURM: sets up the virtualenv, then one --worker per host through srun.
  [[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM allocation (run it from an sbatch" \
    "script or salloc), or run --setup once and then --worker on every host (see --help)"
  check_job
  [[ -n "$gpus_per_node" ]] || die "give --gpus_per_node=G (or GPUS_PER_NODE), the GPUs of each" \
    "host, or allocate with --gpus-per-node"
  [[ -n "$nodes" ]] || die "give --nodes=N (or NODES), the hosts"
  setup_venv
  local handed=(--port="$port" --venv="$venv" --log_dir="$log_dir" --log_sync="$log_sync")
  [[ -z "$coordinator" ]] || handed+=(--coordinator="$coordinator")
  run srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus_per_node" \
    "$script" --worker "${handed[@]}" -- "${job[@]}"
}

worker() {  # One process: its id, the count and the coordinator, then the job under job.sh.
  check_job
  if [[ -z "$num_processes" || -z "$process_id" ]]; then
    die "no process id or count; run under srun (SLURM) or mpirun (Open MPI), or give" \
      "--num_processes and --process_id"
  fi
  if [[ -z "$coordinator" ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "give --coordinator=HOST:PORT (process 0's host)"
    local hosts
    hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
    # The first host (no `head`: its early exit is an error).
    coordinator="${hosts%%$'\n'*}:${port}"
  fi
  local command=("${job[@]}" --coordinator_address="$coordinator" --num_processes="$num_processes"
                 --process_id="$process_id")
  local job_sh=("${repo}/launch/job.sh" run --venv="$venv" --log_dir="$log_dir"
                --name="process_${process_id}" --sync_seconds="$log_sync" -- "${command[@]}")
  if ((dry_run)); then
    run "${job_sh[@]}"
  else
    exec "${job_sh[@]}"
  fi
}

case "$mode" in
  setup) ((${#job[@]} == 0)) || die "--setup takes no job after --"; setup_venv ;;
  launch) launch ;;
  worker) worker ;;
esac
