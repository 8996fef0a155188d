#!/usr/bin/env bash
# Flowception on a Cloud TPU VM pod slice, from creation to deletion, through
# `gcloud compute tpus tpu-vm`.
#
#   launch/tpu_vm.sh [options] create|setup|train|status|stop|delete [-- flags of main...]
#
#   create  creates the TPU VM slice.
#   setup   copies this repository to every worker and installs it with JAX for TPU.
#   train   starts `python -m flowception_jax.main` on every worker (the same command on each; the
#           processes find each other), in the background, logging to ~/flowception_train.log.
#           Flags after `--` (e.g. --config.batch_size=256) go to main after the settings'.
#   status  shows the slice's state and, on every worker, whether training runs and its last lines.
#   stop    ends training on every worker (SIGTERM: the trainer saves a checkpoint and exits; after
#           STOP_GRACE seconds, SIGKILL) and removes a TPU lock file that no process holds.
#   delete  deletes the slice.
#
# Settings (option, or environment variable; the defaults are printed at the end of --help):
#   --name=NAME                 TPU_NAME              name of the TPU VM
#   --zone=ZONE                 TPU_ZONE              zone that offers the accelerator type
#   --project=PROJECT           TPU_PROJECT           Google Cloud project (empty: gcloud's default)
#   --accelerator_type=TYPE     TPU_ACCELERATOR_TYPE  e.g. v5litepod-16, v4-32, v5p-64
#   --runtime_version=VERSION   TPU_RUNTIME_VERSION   TPU VM image for that type
#   --spot                      TPU_SPOT=1            create a Spot (preemptible) slice
#   --config=FILE               FLOWCEPTION_CONFIG    experiment config, relative to the repository
#   --workdir=DIR               FLOWCEPTION_WORKDIR   shared workdir, e.g. gs://BUCKET/runs/NAME
#   --overrides="FLAGS"         FLOWCEPTION_OVERRIDES more flags of main (before those after --)
#   --stop_grace=SECONDS        STOP_GRACE            wait for the checkpoint after SIGTERM
#   --dry_run                                         print every command instead of running it
#   -h, --help                                        this text
# A Spot slice that is preempted resumes from its last checkpoint with `create`, `setup`, `train`.

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${TPU_NAME:-flowception}"
zone="${TPU_ZONE:-us-west4-a}"
project="${TPU_PROJECT:-}"
accelerator_type="${TPU_ACCELERATOR_TYPE:-v5litepod-16}"
runtime_version="${TPU_RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
spot="${TPU_SPOT:-0}"
config="${FLOWCEPTION_CONFIG:-configs/shapes.py}"
workdir="${FLOWCEPTION_WORKDIR:-}"
overrides="${FLOWCEPTION_OVERRIDES:-}"
stop_grace="${STOP_GRACE:-120}"
dry_run=0

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  cat <<EOF
Current settings: name=${name} zone=${zone} project=${project:-<gcloud default>}
  accelerator_type=${accelerator_type} runtime_version=${runtime_version} spot=${spot}
  config=${config} workdir=${workdir:-<unset>} overrides=${overrides:-<none>}
  stop_grace=${stop_grace}
EOF
}

command=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --spot) spot=1 ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --overrides=*) overrides="${1#*=}" ;;
    --stop_grace=*) stop_grace="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$command" ]] || { echo "tpu_vm.sh: two commands: $command and $1" >&2; exit 2; }
       command="$1" ;;
  esac
  shift
done
main_flags=("$@")

run() {  # Runs a command, or prints it with --dry_run.
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

location=(--zone="$zone")
[[ -z "$project" ]] || location+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)

on_all_workers() {  # Runs the shell command $1 on every worker of the slice.
  run "${tpu_vm[@]}" ssh "$name" "${location[@]}" --worker=all --command="$1"
}

case "$command" in
  create)
    flags=(--accelerator-type="$accelerator_type" --version="$runtime_version")
    [[ "$spot" == 1 ]] && flags+=(--spot)
    run "${tpu_vm[@]}" create "$name" "${location[@]}" "${flags[@]}"
    ;;
  setup)
    archive="${TMPDIR:-/tmp}/flowception_jax_$$.tar.gz"
    run tar -czf "$archive" --exclude=.git --exclude=__pycache__ -C "$repo" .
    run "${tpu_vm[@]}" scp "$archive" "${name}:flowception_jax.tar.gz" "${location[@]}" --worker=all
    on_all_workers "set -e; rm -rf ~/flowception_jax; mkdir -p ~/flowception_jax; \
tar -xzf ~/flowception_jax.tar.gz -C ~/flowception_jax; \
python3 -m pip install -q -U 'jax[tpu]'; python3 -m pip install -q -e ~/flowception_jax"
    run rm -f "$archive"
    ;;
  train)
    if [[ -z "$workdir" ]]; then
      echo "tpu_vm.sh: train needs --workdir (or FLOWCEPTION_WORKDIR), a directory every worker" \
        "shares, e.g. gs://BUCKET/runs/${name}" >&2
      exit 2
    fi
    read -r -a extra <<< "$overrides"
    main=(python3 -m flowception_jax.main --config="$config" --workdir="$workdir"
          "${extra[@]+"${extra[@]}"}" "${main_flags[@]+"${main_flags[@]}"}")
    # setsid: training outlives the ssh session, as a process group of its own whose leader writes
    # its id for `stop` to end the group. Only that simple command goes to the background, so no
    # shell keeps the session's output open (which would hold ssh until training ends).
    on_all_workers "cd ~/flowception_jax || exit 1; \
setsid nohup sh -c 'echo \$\$ > ~/flowception_train.pid; exec \"\$@\"' sh \
$(printf '%q ' "${main[@]}")> ~/flowception_train.log 2>&1 < /dev/null & \
echo \"\$(hostname): training started, log in ~/flowception_train.log\""
    ;;
  status)
    run "${tpu_vm[@]}" describe "$name" "${location[@]}" \
      --format='value(state,acceleratorType,health)'
    on_all_workers "pid=\$(cat ~/flowception_train.pid 2>/dev/null || true); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; \
then echo \"\$(hostname): training (pid \$pid)\"; else echo \"\$(hostname): not training\"; fi; \
tail -n 3 ~/flowception_train.log 2>/dev/null || true"
    ;;
  stop)
    on_all_workers "pid=\$(cat ~/flowception_train.pid 2>/dev/null || true); \
if [ -n \"\$pid\" ]; then kill -TERM -- -\$pid 2>/dev/null || true; \
for i in \$(seq ${stop_grace}); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; \
kill -KILL -- -\$pid 2>/dev/null || true; rm -f ~/flowception_train.pid; fi; \
if ! sudo lsof -w /dev/accel* /dev/vfio/* > /dev/null 2>&1; \
then sudo rm -f /tmp/libtpu_lockfile; fi; \
echo \"\$(hostname): stopped\""
    ;;
  delete)
    run "${tpu_vm[@]}" delete "$name" "${location[@]}" --quiet
    ;;
  "")
    echo "tpu_vm.sh: give a command: create, setup, train, status, stop or delete (see --help)" >&2
    exit 2
    ;;
  *)
    echo "tpu_vm.sh: unknown command $command; known: create, setup, train, status, stop," \
      "delete" >&2
    exit 2
    ;;
esac
