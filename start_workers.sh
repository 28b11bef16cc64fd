#!/usr/bin/env bash
# Start WORKER_COUNT udemy_dl workers in the background: one PID file and one log each.
# Settings come from the environment and .env (environment wins), validated by udemy-dl itself.
# A worker whose PID file names a live process is left running, not started twice.
set -euo pipefail

readonly RET_OK=0
readonly RET_NO_BINARY=2
readonly RET_CONFIG=3
readonly RET_START_FAILED=6
readonly START_WAIT=15   # seconds a new worker has to register before we call it failed

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
mkdir -p "$PID_DIR" "$LOG_DIR"

host="$(hostname)"
is_our_worker() {  # is_our_worker PID: a live process running udemy-dl
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl'
}

started=()
# No signal may fall between starting a worker and recording its PID: hold INT/TERM meanwhile.
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
      for member in $(pgrep -g "$old_pid" || true); do
        tr '\0' ' ' <"/proc/$member/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl' && { kill -KILL "$member" 2>/dev/null || true; }
      done
    fi
    rm -f "$pid_file"
  fi
  # setsid: the worker outlives this shell and its terminal; SIGTERM reaches it alone.
  setsid "$UDEMY_DL" worker --name "udemy-dl.$host.$n" >>"$log_file" 2>&1 </dev/null &
  echo "$!" >"$pid_file"
  started+=("$n")
done
# One reconciler per server: it re-enqueues work whose worker died and repairs drift from the database.
reconciler_pid_file="$PID_DIR/reconciler.pid"
reconciler_pid="$(cat "$reconciler_pid_file" 2>/dev/null || true)"
if is_our_worker "$reconciler_pid"; then
  echo "reconciler already running (pid $reconciler_pid)"
  reconciler_pid=""
else
  setsid "$UDEMY_DL" reconciler >>"$LOG_DIR/reconciler.log" 2>&1 </dev/null &
  reconciler_pid="$!"
  echo "$reconciler_pid" >"$reconciler_pid_file"
fi
trap - INT TERM

failed=0
for n in "${started[@]}"; do
  pid_file="$PID_DIR/rq_worker_$n.pid"
  log_file="$LOG_DIR/rq_worker_$n.log"
  pid="$(cat "$pid_file")"
  deadline=$((SECONDS + START_WAIT))
  until grep -q "udemy-dl.$host.$n: started with PID $pid," "$log_file" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
      echo "worker $n failed to start; last lines of $log_file:" >&2
      tail -n 15 "$log_file" >&2 || true
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$pid_file"
      failed=1
      break
    fi
    sleep 0.1
  done
  ((failed)) || echo "worker $n started (pid $pid, log $log_file)"
done
if [[ -n "$reconciler_pid" ]]; then
  if kill -0 "$reconciler_pid" 2>/dev/null; then
    echo "reconciler started (pid $reconciler_pid, log $LOG_DIR/reconciler.log)"
  else
    echo "reconciler failed to start; see $LOG_DIR/reconciler.log" >&2
    rm -f "$reconciler_pid_file"
    failed=1
  fi
fi
((failed)) && exit "$RET_START_FAILED"

# Tasks a previous run left 'processing' with no live job (e.g. a worker killed mid-download)
# are handed back to the queue now; their fetched bytes are reused.
"$UDEMY_DL" reconcile || echo "start_workers.sh: reconcile failed; run 'udemy-dl reconcile' later" >&2
exit "$RET_OK"
