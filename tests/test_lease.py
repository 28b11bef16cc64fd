"""Per-task leases on a real Redis: one run of a task at a time, renewed while it runs, taken over from the dead;
and the staging lock that keeps two runs on one host from writing a task's staging folder at once."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis import Redis

from tests.support.waiting import wait_for
from udemy_dl import folders
from udemy_dl.errors import LeaseBusyError
from udemy_dl.folders import staging_lock, staging_path
from udemy_dl.lease import TaskLease, lease_key
from udemy_dl.settings import Settings

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


# -- the staging lock on this host ----------------------------------------------------------------


def test_staging_lock_excludes_a_second_run_and_leaves_no_file(configure: Callable[..., Settings]) -> None:
    """The staging lock, beside the lease: a second run of the task on this host steps aside while the first
    holds it (another task is not affected), and once the first lets go no `<taskId>.lock` file is left,
    though the task's staging folder stays for its retry."""
    settings = configure()
    lock_file = settings.staging_dir / f"{TASK}.lock"
    with staging_lock(settings, TASK):
        staging_path(settings, TASK).mkdir()  # the attempt's bytes, kept for the retry
        assert lock_file.exists()
        with pytest.raises(LeaseBusyError), staging_lock(settings, TASK):
            pass
        with staging_lock(settings, TASK + 1):
            pass
    assert sorted(path.name for path in settings.staging_dir.iterdir()) == [str(TASK)]
    with staging_lock(settings, TASK):  # the next run takes it again
        assert lock_file.exists()


def test_a_run_that_opened_the_lock_file_as_its_holder_removed_it_locks_the_new_one(
    configure: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder removes the lock file as it lets go. A run that had opened that file just before locks a file
    no longer there, which guards nothing: it must open the file anew, so that a third run still steps aside."""
    settings = configure()
    held, release = threading.Event(), threading.Event()

    def first_run() -> None:
        with staging_lock(settings, TASK):
            held.set()
            release.wait(timeout=30)

    first = threading.Thread(target=first_run, daemon=True)
    first.start()
    assert held.wait(timeout=30)
    real_open = open
    opened: list[str] = []

    def open_as_the_holder_lets_go(path: Any, mode: str) -> Any:
        handle = real_open(path, mode)
        if not opened:  # the second run's first open: the holder lets go (and removes the file) right after it
            opened.append(str(path))
            release.set()
            first.join(timeout=30)
            assert not first.is_alive()
        return handle

    monkeypatch.setattr(folders, "open", open_as_the_holder_lets_go, raising=False)
    with staging_lock(settings, TASK):
        assert opened and (settings.staging_dir / f"{TASK}.lock").exists()
        with pytest.raises(LeaseBusyError), staging_lock(settings, TASK):
            pass
