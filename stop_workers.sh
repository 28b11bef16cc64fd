#!/usr/bin/env bash
# Stop the workers and the reconciler start_workers.sh started: SIGTERM (a worker's warm shutdown;
# a download in progress is handed back to the queue at once, keeping its bytes and its attempt),
# wait up to STOP_TIMEOUT seconds, then SIGKILL whatever is left (worker, work horse, scheduler).
# PID files are removed. Anything cut short stays 'processing' and is re-queued by the reconciler.
#
# Stopping needs nothing but the PID files: only PID_DIR and STOP_TIMEOUT are read (from the
# environment, else from .env), each on its own, and nothing is validated beyond them, so a bad value
# elsewhere in .env never keeps the workers from being stopped. udemy-dl itself is not needed.
set -euo pipefail

readonly RET_OK=0
readonly DEFAULT_PID_DIR=./run
readonly DEFAULT_STOP_TIMEOUT=30
readonly MAX_STOP_TIMEOUT=2147483647
readonly KILL_WAIT=10  # seconds to wait for a SIGKILLed process to be gone

cd "$(dirname "${BASH_SOURCE[0]}")"

trim() {  # trim TEXT: without leading and trailing white space
  local text="$1"
  text="${text#"${text%%[![:space:]]*}"}"
  printf '%s' "${text%"${text##*[![:space:]]}"}"
}

dotenv_value() {  # dotenv_value NAME: NAME's value in ./.env as python-dotenv reads a plain line (last one wins)
  local name="$1" line value="" pattern
  pattern="^[[:space:]]*(export[[:space:]]+)?${name}[[:space:]]*=(.*)$"
  [[ -r .env ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ $pattern ]] || continue
    value="$(trim "${BASH_REMATCH[2]}")"
    case "$value" in
      \'*) value="${value:1}" && value="${value%%\'*}" ;;  # 'single quoted': taken as it is
      \"*) value="${value:1}" && value="${value%%\"*}" ;;  # "double quoted"
      *) value="$(trim "$(sed -E 's/[[:space:]]+#.*$//' <<<"$value")")" ;;  # unquoted: ' # comment' dropped
    esac
  done <.env
  printf '%s' "$value"
}

setting() {  # setting NAME: the environment's value if it is set (even empty, as udemy-dl reads it), else .env's
  local name="$1"
  if [[ -n "${!name+set}" ]]; then
    trim "${!name}"
  else
    dotenv_value "$name"
  fi
}

PID_DIR="$(setting PID_DIR)"
PID_DIR="${PID_DIR:-$DEFAULT_PID_DIR}"
if [[ "$PID_DIR" == *'$'* ]]; then
  echo "stop_workers.sh: warning: PID_DIR ($PID_DIR) holds a \$ this script does not expand; set PID_DIR in the environment" >&2
fi
case "$PID_DIR" in
  \~ | \~/*) PID_DIR="$HOME${PID_DIR:1}" ;;  # as udemy-dl expands it
esac

STOP_TIMEOUT="$(setting STOP_TIMEOUT)"
if [[ -z "$STOP_TIMEOUT" ]]; then
  STOP_TIMEOUT="$DEFAULT_STOP_TIMEOUT"
elif [[ ! "$STOP_TIMEOUT" =~ ^[0-9]{1,10}$ ]] || ((10#$STOP_TIMEOUT < 1 || 10#$STOP_TIMEOUT > MAX_STOP_TIMEOUT)); then
  echo "stop_workers.sh: warning: STOP_TIMEOUT=$(printf '%q' "$STOP_TIMEOUT") is not a whole number of seconds from 1 to $MAX_STOP_TIMEOUT; using $DEFAULT_STOP_TIMEOUT" >&2
  STOP_TIMEOUT="$DEFAULT_STOP_TIMEOUT"
else
  STOP_TIMEOUT=$((10#$STOP_TIMEOUT))
fi

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
deadline=$((SECONDS + KILL_WAIT))
while ((${#pids[@]})) && alive && ((SECONDS < deadline)); do
  sleep 0.05
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
