#!/usr/bin/env bash
# Start WORKER_COUNT udemy_dl workers in the background: one PID file and one log each, and one
# reconciler. Settings come from the environment and .env (environment wins), validated by udemy-dl
# itself; Redis and the database must answer before anything is started.
# A worker whose PID file names a live process is left running, not started twice.
# On any failure exit, everything this run started is stopped again and its PID files removed.
set -euo pipefail

readonly RET_OK=0
readonly RET_NO_BINARY=2
readonly RET_CONFIG=3         # a setting is missing or malformed: nothing was started
readonly RET_START_FAILED=6   # a worker or the reconciler did not start: what this run started is stopped
readonly RET_UNREACHABLE=7    # Redis or the database does not answer, or has no download_tasks table: nothing was started
readonly START_WAIT=15        # seconds a new worker or reconciler has to report before we call it failed
readonly KILL_WAIT=10         # seconds to wait for a SIGKILLed process to be gone

cd "$(dirname "${BASH_SOURCE[0]}")"

UDEMY_DL="${UDEMY_DL_BIN:-$PWD/.venv/bin/udemy-dl}"
if [[ ! -x "$UDEMY_DL" ]]; then
  UDEMY_DL="$(command -v udemy-dl || true)"
fi
if [[ -z "$UDEMY_DL" ]]; then
  echo "start_workers.sh: udemy-dl not found (run 'make install' or set UDEMY_DL_BIN)" >&2
  exit "$RET_NO_BINARY"
fi

if ! settings="$("$UDEMY_DL" shell-settings)"; then
  echo "start_workers.sh: fix the configuration above, nothing was started" >&2
  exit "$RET_CONFIG"
fi
eval "$settings"

# Before anything starts: what a worker needs must be set, Redis and the database must answer, and
# the database must hold the download_tasks table `udemy-dl db init` creates (a worker that cannot
# record anything must not take jobs).
check_status=0
check_output="$("$UDEMY_DL" --log-level WARNING health --no-workers 2>&1)" || check_status=$?
case "$check_status" in
  0) ;;
  "$RET_CONFIG")
    printf '%s\n' "$check_output" >&2
    echo "start_workers.sh: fix the configuration above, nothing was started" >&2
    exit "$RET_CONFIG"
    ;;
  4 | 5)
    printf '%s\n' "$check_output" >&2
    echo "start_workers.sh: Redis or the database is not ready (see above), nothing was started" >&2
    exit "$RET_UNREACHABLE"
    ;;
  *)
    printf '%s\n' "$check_output" >&2
    echo "start_workers.sh: the check before starting failed (exit $check_status), nothing was started" >&2
    exit "$RET_START_FAILED"
    ;;
esac
if ! mkdir -p "$PID_DIR" "$LOG_DIR"; then
  echo "start_workers.sh: cannot create PID_DIR ($PID_DIR) or LOG_DIR ($LOG_DIR), nothing was started" >&2
  exit "$RET_START_FAILED"
fi

host="$(hostname)"
is_our_worker() {  # is_our_worker PID: a live process running udemy-dl
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl'
}

running() {  # running PID: the process exists and is not a zombie waiting to be reaped
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != "Z" ]]
}

kill_leftovers() {  # kill_leftovers PGID: SIGKILL the udemy-dl processes left in a process group
  local member
  for member in $(pgrep -g "$1" || true); do
    tr '\0' ' ' <"/proc/$member/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl' && { kill -KILL "$member" 2>/dev/null || true; }
  done
  return 0
}

ours=()       # PIDs this run started (each the leader of its own process group: setsid)
our_files=()  # and their PID files

# shellcheck disable=SC2317  # called from the EXIT trap
any_running() {
  local pid
  for pid in "${ours[@]}"; do
    running "$pid" && return 0
  done
  return 1
}

# shellcheck disable=SC2317  # the EXIT trap
undo_start() {  # EXIT trap: on a failure exit, stop what this run started, so nothing is left running
  local status=$? pid horse deadline
  trap - EXIT
  trap '' INT TERM
  if ((status != 0 && ${#ours[@]} > 0)); then
    echo "start_workers.sh: stopping the ${#ours[@]} process(es) this run started" >&2
    for pid in "${ours[@]}"; do
      kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    while any_running && ((SECONDS < deadline)); do
      sleep 0.1
    done
    for pid in "${ours[@]}"; do
      if running "$pid"; then
        # The work horse runs in its own process group: kill it (and what it started) first.
        for horse in $(pgrep -P "$pid" || true); do
          kill -KILL -- "-$horse" 2>/dev/null || kill -KILL "$horse" 2>/dev/null || true
        done
        kill -KILL "$pid" 2>/dev/null || true
      fi
      kill_leftovers "$pid"  # its scheduler, if it outlived it
    done
    deadline=$((SECONDS + KILL_WAIT))
    while any_running && ((SECONDS < deadline)); do
      sleep 0.05
    done
    rm -f "${our_files[@]}"
  fi
  exit "$status"
}
trap undo_start EXIT

started=()
# No signal may fall between starting a process and recording its PID: hold INT/TERM meanwhile.
trap '' INT TERM
for ((n = 1; n <= WORKER_COUNT; n++)); do
  pid_file="$PID_DIR/rq_worker_$n.pid"
  log_file="$LOG_DIR/rq_worker_$n.log"
  if [[ -f "$pid_file" ]]; then
    old_pid="$(cat "$pid_file" 2>/dev/null || true)"
    if is_our_worker "$old_pid"; then
      echo "worker $n already running (pid $old_pid)"
      continue
    fi
    # Stale: the worker is gone. Its scheduler may linger in its process group (setsid: pgid = pid).
    if [[ "$old_pid" =~ ^[0-9]+$ ]]; then
      kill_leftovers "$old_pid"
    fi
    rm -f "$pid_file"
  fi
  # setsid: the worker outlives this shell and its terminal; SIGTERM reaches it alone.
  setsid "$UDEMY_DL" worker --name "udemy-dl.$host.$n" >>"$log_file" 2>&1 </dev/null &
  ours+=("$!")
  our_files+=("$pid_file")
  echo "$!" >"$pid_file"
  started+=("$n")
done
# One reconciler per server: it re-enqueues work whose worker died and repairs drift from the database.
reconciler_pid_file="$PID_DIR/reconciler.pid"
reconciler_log="$LOG_DIR/reconciler.log"
reconciler_pid="$(cat "$reconciler_pid_file" 2>/dev/null || true)"
if is_our_worker "$reconciler_pid"; then
  echo "reconciler already running (pid $reconciler_pid)"
  reconciler_pid=""
else
  setsid "$UDEMY_DL" reconciler >>"$reconciler_log" 2>&1 </dev/null &
  reconciler_pid="$!"
  ours+=("$reconciler_pid")
  our_files+=("$reconciler_pid_file")
  echo "$reconciler_pid" >"$reconciler_pid_file"
fi
# From here on an interrupted start is a failed one: the EXIT trap stops what was started.
trap 'exit 130' INT
trap 'exit 143' TERM

reported() {  # reported PID LOG TEXT: true once LOG holds TEXT; false if PID dies or START_WAIT passes first
  local pid="$1" log="$2" text="$3" deadline=$((SECONDS + START_WAIT))
  until grep -qF -- "$text" "$log" 2>/dev/null; do
    if ! running "$pid" || ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.1
  done
}

for n in "${started[@]}"; do
  log_file="$LOG_DIR/rq_worker_$n.log"
  pid="$(cat "$PID_DIR/rq_worker_$n.pid")"
  if ! reported "$pid" "$log_file" "udemy-dl.$host.$n: started with PID $pid,"; then
    echo "worker $n failed to start; last lines of $log_file:" >&2
    tail -n 15 "$log_file" >&2 || true
    exit "$RET_START_FAILED"
  fi
  echo "worker $n started (pid $pid, log $log_file)"
done
if [[ -n "$reconciler_pid" ]]; then
  if ! reported "$reconciler_pid" "$reconciler_log" "[$reconciler_pid]: reconciler started"; then
    echo "reconciler failed to start; last lines of $reconciler_log:" >&2
    tail -n 15 "$reconciler_log" >&2 || true
    exit "$RET_START_FAILED"
  fi
  echo "reconciler started (pid $reconciler_pid, log $reconciler_log)"
fi

# Tasks a previous run left 'processing' with no live job (e.g. a worker killed mid-download)
# are handed back to the queue now; their fetched bytes are reused.
"$UDEMY_DL" reconcile || echo "start_workers.sh: reconcile failed; run 'udemy-dl reconcile' later" >&2
exit "$RET_OK"
