#!/usr/bin/env bash
# Flowception on Cloud TPU VMs, from creation to deletion: one pod slice (a TPU VM), or several
# slices joined over the data-centre network (multislice, through a queued resource).
#
#   launch/tpu_vm.sh [settings] create|setup|status|stop|delete
#   launch/tpu_vm.sh [settings] run|recover -- JOB...
#
#   create   creates the slice: a TPU VM, or with --num_slices=N (N > 1) a queued resource of N
#            slices (nodes NAME-0 .. NAME-<N-1>), and waits until it is ACTIVE.
#   setup    copies this repository to ~/flowception_jax on every worker, creates the virtualenv
#            ~/flowception_venv there (once; later setups reuse it) and installs the package with
#            its requirements and jax[tpu] into it.
#   run      starts JOB on every worker, e.g. `python -m flowception_jax.main --config=...
#            --workdir=...` or `python -m flowception_jax.sample --workdir=...`: its words exactly
#            as given, the same on every worker, in the virtualenv, from the repository root,
#            detached from the ssh connection. Each worker's output goes to WORKDIR/logs/<UTC start
#            time>/<its host name>.log (to a gs:// workdir as a copy every LOG_SYNC seconds and at
#            the end).
#   status   the slice's state; on every worker whether the job runs, its log and last lines.
#   stop     ends the job on every worker: SIGTERM (the trainer saves a checkpoint and exits),
#            SIGKILL after STOP_GRACE seconds; removes a TPU lock file that no process holds.
#   recover  after a preemption: deletes the slice (a preempted TPU VM keeps its name in state
#            PREEMPTED; a preempted queued resource is SUSPENDED), creates it again, sets it up and
#            runs JOB, which resumes from the workdir's newest checkpoint. A slice that is still up
#            is left alone.
#   delete   deletes the slice (a queued resource with its nodes).
#
# Settings (option, or environment variable):
#   --zone=ZONE               TPU_ZONE              required: a zone that offers the accelerator
#   --accelerator_type=TYPE   TPU_ACCELERATOR_TYPE  required by create and recover: the type of one
#                                                   slice, e.g. v5litepod-16, v4-32, v5p-64
#   --runtime_version=VERSION TPU_RUNTIME_VERSION   required by create and recover: the TPU VM image
#                                                   for that type, e.g. v2-alpha-tpuv5-lite (v5e),
#                                                   tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p)
#   --name=NAME               TPU_NAME              the TPU VM, or the queued resource and the
#                                                   prefix of its nodes (default flowception)
#   --project=PROJECT         TPU_PROJECT           Google Cloud project (default: gcloud's)
#   --num_slices=N            TPU_NUM_SLICES        slices (default 1); see Multislice below
#   --spot                    TPU_SPOT=1            Spot (preemptible) capacity
#   --workdir=DIR             FLOWCEPTION_WORKDIR   where run and recover put the logs (default: the
#                                                   JOB's own --workdir)
#   --stop_grace=SECONDS      STOP_GRACE            wait after SIGTERM (default 120)
#   --log_sync=SECONDS        LOG_SYNC              period of the copy to gs:// (default 60)
#   --poll=SECONDS            TPU_POLL              period of the checks of a queued resource's
#                                                   state while it is provisioned (default 30)
#   --dry_run                                       print every command instead of running it
#   -h, --help                                      this text
#
# Multislice: a queued resource of N slices configures the multislice runtime on every worker
# (MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, in each VM's TPU
# metadata, where libtpu and jax.distributed.initialize() read them); the launcher sets none of it.
# The trainer's mesh must cross the slices along its DCN ways: N = mesh.dcn_data x mesh.dcn_fsdp,
# e.g. --config.mesh.dcn_data=N among the flags of flowception_jax.main. `run` and `recover` check
# this on the JOB's flags (given as --config.mesh.dcn_data=D and --config.mesh.dcn_fsdp=F, 1 where
# absent) and refuse a flowception_jax.main job that does not match.

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
zone="${TPU_ZONE:-}"
accelerator_type="${TPU_ACCELERATOR_TYPE:-}"
runtime_version="${TPU_RUNTIME_VERSION:-}"
name="${TPU_NAME:-flowception}"
project="${TPU_PROJECT:-}"
num_slices="${TPU_NUM_SLICES:-1}"
spot="${TPU_SPOT:-0}"
workdir="${FLOWCEPTION_WORKDIR:-}"
stop_grace="${STOP_GRACE:-120}"
log_sync="${LOG_SYNC:-60}"
poll="${TPU_POLL:-30}"
dry_run=0

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  cat <<EOF
Current settings: zone=${zone:-<required>} accelerator_type=${accelerator_type:-<required>}
  runtime_version=${runtime_version:-<required>} name=${name} project=${project:-<gcloud default>}
  num_slices=${num_slices} spot=${spot} workdir=${workdir:-<the --workdir of the job>}
  stop_grace=${stop_grace} log_sync=${log_sync} poll=${poll}
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

command=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --num_slices=*) num_slices="${1#*=}" ;;
    --spot) spot=1 ;;
    --workdir=*) workdir="${1#*=}" ;;
    --stop_grace=*) stop_grace="${1#*=}" ;;
    --log_sync=*) log_sync="${1#*=}" ;;
    --poll=*) poll="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$command" ]] || die "two commands: ${command} and $1 (see --help)"
       command="$1" ;;
  esac
  shift
done
job=("$@")

[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num_slices=${num_slices} is not a positive number"
if ((num_slices > 1)); then
  tpus=(gcloud compute tpus queued-resources)
  workers=(--node=all --worker=all)
  state_field="state.state"
else
  tpus=(gcloud compute tpus tpu-vm)
  workers=(--worker=all)
  state_field="state"
fi
location=(--zone="$zone")
[[ -z "$project" ]] || location+=(--project="$project")

run() {  # Runs a command, or prints it with --dry_run.
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_all_workers() {  # Runs the shell command $1 on every worker of every slice.
  run "${tpus[@]}" ssh "$name" "${location[@]}" "${workers[@]}" --command="$1"
}

require() {  # Stops with the fix when setting $1 (its option --$1, variable $2) is empty.
  local value="${!1}"
  [[ -n "$value" ]] || die "${command} needs --${1}=... (or ${2}): ${*:3}"
}

slice_state() {  # The slice's state; nothing if there is no such slice.
  local errors
  errors="$(mktemp)"
  if "${tpus[@]}" describe "$name" "${location[@]}" --format="value(${state_field})" \
      2> "$errors"; then
    rm -f "$errors"
    return
  fi
  if grep -q NOT_FOUND "$errors"; then
    rm -f "$errors"
    return
  fi
  cat "$errors" >&2
  rm -f "$errors"
  die "could not look up ${name} (gcloud's error above)"
}

wait_until_active() {  # A queued resource is provisioned after `create` returns.
  local state
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED|"")
        die "queued resource ${name} is ${state:-gone} instead of ACTIVE; see" \
          "gcloud compute tpus queued-resources describe ${name} ${location[*]}" ;;
    esac
    echo "tpu_vm.sh: queued resource ${name} is ${state}; checking again in ${poll}s" >&2
    sleep "$poll"
  done
}

create_slice() {
  require accelerator_type TPU_ACCELERATOR_TYPE "the type of one slice, e.g. v5litepod-16, v4-32"
  require runtime_version TPU_RUNTIME_VERSION "the TPU VM image for that type, e.g." \
    "v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p)"
  local flags=(--accelerator-type="$accelerator_type")
  if ((num_slices > 1)); then
    flags+=(--runtime-version="$runtime_version" --node-count="$num_slices" --node-prefix="$name")
  else
    flags+=(--version="$runtime_version")
  fi
  [[ "$spot" != 1 ]] || flags+=(--spot)
  run "${tpus[@]}" create "$name" "${location[@]}" "${flags[@]}"
  ((num_slices == 1 || dry_run)) || wait_until_active
}

archive=""
setup_workers() {
  archive="${TMPDIR:-/tmp}/flowception_jax_$$.tar.gz"
  trap 'rm -f "$archive"' EXIT
  run tar -czf "$archive" --exclude=.git --exclude=__pycache__ --exclude=.venv -C "$repo" .
  run "${tpus[@]}" scp "$archive" "${name}:flowception_jax.tar.gz" "${location[@]}" "${workers[@]}"
  on_all_workers "set -e; rm -rf ~/flowception_jax; mkdir -p ~/flowception_jax; \
tar -xzf ~/flowception_jax.tar.gz -C ~/flowception_jax; rm -f ~/flowception_jax.tar.gz; \
python3 -c 'import ensurepip' 2> /dev/null || \
{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; }; \
~/flowception_jax/launch/job.sh setup --venv=\"\$HOME/flowception_venv\" --jax='jax[tpu]'"
}

check_job() {  # The JOB and its logs' workdir are given; a trainer's mesh spans the slices.
  ((${#job[@]})) || die "${command} needs the job after --, e.g. launch/tpu_vm.sh ${command} --" \
    "python -m flowception_jax.main --config=configs/shapes.py --workdir=gs://BUCKET/runs/NAME"
  local i dcn_data=1 dcn_fsdp=1 main=0
  for ((i = 0; i < ${#job[@]}; i++)); do
    case "${job[i]}" in
      --workdir=*) [[ -n "$workdir" ]] || workdir="${job[i]#*=}" ;;
      --workdir) [[ -n "$workdir" ]] || workdir="${job[i + 1]:-}" ;;
      --config.mesh.dcn_data=*) dcn_data="${job[i]#*=}" ;;
      --config.mesh.dcn_fsdp=*) dcn_fsdp="${job[i]#*=}" ;;
      -m) [[ "${job[i + 1]:-}" != flowception_jax.main ]] || main=1 ;;
    esac
  done
  [[ -n "$workdir" ]] || die "${command} needs a workdir for the logs: --workdir=DIR among the" \
    "job's flags, or --workdir=DIR (or FLOWCEPTION_WORKDIR) before the command"
  ((num_slices > 1 && main)) || return 0
  [[ "$dcn_data" =~ ^[1-9][0-9]*$ && "$dcn_fsdp" =~ ^[1-9][0-9]*$ ]] \
    || die "--config.mesh.dcn_data=${dcn_data} and --config.mesh.dcn_fsdp=${dcn_fsdp} must be" \
      "positive numbers"
  ((dcn_data * dcn_fsdp == num_slices)) \
    || die "the job's mesh spans dcn_data x dcn_fsdp = ${dcn_data} x ${dcn_fsdp} slices, not" \
      "the ${num_slices} of --num_slices; add --config.mesh.dcn_data=${num_slices} to the job" \
      "(or make dcn_data x dcn_fsdp equal ${num_slices})"
}

start_job() {
  local log_dir
  log_dir="${workdir%/}/logs/$(date -u +%Y%m%d-%H%M%S)"
  on_all_workers "\"\$HOME/flowception_jax/launch/job.sh\" run --detach \
--venv=\"\$HOME/flowception_venv\" --log_dir=$(printf '%q' "$log_dir") \
--sync_seconds=$(printf '%q' "$log_sync") -- $(printf '%q ' "${job[@]}")"
}

show_status() {
  local format="value(state,acceleratorType,health)"
  ((num_slices == 1)) || format="value(state.state)"
  run "${tpus[@]}" describe "$name" "${location[@]}" --format="$format"
  on_all_workers "\"\$HOME/flowception_jax/launch/job.sh\" status"
}

stop_job() {
  on_all_workers "\"\$HOME/flowception_jax/launch/job.sh\" stop \
--grace=$(printf '%q' "$stop_grace"); if ! sudo lsof -w /dev/accel* /dev/vfio/* > /dev/null 2>&1; \
then sudo rm -f /tmp/libtpu_lockfile; fi"
}

delete_slice() {
  if ((num_slices > 1)); then
    run "${tpus[@]}" delete "$name" "${location[@]}" --force --quiet
  else
    run "${tpus[@]}" delete "$name" "${location[@]}" --quiet
  fi
}

recover() {
  check_job
  require accelerator_type TPU_ACCELERATOR_TYPE "recover creates the slice again"
  require runtime_version TPU_RUNTIME_VERSION "recover creates the slice again"
  local state=PREEMPTED
  ((dry_run)) || state="$(slice_state)"
  case "$state" in
    PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED) delete_slice ;;
    "") echo "tpu_vm.sh: there is no ${name}; creating it" >&2 ;;
    *) die "${name} is ${state}, not preempted; recover deletes only a preempted or failed" \
         "slice. To restart the job on this one: launch/tpu_vm.sh stop, then" \
         "launch/tpu_vm.sh run" ;;
  esac
  create_slice
  setup_workers
  start_job
}

[[ -n "$command" ]] || die "give a command: create, setup, run, status, stop, recover or delete" \
  "(see --help)"
case "$command" in
  create|setup|run|status|stop|recover|delete) ;;
  *) die "unknown command ${command}; known: create, setup, run, status, stop, recover, delete" ;;
esac
require zone TPU_ZONE "the zone of the slice, e.g. us-west4-a (v5e), us-central2-b (v4)"
if ((${#job[@]})) && [[ "$command" != run && "$command" != recover ]]; then
  die "${command} takes no job after --; only run and recover do"
fi
case "$command" in
  create) create_slice ;;
  setup) setup_workers ;;
  run) check_job; start_job ;;
  status) show_status ;;
  stop) stop_job ;;
  recover) recover ;;
  delete) delete_slice ;;
esac
