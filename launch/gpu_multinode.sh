#!/usr/bin/env bash
# Flowception on N GPU hosts: one process per host, using all of its GPUs, joined through an
# explicit coordinator (process 0's host).
#
#   launch/gpu_multinode.sh [options] [-- flags of main...]           under SLURM
#   launch/gpu_multinode.sh --worker [options] [-- flags of main...]  on each host, by any launcher
#
# Under SLURM (inside an allocation: an sbatch script or salloc), the script issues
#   srun --nodes=N --ntasks=N --ntasks-per-node=1 --gpus-per-node=G launch/gpu_multinode.sh --worker
# Each task (a `--worker`) takes its process id and count from the cluster manager's environment
# (SLURM_PROCID and SLURM_NTASKS, or Open MPI's OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE), the
# coordinator from the first host of the allocation (SLURM_JOB_NODELIST), and runs
#   python -m flowception_jax.main --config=... --workdir=... --coordinator_address=HOST:PORT
#       --num_processes=N --process_id=I [flags of main]
# Without a cluster manager, run `--worker` on every host with --coordinator, --num_processes and
# --process_id.
#
# Settings (option, or environment variable; the defaults are printed at the end of --help):
#   --nodes=N               NODES                  hosts (default: the allocation's, else 2)
#   --gpus_per_node=G       GPUS_PER_NODE          GPUs of each host
#   --port=PORT             COORDINATOR_PORT       port of the coordinator on process 0's host
#   --coordinator=HOST:PORT COORDINATOR_ADDRESS    (worker) the coordinator (default: first host)
#   --num_processes=N       NUM_PROCESSES          (worker) instead of the cluster manager's count
#   --process_id=I          PROCESS_ID             (worker) instead of the cluster manager's id
#   --config=FILE           FLOWCEPTION_CONFIG     experiment config
#   --workdir=DIR           FLOWCEPTION_WORKDIR    workdir on storage every host shares
#   --overrides="FLAGS"     FLOWCEPTION_OVERRIDES  more flags of main (before those after --)
#   --dry_run                                      print the command instead of running it
#   -h, --help                                     this text
#   PYTHON                                         interpreter (default python3)

set -euo pipefail

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo="$(dirname "$(dirname "$script")")"
nodes="${NODES:-${SLURM_JOB_NUM_NODES:-2}}"
gpus_per_node="${GPUS_PER_NODE:-8}"
port="${COORDINATOR_PORT:-29500}"
coordinator="${COORDINATOR_ADDRESS:-}"
num_processes="${NUM_PROCESSES:-${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-}}}"
process_id="${PROCESS_ID:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-}}}"
config="${FLOWCEPTION_CONFIG:-configs/shapes.py}"
workdir="${FLOWCEPTION_WORKDIR:-}"
overrides="${FLOWCEPTION_OVERRIDES:-}"
python="${PYTHON:-python3}"
worker=0
dry_run=0

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  cat <<EOF
Current settings: nodes=${nodes} gpus_per_node=${gpus_per_node} port=${port}
  coordinator=${coordinator:-<first host>} num_processes=${num_processes:-<cluster manager>}
  process_id=${process_id:-<cluster manager>} config=${config} workdir=${workdir:-<unset>}
  overrides=${overrides:-<none>} python=${python}
EOF
}

options=()  # Settings given as options, handed on to the workers.
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --port=*) port="${1#*=}"; options+=("$1") ;;
    --coordinator=*) coordinator="${1#*=}"; options+=("$1") ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --process_id=*) process_id="${1#*=}" ;;
    --config=*) config="${1#*=}"; options+=("$1") ;;
    --workdir=*) workdir="${1#*=}"; options+=("$1") ;;
    --overrides=*) overrides="${1#*=}"; options+=("$1") ;;
    --worker) worker=1 ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu_multinode.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {  # Runs a command, or prints it with --dry_run.
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ -z "$workdir" ]]; then
  echo "gpu_multinode.sh: give --workdir (or FLOWCEPTION_WORKDIR), a directory every host" \
    "shares" >&2
  exit 2
fi

if ((!worker)); then
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "gpu_multinode.sh: not inside a SLURM allocation (run it from an sbatch script or" \
      "salloc), or run it with --worker on every host (see --help)" >&2
    exit 2
  fi
  run srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
    --gpus-per-node="$gpus_per_node" "$script" --worker "${options[@]+"${options[@]}"}" -- "$@"
  exit 0
fi

if [[ -z "$num_processes" || -z "$process_id" ]]; then
  echo "gpu_multinode.sh: no process id or count; run under srun (SLURM) or mpirun (Open MPI)," \
    "or give --num_processes and --process_id" >&2
  exit 2
fi
if [[ -z "$coordinator" ]]; then
  if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "gpu_multinode.sh: give --coordinator=HOST:PORT (process 0's host)" >&2
    exit 2
  fi
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
  coordinator="${hosts%%$'\n'*}:${port}"  # The first host (no `head`: its early exit is an error).
fi
read -r -a extra <<< "$overrides"
main=("$python" -m flowception_jax.main --config="$config" --workdir="$workdir"
      --coordinator_address="$coordinator" --num_processes="$num_processes"
      --process_id="$process_id" "${extra[@]+"${extra[@]}"}" "$@")
cd "$repo"
if ((dry_run)); then
  printf '%q ' "${main[@]}"
  echo
else
  exec "${main[@]}"
fi
