"""Named crash points for fault tests: off unless UDEMY_DL_CRASH_AT names one.

The fault suite kills a process at an exact step boundary instead of guessing with timers:
it sets UDEMY_DL_CRASH_AT to a point's name (and UDEMY_DL_CRASH_MARKER to a file path), and
the first process to reach that point creates the marker and kills itself with SIGKILL, as an
out-of-memory kill or a power cut would. The marker makes it happen once, so the run that
replaces the killed one goes through. UDEMY_DL_CRASH_ACTION=flush-redis empties Redis at the
point instead (a Redis restart that lost its data), for the same once-only marker.

Never set in production; when the variable is unset each call is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Protocol

log = logging.getLogger(__name__)

CRASH_AT = "UDEMY_DL_CRASH_AT"
CRASH_MARKER = "UDEMY_DL_CRASH_MARKER"
CRASH_ACTION = "UDEMY_DL_CRASH_ACTION"

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

JOB_POINTS = (AFTER_LEASE, AFTER_ATTEMPT, MID_FETCH, AFTER_RECORD, AFTER_RENAME, AFTER_COMPLETED, AFTER_WEBHOOK)
POINTS = (*JOB_POINTS, AFTER_FAILED, RECONCILER_LEASED, RECONCILER_SETTLED)


class Flushable(Protocol):
    def flushall(self) -> object: ...


def crash_point(name: str, redis: Flushable | None = None) -> None:
    """Kill this process (or empty Redis) here if the fault suite asked for point *name*, once."""
    if os.environ.get(CRASH_AT) != name:
        return
    marker = os.environ.get(CRASH_MARKER)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return  # it happened once already
    if os.environ.get(CRASH_ACTION) == "flush-redis" and redis is not None:
        log.warning("crash point %s: emptying Redis", name)
        redis.flushall()
        return
    log.warning("crash point %s: killing pid %s", name, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
