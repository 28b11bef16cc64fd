"""Per-task leases in Redis: at most one run of a task at a time, renewed while it runs.

The lease value names its holder (host, PID, job). A holder that is gone (its PID dead on this
host) can be replaced at once; elsewhere the lease simply expires LEASE_TTL seconds after its
holder's last renewal.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

from . import defaults
from .cancellation import CANCEL_POLL_INTERVAL, cancel_requested
from .errors import LeaseBusyError
from .process_control import pid_alive

log = logging.getLogger(__name__)

# Compare-and-set scripts: only the holder named by the token may renew or release. KEYS[2]
# names the last run that took the lease (kept LAST_HOLDER_TTL seconds).
# Acquire: take a free lease and note this run as its last taker.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[3])
  return 1
end
return 0
"""
# Renew: extend our lease; take it again if it vanished and no other run took it since (it
# expired during an outage, or Redis lost its data: then the last taker is gone too); 0 when
# another run holds it now or has held it meanwhile (that run's work, or a reopened task's, must
# not be settled by this one).
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('expire', KEYS[2], ARGV[3])
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if holder then return 0 end
local last = redis.call('get', KEYS[2])
if last and last ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[3])
return 2
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


CONFIRM_RETRY_SECONDS = 0.5
"""How often still_held() asks again while Redis does not answer."""


LAST_HOLDER_TTL = 7 * 24 * 3600
"""Seconds the name of a task's last lease taker is kept: longer than any run lasts, so a run that
finds its lease expired can tell whether another run has taken it since."""


def lease_key(task_id: int) -> str:
    return f"udemy_dl:lease:{task_id}"


def last_holder_key(task_id: int) -> str:
    return f"udemy_dl:lease-last:{task_id}"


class TaskLease:
    """Hold `udemy_dl:lease:<taskId>` for one run; `with lease:` acquires, renews and releases it."""

    def __init__(
        self,
        connection: Redis,
        task_id: int,
        job_id: str = "",
        ttl: int = defaults.LEASE_TTL,
        also_set: threading.Event | None = None,
        watch_cancel: bool = False,
    ) -> None:
        self.connection = connection
        self.task_id = task_id
        self.key = lease_key(task_id)
        self.last_key = last_holder_key(task_id)
        self.ttl_ms = ttl * 1000
        self.token = f"{socket.gethostname()}|{os.getpid()}|{job_id}|{uuid.uuid4().hex}"
        self.lost = threading.Event()
        """Set when a renewal finds the lease gone or taken: the run must stop."""
        self.taken_over = False
        """Redis said another run holds the lease, or took it since (not merely "Redis did not answer")."""
        self.also_set = also_set
        """Another event to set when the lease is lost or the task cancelled (the fetch's stop event)."""
        self.watch_cancel = watch_cancel
        """Look for a cancel request of the task every CANCEL_POLL_INTERVAL seconds while holding it."""
        self.cancelled: str | None = None
        """The reason of a cancel request seen while renewing: the run must stop and settle it."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._confirmed = time.monotonic()
        """When Redis last confirmed the lease is ours (monotonic seconds)."""
        self._riders: list[Callable[[], None]] = []
        """What else the run holds for as long as its lease (an origin slot): renewed with it."""

    def holder(self) -> str | None:
        value = self.connection.get(self.key)
        return value.decode() if isinstance(value, bytes) else None

    def acquire(self) -> None:
        """Take the lease, replacing a dead holder on this host; raise LeaseBusyError otherwise."""
        self._confirmed = time.monotonic()
        if self._take():
            self._start_renewing()
            return
        current = self.holder()
        if current and holder_is_dead_here(current):
            if self.connection.eval(_RELEASE, 1, self.key, current) and self._take():
                log.warning("task %s: took over the lease of a dead run (%s)", self.task_id, current)
                self._start_renewing()
                return
        raise LeaseBusyError(f"task {self.task_id}: another run holds the lease ({current})")

    def _take(self) -> bool:
        return bool(
            self.connection.eval(_ACQUIRE, 2, self.key, self.last_key, self.token, self.ttl_ms, LAST_HOLDER_TTL)
        )

    def _renew(self) -> bool:
        return bool(self.connection.eval(_RENEW, 2, self.key, self.last_key, self.token, self.ttl_ms, LAST_HOLDER_TTL))

    def still_held(self) -> bool:
        """Check (and renew) now: a run about to make its work final confirms the lease is still its own.

        Redis not answering is no confirmation: it is asked again until the lease's lifetime since
        the last confirmation runs out, and then the answer is False (another run may hold it now).
        """
        while True:
            asked = time.monotonic()
            try:
                held = self._renew()
            except RedisError as exc:
                left = self._confirmed + self.ttl_ms / 1000 - time.monotonic()
                if left <= 0:
                    self._lose(f"cannot confirm the lease, Redis unreachable for its whole lifetime: {exc}")
                    return False
                time.sleep(min(CONFIRM_RETRY_SECONDS, left))
                continue
            if not held:
                self.taken_over = True
                self._lose("lease held by another run, now or since it expired")
                return False
            self._confirmed = asked  # Redis set the expiry no earlier than this
            return True

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.error("task %s: lease lost (%s); stopping this run", self.task_id, why)
        self.lost.set()
        if self.also_set is not None:
            self.also_set.set()

    def renew_with_lease(self, renew: Callable[[], None]) -> None:
        """Call *renew* after each renewal of the lease: whatever the run holds beside its lease
        (an origin slot) then lives exactly as long, and a killed run leaks it no longer."""
        self._riders.append(renew)

    def _renew_riders(self) -> None:
        for renew in list(self._riders):
            try:
                renew()
            except RedisError as exc:  # its next beat tries again; the lease decides whether the run goes on
                log.warning("task %s: renewal beside the lease failed: %s", self.task_id, exc)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.task_id}", daemon=True)
        self._thread.start()

    def cancel_seen(self, quiet: bool = False) -> str | None:
        """Ask Redis now whether the task has been cancelled (a run about to make its work final
        asks, rather than wait for the next poll); a Redis error is no answer (None)."""
        if self.cancelled is None:
            try:
                self.cancelled = cancel_requested(self.connection, self.task_id)
            except RedisError as exc:  # during an outage the renewals report it, every beat
                log.log(logging.DEBUG if quiet else logging.WARNING, "task %s: no cancel check: %s", self.task_id, exc)
        return self.cancelled

    def _watch_cancel(self) -> None:
        if self.watch_cancel and self.cancel_seen(quiet=True) is not None:
            log.warning("task %s: cancel requested (%s); stopping this run", self.task_id, self.cancelled)
            if self.also_set is not None:
                self.also_set.set()

    def _renew_loop(self) -> None:
        interval = self.ttl_ms / 3000
        tick = min(CANCEL_POLL_INTERVAL, interval) if self.watch_cancel else interval
        due = time.monotonic() + interval
        while not self._stop.wait(tick):
            if self.cancelled is None:
                self._watch_cancel()
            if time.monotonic() < due:
                continue
            due = time.monotonic() + interval
            asked = time.monotonic()
            try:
                renewed = self._renew()
            except RedisError as exc:
                if time.monotonic() - self._confirmed >= self.ttl_ms / 1000:
                    # Cut off for the lease's whole lifetime: it has expired, and another run may
                    # hold it. Stop rather than go on beside that run.
                    self._lose(f"Redis unreachable for the lease's whole lifetime: {exc}")
                    return
                log.warning("task %s: lease renewal failed: %s", self.task_id, exc)
                continue  # Redis away for a moment: try again next beat
            if not renewed:
                self.taken_over = True
                self._lose("lease held by another run, now or since it expired")
                return
            self._confirmed = asked
            self._renew_riders()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.connection.eval(_RELEASE, 1, self.key, self.token)
        except RedisError as exc:  # it expires by itself
            log.warning("task %s: lease release failed: %s", self.task_id, exc)

    def __enter__(self) -> TaskLease:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def lease_is_held(connection: Redis, task_id: int) -> bool:
    """Does a run hold the task's lease? A holder known dead (its PID gone on this host) does not.

    Clock-free: the lease lives by Redis's own expiry, renewed by its run."""
    value = connection.get(lease_key(task_id))
    return isinstance(value, bytes) and not holder_is_dead_here(value.decode())


def holder_is_dead_here(token: str) -> bool:
    """Does *token* (a lease value, or any holder named the same way) name a process of this host
    that is no longer running?"""
    host, _, rest = token.partition("|")
    pid_text = rest.split("|", 1)[0]
    return host == socket.gethostname() and pid_text.isdigit() and not pid_alive(int(pid_text))
