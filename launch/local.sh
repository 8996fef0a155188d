#!/usr/bin/env bash
# Runs N processes of one training on this machine's CPU, as N hosts would run it: the way to try
# the multi-process code path (global batches, collectives, shared checkpoints) without a cluster.
#
#   launch/local.sh [options] N [flags of the module...]
#   launch/local.sh 2 --config=configs/shapes.py:tiny --workdir=/tmp/shapes_2x2
#
# Every process runs `python -m MODULE` with the given flags plus --coordinator_address (127.0.0.1
# and a free port), --num_processes=N and --process_id=I, and sees its own fake CPU devices. Process
# 0 prints to this terminal; the others write LOG_DIR/process_I.log. The script waits for all of
# them; when one fails it stops the others and exits with that first failure's status. No process
# outlives the script, whether it succeeds, fails or is interrupted.
#
# Options (or environment variables):
#   --devices_per_process=K  LOCAL_DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   --module=NAME            LOCAL_MODULE               module (default flowception_jax.main)
#   --log_dir=DIR            LOCAL_LOG_DIR              logs of processes 1.. (default: a temp dir)
#   --dry_run                                            print the commands instead of running them
#   -h, --help                                           this text
#   PYTHON                                               interpreter (default python3)

set -euo pipefail

devices_per_process="${LOCAL_DEVICES_PER_PROCESS:-2}"
module="${LOCAL_MODULE:-flowception_jax.main}"
log_dir="${LOCAL_LOG_DIR:-}"
python="${PYTHON:-python3}"
dry_run=0

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  echo "Current settings: devices_per_process=${devices_per_process} module=${module}" \
    "log_dir=${log_dir:-<temp dir>} python=${python}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "local.sh: unknown option $1 (options come before N; see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: give the number of processes N before the module's flags (see --help)" >&2
  exit 2
fi
num_processes="$1"
shift

free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port="$("$python" -c "$free_port")"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${devices_per_process}"

process_command() {  # Sets `command` to the command line of process $1 (then the module's flags).
  local i="$1"
  shift
  command=(env JAX_PLATFORMS=cpu
           "XLA_FLAGS=${xla_flags}"
           "$python" -m "$module" "$@" --coordinator_address="127.0.0.1:${port}"
           --num_processes="$num_processes" --process_id="$i")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i" "$@"
    printf '%q ' "${command[@]}"
    ((i == 0)) && echo || echo "> ${log_dir:-LOG_DIR}/process_${i}.log 2>&1"
  done
  exit 0
fi
[[ -n "$log_dir" ]] || log_dir="$(mktemp -d "${TMPDIR:-/tmp}/local_processes.XXXXXX")"
mkdir -p "$log_dir"

pids=()
stop_all() {  # Ends every process group that is still running: SIGTERM, then SIGKILL.
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set -m  # Each process gets its own process group, which stop_all ends as a whole.
for ((i = 0; i < num_processes; i++)); do
  process_command "$i" "$@"
  if ((i == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
set +m
echo "local.sh: ${num_processes} processes (${pids[*]}) on 127.0.0.1:${port}, logs of processes" \
  "1.. in ${log_dir}" >&2

running=("${!pids[@]}")
while ((${#running[@]})); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    status=0
    wait "${pids[$i]}" || status=$?
    if ((status != 0)); then
      echo "local.sh: process $i failed with status $status; stopping the others" >&2
      ((i == 0)) || tail -n 20 "${log_dir}/process_${i}.log" >&2
      exit "$status"
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]})) && sleep 0.2
done
echo "local.sh: all ${num_processes} processes finished" >&2
