#!/usr/bin/env bash
# The part of a launch that runs on each host: the project's virtualenv, and one process of a job in
# it with its output in the workdir. launch/tpu_vm.sh runs it on every TPU worker over ssh;
# launch/gpu_multinode.sh runs it in every SLURM task.
#
#   launch/job.sh setup --venv=DIR [--python=PYTHON] [--jax=REQUIREMENT]
#   launch/job.sh run --venv=DIR --log_dir=DIR [--name=NAME] [--sync_seconds=S] [--detach]
#                     -- COMMAND...
#   launch/job.sh stop [--grace=SECONDS]
#   launch/job.sh status
#
#   setup   creates the virtualenv DIR with PYTHON (default python3) unless it exists, and installs
#           this repository into it (editable, with its requirements) together with REQUIREMENT
#           (e.g. 'jax[tpu]'); later calls install again only when requirements.txt,
#           pyproject.toml or REQUIREMENT changed.
#   run     runs COMMAND, its words exactly as given, in the virtualenv from the repository root.
#           Its output goes to LOG_DIR/NAME.log (NAME: default this host's name) and to stdout.
#           A gs:// LOG_DIR is written here first (~/.flowception_job/HOST/NAME.log) and copied
#           there with `gcloud storage cp` every S seconds (default 60) and when COMMAND ends. The
#           exit status is COMMAND's; a SIGTERM or SIGINT is passed on to COMMAND (the trainer then
#           saves a checkpoint and exits). --detach starts all this apart from the caller (setsid),
#           so that it outlives the ssh connection, and returns at once.
#   stop    sends SIGTERM to the job this host runs, waits up to SECONDS (default 120) for it to
#           end, then SIGKILLs what is left of it.
#   status  whether this host runs a job, where its log is, and the log's last lines.

set -euo pipefail

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo="$(dirname "$(dirname "$script")")"
host="$(hostname)"
state="${HOME}/.flowception_job/${host}"  # Per host: a home directory may be shared.

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

die() {
  echo "job.sh on ${host}: $*" >&2
  exit 2
}

setup_venv() {  # Creates the virtualenv once; installs into it when the requirements changed.
  [[ -n "$venv" ]] || die "setup needs --venv=DIR"
  if [[ ! -x "${venv}/bin/python" ]]; then
    echo "${host}: creating the virtualenv ${venv}"
    "$python" -m venv "$venv" || die "could not create a virtualenv in ${venv} with ${python};" \
      "install its venv module (Debian, Ubuntu: sudo apt-get install python3-venv) or give" \
      "another interpreter"
  fi
  local stamp="${venv}/.flowception_installed"  # Written after an install: its JAX requirement.
  if [[ -e "$stamp" && "$(cat "$stamp")" == "$jax" && ! "${repo}/requirements.txt" -nt "$stamp"
        && ! "${repo}/pyproject.toml" -nt "$stamp" ]]; then
    echo "${host}: ${venv} is up to date"
    return
  fi
  echo "${host}: installing ${repo}${jax:+ and ${jax}} into ${venv}"
  "${venv}/bin/python" -m pip install -q -U ${jax:+"$jax"} -e "$repo"
  printf '%s\n' "$jax" > "$stamp"
}

copy_log() {  # Copies the log to its gs:// destination; on failure prints gcloud's last line.
  local error
  error="$(gcloud storage cp "$local_log" "$log" 2>&1 > /dev/null)" && return 0
  echo "${error##*$'\n'}"
  return 1
}

copy_log_periodically() {  # Runs in the background until it gets SIGTERM.
  local sleeper="" error noted=0
  trap 'kill "${sleeper:-}" 2> /dev/null; exit 0' TERM
  while true; do
    sleep "$sync_seconds" &
    sleeper=$!
    wait "$sleeper" || true
    if ! error="$(copy_log)" && ((!noted)); then  # Noted once: the log is no place for a flood.
      echo "job.sh: could not copy this log to ${log}: ${error}" >> "$local_log"
      noted=1
    fi
  done
}

run_job() {
  (($#)) || die "run needs the command after --, e.g. -- python -m flowception_jax.main" \
    "--config=configs/shapes.py --workdir=DIR"
  [[ -n "$log_dir" ]] || die "run needs --log_dir=DIR"
  [[ -x "${venv}/bin/python" ]] || die "no virtualenv in ${venv:-<unset>}; set it up first" \
    "(launch/tpu_vm.sh setup, launch/gpu_multinode.sh --setup)"
  local running
  running="$(cat "${state}/pid" 2> /dev/null || true)"
  if [[ -n "$running" ]] && kill -0 "$running" 2> /dev/null; then
    die "a job is running here already (pid ${running}); stop it first (launch/tpu_vm.sh stop)"
  fi
  log="${log_dir%/}/${name}.log"
  if [[ "$log" == gs://* ]]; then
    local_log="${state}/${name}.log"
  else
    local_log="$log"
  fi
  mkdir -p "$state" "$(dirname "$local_log")"
  : > "$local_log" || die "cannot write ${local_log}"
  if ((detach)); then
    setsid nohup "$script" run --venv="$venv" --log_dir="$log_dir" --name="$name" \
      --sync_seconds="$sync_seconds" -- "$@" > /dev/null 2>&1 < /dev/null &
    local words
    words="$(printf '%q ' "$@")"
    echo "${host}: started ${words% }; log in ${log}"
    return
  fi

  echo "$$" > "${state}/pid"
  printf '%s\n' "$local_log" "$log" > "${state}/log"
  export VIRTUAL_ENV="$venv" PATH="${venv}/bin:${PATH}" PYTHONUNBUFFERED=1
  cd "$repo"
  "$@" >> "$local_log" 2>&1 < /dev/null &
  job_pid=$!
  trap 'kill -TERM "$job_pid" 2> /dev/null || true' TERM INT
  tail -n +1 -f -s 0.1 --pid="$job_pid" "$local_log" &  # Ends within 0.1 s of the job.
  local tailer=$! syncer=""
  if [[ "$log" != "$local_log" ]]; then
    copy_log_periodically &
    syncer=$!
  fi
  local status
  while true; do
    status=0
    wait "$job_pid" || status=$?
    # A trapped signal interrupts `wait` (status above 128) while the job still runs (or has not
    # been reaped yet): wait again for its own status.
    ((status > 128)) && kill -0 "$job_pid" 2> /dev/null && continue
    break
  done
  wait "$tailer" || true
  if [[ -n "$syncer" ]]; then
    kill "$syncer" 2> /dev/null || true
    wait "$syncer" || true
    local error
    if ! error="$(copy_log)"; then
      echo "job.sh: could not copy the log to ${log} (${error}); it stays in ${local_log} on" \
        "${host}" | tee -a "$local_log" >&2
    fi
  fi
  rm -f "${state}/pid"
  exit "$status"
}

stop_job() {
  local pid
  pid="$(cat "${state}/pid" 2> /dev/null || true)"
  if [[ -z "$pid" ]] || ! kill -0 "$pid" 2> /dev/null; then
    rm -f "${state}/pid"
    echo "${host}: no job running"
    return
  fi
  kill -TERM "$pid"
  local waited
  for ((waited = 0; waited < grace * 10; waited++)); do  # Tenths of a second.
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2> /dev/null; then
    kill -KILL -- "-${pid}" 2> /dev/null || true  # A detached job leads its own process group.
    echo "${host}: the job did not end within ${grace}s of SIGTERM; killed it"
  fi
  rm -f "${state}/pid"
  echo "${host}: stopped"
}

show_status() {
  local pid logs=()
  pid="$(cat "${state}/pid" 2> /dev/null || true)"
  [[ ! -e "${state}/log" ]] || mapfile -t logs < "${state}/log"
  local where="${logs[1]:-<none>}"
  [[ "${logs[0]:-}" == "${logs[1]:-}" ]] || where="${logs[0]} (copied to ${logs[1]})"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2> /dev/null; then
    echo "${host}: running (pid ${pid}), log ${where}"
  else
    echo "${host}: not running, last log ${where}"
  fi
  [[ -z "${logs[0]:-}" ]] || tail -n 3 "${logs[0]}" 2> /dev/null || true
}

venv=""
python="python3"
jax=""
log_dir=""
name="$host"
sync_seconds=60
detach=0
grace=120
action="${1:-}"
[[ $# -eq 0 ]] || shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv=*) venv="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --jax=*) jax="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --sync_seconds=*) sync_seconds="${1#*=}" ;;
    --detach) detach=1 ;;
    --grace=*) grace="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

case "$action" in
  setup) setup_venv ;;
  run) run_job "$@" ;;
  stop) stop_job ;;
  status) show_status ;;
  -h|--help) usage ;;
  "") die "give a command: setup, run, stop or status (see --help)" ;;
  *) die "unknown command ${action}; known: setup, run, stop, status" ;;
esac
