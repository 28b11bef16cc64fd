"""Named crash points for fault tests: off unless UDEMY_DL_CRASH_AT names one.

The fault suite kills a process at an exact step boundary instead of guessing with timers:
it sets UDEMY_DL_CRASH_AT to a point's name (and UDEMY_DL_CRASH_MARKER to a file path), and
the first process to reach that point creates the marker and acts, once: the marker makes the
run that replaces the killed one go through. UDEMY_DL_CRASH_ACTION says what happens there:

- (unset) `kill`: SIGKILL this process, as an out-of-memory kill or a power cut would;
- `kill-worker`: SIGKILL this process's parent (the RQ worker of a work horse), then itself;
- `flush-redis`: empty Redis (a Redis restart that lost its data) and go on; with the caller's
  client, else one made from the settings (REDIS_URL);
- `pause`: wait, up to UDEMY_DL_CRASH_PAUSE seconds (600 by default), until a file named like the
  marker plus `.go` exists, then go on: the test does something to the world meanwhile (cuts the
  process off from Redis, say) and then lets it continue.

Several actions, comma-separated, are taken in turn (`flush-redis,pause`: Redis empties, then the
run waits while the test looks at what the rest of the service makes of it).

UDEMY_DL_CRASH_SKIP=<n> lets a process pass the point n times before it acts there (mid_fetch is
reached at every chunk: skipping a few leaves bytes on disk for the next run to resume from).

Never set in production; when the variable is unset each call is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Protocol

from .connection import redis_connection
from .settings import get_settings

log = logging.getLogger(__name__)

CRASH_AT = "UDEMY_DL_CRASH_AT"
CRASH_MARKER = "UDEMY_DL_CRASH_MARKER"
CRASH_ACTION = "UDEMY_DL_CRASH_ACTION"
CRASH_PAUSE = "UDEMY_DL_CRASH_PAUSE"
CRASH_SKIP = "UDEMY_DL_CRASH_SKIP"

KILL = "kill"
KILL_WORKER = "kill-worker"
FLUSH_REDIS = "flush-redis"
PAUSE = "pause"
ACTIONS = (KILL, KILL_WORKER, FLUSH_REDIS, PAUSE)

GO_SUFFIX = ".go"
"""A paused process goes on once `<marker>.go` exists."""

# The job's step boundaries, in the order a run passes them.
AFTER_LEASE = "after_lease"
AFTER_ATTEMPT = "after_attempt"
MID_FETCH = "mid_fetch"
AFTER_RECORD = "after_record"
AFTER_RENAME = "after_rename"
AFTER_COMPLETED = "after_completed"
AFTER_WEBHOOK = "after_webhook"
AFTER_FAILED = "after_failed"
# The reconciler's: holding the lease of a task it is about to settle, and just after settling it.
RECONCILER_LEASED = "reconciler_leased"
RECONCILER_SETTLED = "reconciler_settled"
# A worker's: registered in Redis, before RQ installs its stop handlers.
WORKER_REGISTERED = "worker_registered"

JOB_POINTS = (AFTER_LEASE, AFTER_ATTEMPT, MID_FETCH, AFTER_RECORD, AFTER_RENAME, AFTER_COMPLETED, AFTER_WEBHOOK)
FILES_COMPLETE_POINTS = (AFTER_RECORD, AFTER_RENAME, AFTER_COMPLETED, AFTER_WEBHOOK)
"""The job points reached only once every byte of the course was fetched and verified."""
POINTS = (*JOB_POINTS, AFTER_FAILED, RECONCILER_LEASED, RECONCILER_SETTLED, WORKER_REGISTERED)

_passed: dict[str, int] = {}
"""How many times this process passed each armed point (UDEMY_DL_CRASH_SKIP)."""


class Flushable(Protocol):
    def flushall(self) -> object: ...


def crash_point(name: str, redis: Flushable | None = None) -> None:
    """Act here (kill, empty Redis, pause) if the fault suite asked for point *name*, once."""
    if os.environ.get(CRASH_AT) != name:
        return
    skip = int(os.environ.get(CRASH_SKIP) or 0)
    if skip:
        _passed[name] = _passed.get(name, 0) + 1
        if _passed[name] <= skip:
            return
    marker = os.environ.get(CRASH_MARKER)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return  # it happened once already
    for action in (os.environ.get(CRASH_ACTION) or KILL).split(","):
        _act(name, action.strip(), marker, redis)


def _act(name: str, action: str, marker: str | None, redis: Flushable | None) -> None:
    if action == FLUSH_REDIS:
        log.warning("crash point %s: emptying Redis", name)
        (redis if redis is not None else _redis_from_settings()).flushall()
        return
    if action == PAUSE:
        _pause(name, marker)
        return
    if action == KILL_WORKER:
        parent = os.getppid()
        log.warning("crash point %s: killing the worker, pid %s, and this process, pid %s", name, parent, os.getpid())
        if parent > 1:
            os.kill(parent, signal.SIGKILL)
    else:
        log.warning("crash point %s: killing pid %s", name, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _pause(name: str, marker: str | None) -> None:
    if not marker:
        log.warning("crash point %s: pause without %s, going on", name, CRASH_MARKER)
        return
    go = Path(marker + GO_SUFFIX)
    deadline = time.monotonic() + float(os.environ.get(CRASH_PAUSE) or 600)
    log.warning("crash point %s: pid %s paused until %s exists", name, os.getpid(), go)
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a file the test creates
    log.warning("crash point %s: pid %s going on", name, os.getpid())


def _redis_from_settings() -> Flushable:
    return redis_connection(get_settings())
