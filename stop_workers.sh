#!/usr/bin/env bash
# Stop the workers and the reconciler start_workers.sh started: SIGTERM (a worker's warm shutdown;
# a download in progress is handed back to the queue at once, keeping its bytes and its attempt),
# wait up to STOP_TIMEOUT seconds, then SIGKILL whatever is left (worker, work horse, scheduler).
# PID files are removed. Anything cut short stays 'processing' and is re-queued by the reconciler.
set -euo pipefail

readonly RET_OK=0
readonly RET_NO_BINARY=2
readonly RET_CONFIG=3

cd "$(dirname "${BASH_SOURCE[0]}")"

UDEMY_DL="${UDEMY_DL_BIN:-$PWD/.venv/bin/udemy-dl}"
if [[ ! -x "$UDEMY_DL" ]]; then
  UDEMY_DL="$(command -v udemy-dl || true)"
fi
if [[ -z "$UDEMY_DL" ]]; then
  echo "stop_workers.sh: udemy-dl not found (set UDEMY_DL_BIN)" >&2
  exit "$RET_NO_BINARY"
fi
if ! settings="$("$UDEMY_DL" shell-settings)"; then
  exit "$RET_CONFIG"
fi
eval "$settings"

shopt -s nullglob
pid_files=("$PID_DIR"/rq_worker_*.pid "$PID_DIR"/reconciler*.pid)
if ((${#pid_files[@]} == 0)); then
  echo "no workers running (no PID files in $PID_DIR)"
  exit "$RET_OK"
fi

is_our_worker() {  # is_our_worker PID: a live process running udemy-dl (not a reused PID)
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl'
}

kill_leftovers() {  # kill_leftovers PGID: SIGKILL what remains of a worker's process group (its scheduler)
  local member
  for member in $(pgrep -g "$1" || true); do
    tr '\0' ' ' <"/proc/$member/cmdline" 2>/dev/null | grep -q 'udemy[-_]dl' && { kill -KILL "$member" 2>/dev/null || true; }
  done
  return 0
}

pids=()
for pid_file in "${pid_files[@]}"; do
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  if is_our_worker "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  fi
done
echo "sent SIGTERM to ${#pids[@]} process(es) (workers and reconciler), waiting up to ${STOP_TIMEOUT}s"

running() {  # running PID: the process exists and is not a zombie waiting to be reaped
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != "Z" ]]
}

alive() {
  local pid
  for pid in "${pids[@]}"; do
    running "$pid" && return 0
  done
  return 1
}

# Keep a second back so that the SIGKILL, too, happens within STOP_TIMEOUT.
deadline=$((SECONDS + (STOP_TIMEOUT > 1 ? STOP_TIMEOUT - 1 : 1)))
while ((${#pids[@]})) && alive && ((SECONDS < deadline)); do
  sleep 0.2
done

for pid in "${pids[@]}"; do
  if running "$pid"; then
    # The work horse runs in its own process group: kill it (and what it started) first.
    for horse in $(pgrep -P "$pid" || true); do
      kill -KILL -- "-$horse" 2>/dev/null || kill -KILL "$horse" 2>/dev/null || true
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "worker pid $pid did not stop in time: killed"
  fi
done
for pid in "${pids[@]}"; do
  while running "$pid"; do sleep 0.05; done
done
# A worker killed earlier (kill -9, OOM) may have left its scheduler behind: start_workers.sh
# ran each worker with setsid, so its process group id is its PID.
for pid_file in "${pid_files[@]}"; do
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill_leftovers "$pid"
done
rm -f "${pid_files[@]}"
echo "all workers stopped"
exit "$RET_OK"
