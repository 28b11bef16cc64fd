"""Per-task leases on a real Redis: one run of a task at a time, renewed while it runs, taken over from the dead."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from tests.support.waiting import wait_for
from udemy_dl.errors import LeaseBusyError
from udemy_dl.lease import TaskLease, lease_key

TASK = 7


def dead_pid() -> int:
    """The PID of a process of ours that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A PID on this host, other than ours, that stays alive for the test."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child.pid
    child.kill()
    child.wait(timeout=15)


def holder_token(host: str, pid: int) -> str:
    """A lease value in TaskLease's format: host|pid|job|nonce."""
    return f"{host}|{pid}|download-{TASK}|0123456789abcdef"


def plant(connection: Redis, token: str, ttl_ms: int = 60_000) -> None:
    """Make *token* the holder of TASK's lease, as another run would have."""
    assert connection.set(lease_key(TASK), token, px=ttl_ms)


def remaining_ms(connection: Redis) -> int:
    """Milliseconds TASK's lease has left (-2: no lease)."""
    value = connection.pttl(lease_key(TASK))
    assert isinstance(value, int)
    return value


def holder(connection: Redis) -> str | None:
    value = connection.get(lease_key(TASK))
    return value.decode() if isinstance(value, bytes) else None


# -- acquire and release --------------------------------------------------------------------------


def test_lease_is_held_inside_the_block_and_gone_after(redis_conn: Redis) -> None:
    """`with TaskLease(...)` stores its token under udemy_dl:lease:<taskId>, with the TTL; leaving the block
    deletes it."""
    with TaskLease(redis_conn, TASK, "download-7", ttl=30) as lease:
        assert holder(redis_conn) == lease.token
        assert lease.token.startswith(f"{socket.gethostname()}|")
        assert 0 < remaining_ms(redis_conn) <= 30_000
    assert redis_conn.exists(lease_key(TASK)) == 0
    assert not lease.lost.is_set()


def test_second_lease_on_the_same_task_is_refused(redis_conn: Redis) -> None:
    """While one run holds a task's lease, a second TaskLease raises LeaseBusyError; another task is not affected."""
    with TaskLease(redis_conn, TASK) as first:
        second = TaskLease(redis_conn, TASK)
        with pytest.raises(LeaseBusyError, match=f"task {TASK}"):
            second.acquire()
        assert holder(redis_conn) == first.token
        with TaskLease(redis_conn, TASK + 1) as other:
            assert redis_conn.get(lease_key(TASK + 1)) == other.token.encode()


def test_run_that_stepped_aside_does_not_release_the_holders_lease(redis_conn: Redis) -> None:
    """release() by a run that never got the lease leaves the holder's lease in place."""
    with TaskLease(redis_conn, TASK) as first:
        second = TaskLease(redis_conn, TASK)
        with pytest.raises(LeaseBusyError):
            second.acquire()
        second.release()
        assert holder(redis_conn) == first.token


# -- taking over ----------------------------------------------------------------------------------


def test_lease_of_a_dead_run_on_this_host_is_taken_over(redis_conn: Redis) -> None:
    """A lease naming this host and a PID that no longer runs is replaced at once, without waiting for its TTL."""
    plant(redis_conn, holder_token(socket.gethostname(), dead_pid()))
    with TaskLease(redis_conn, TASK, ttl=30) as lease:
        assert holder(redis_conn) == lease.token
        assert remaining_ms(redis_conn) <= 30_000


def test_lease_of_a_live_run_on_this_host_is_not_taken(redis_conn: Redis, live_pid: int) -> None:
    """A lease naming this host and a running PID is respected: LeaseBusyError, the lease unchanged."""
    token = holder_token(socket.gethostname(), live_pid)
    plant(redis_conn, token)
    with pytest.raises(LeaseBusyError, match=str(live_pid)):
        TaskLease(redis_conn, TASK).acquire()
    assert holder(redis_conn) == token


def test_lease_held_on_another_host_is_not_taken(redis_conn: Redis) -> None:
    """A lease from another host cannot be checked here, even if its PID is dead here: it must expire by itself."""
    token = holder_token("another-host.example", dead_pid())
    plant(redis_conn, token)
    with pytest.raises(LeaseBusyError):
        TaskLease(redis_conn, TASK).acquire()
    assert holder(redis_conn) == token


# -- renewal and loss -----------------------------------------------------------------------------


def test_renewal_keeps_the_lease_past_its_ttl(redis_conn: Redis) -> None:
    """A 2 s lease is still held after 3.5 s, and its remaining time goes back up: the holder renews it."""
    lease = TaskLease(redis_conn, TASK, ttl=2)
    lease.acquire()
    try:
        renewed = False
        last = remaining_ms(redis_conn)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert holder(redis_conn) == lease.token
            remaining = remaining_ms(redis_conn)
            renewed = renewed or remaining > last
            last = remaining
            time.sleep(0.05)  # sampling the lease over a fixed span, not waiting for an event
        assert renewed
        assert not lease.lost.is_set()
    finally:
        lease.release()
    assert redis_conn.exists(lease_key(TASK)) == 0


def test_vanished_lease_is_taken_again_by_the_renewal(redis_conn: Redis) -> None:
    """If the lease disappears (Redis restarted, or it expired during an outage) and nobody else
    holds it, the next renewal takes it again: the run goes on and is not counted lost."""
    stop = threading.Event()
    lease = TaskLease(redis_conn, TASK, ttl=1, also_set=stop)
    lease.acquire()
    try:
        redis_conn.delete(lease_key(TASK))
        wait_for(lambda: redis_conn.get(lease_key(TASK)) == lease.token.encode(), timeout=5, what="the lease retaken")
        assert not lease.lost.is_set() and not stop.is_set()
    finally:
        lease.release()


def test_still_held_confirms_the_lease_or_marks_it_lost(redis_conn: Redis) -> None:
    """Before making its work final a run asks still_held(): true while the lease is its own,
    false (and `lost` set) once another run holds it."""
    lease = TaskLease(redis_conn, TASK, ttl=30)
    lease.acquire()
    try:
        assert lease.still_held() is True
        redis_conn.set(lease_key(TASK), holder_token("another-host.example", 4242), px=60_000)
        assert lease.still_held() is False
        assert lease.lost.is_set()
    finally:
        lease.release()


def test_lease_taken_by_another_run_is_lost_and_never_released_by_us(redis_conn: Redis) -> None:
    """Another token in the key: our renewal sets `lost` and `also_set`, and our release leaves their lease alone."""
    stop = threading.Event()
    lease = TaskLease(redis_conn, TASK, ttl=1, also_set=stop)
    lease.acquire()
    theirs = holder_token("another-host.example", 4242)
    try:
        redis_conn.set(lease_key(TASK), theirs, px=60_000)
        wait_for(lease.lost.is_set, timeout=5, what="the renewal to notice another holder")
        assert stop.is_set()
    finally:
        lease.release()
    assert holder(redis_conn) == theirs
    assert remaining_ms(redis_conn) > 50_000  # not shortened by our renewal either
