"""ORIGIN_CONCURRENCY's slots and FETCH_RATE_LIMIT's byte schedule, on a real Redis (their scripts
read Redis's clock, which fakeredis does not model faithfully)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dev.devservers import ContentOrigin
from tests.support.fetching import fetcher_for
from tests.support.ports import free_port
from tests.support.waiting import wait_for
from udemy_dl.errors import HostNotAllowedError, Interrupted
from udemy_dl.lease import TaskLease
from udemy_dl.limits import SLACK_SECONDS, ByteRate, OriginSlot, origin_host, rate_key, slots_key

HOST = "cdn.example"
ELSEWHERE = "another-server"
"""A host name that is not this one: its holders' PIDs cannot be checked from here."""


def foreign(name: str) -> str:
    """A holder name in the lease token's format, from a run on another server."""
    return f"{ELSEWHERE}|4242|download-{name}|0123456789abcdef"


def slot(connection: Redis, holder: str, cap: int = 2, lifetime: float = 30) -> OriginSlot:
    return OriginSlot(connection, HOST, cap, holder, lifetime=lifetime)


# -- origin slots ---------------------------------------------------------------------------------


def test_no_more_holders_than_the_cap(redis_conn: Redis) -> None:
    first, second, third = (slot(redis_conn, foreign(name)) for name in "abc")
    assert first.try_take() and second.try_take()
    assert not third.try_take()
    assert sorted(first.holders()) == sorted([first.holder, second.holder])
    assert first.try_take(), "a holder asking again keeps its slot"
    first.release()
    assert third.try_take()
    assert not first.try_take()


def test_origins_are_counted_apart(redis_conn: Redis) -> None:
    assert slot(redis_conn, foreign("a"), cap=1).try_take()
    assert OriginSlot(redis_conn, "other.example", 1, foreign("b")).try_take()
    assert not slot(redis_conn, foreign("c"), cap=1).try_take()


def test_a_slot_nobody_renews_frees_after_its_lifetime(redis_conn: Redis) -> None:
    """A holder that stops renewing (killed on another server) blocks the origin for one lifetime at most."""
    assert slot(redis_conn, foreign("gone"), cap=1, lifetime=0.5).try_take()
    waiting = slot(redis_conn, foreign("next"), cap=1)
    assert not waiting.try_take()
    wait_for(waiting.try_take, timeout=5, what="the unrenewed slot to expire")
    assert waiting.holders() == [waiting.holder]


def test_renewal_keeps_a_slot_past_its_lifetime(redis_conn: Redis) -> None:
    held = slot(redis_conn, foreign("busy"), cap=1, lifetime=0.6)
    assert held.try_take()
    waiting = slot(redis_conn, foreign("next"), cap=1)
    deadline = time.monotonic() + 2.0  # more than three lifetimes
    while time.monotonic() < deadline:
        held.renew()
        assert not waiting.try_take()
        time.sleep(0.1)  # a renewal cadence well inside the lifetime, as the lease's is


def test_renewal_takes_an_expired_slot_back_while_one_is_free(redis_conn: Redis) -> None:
    held = slot(redis_conn, foreign("outage"), cap=1, lifetime=0.3)
    assert held.try_take()
    redis_conn.zadd(slots_key(HOST), {held.holder: 0})  # expired long ago, as after an outage
    held.renew()
    assert not slot(redis_conn, foreign("next"), cap=1).try_take()


def test_a_dead_holder_on_this_host_is_freed_at_once(redis_conn: Redis) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    dead = f"{socket.gethostname()}|{child.pid}|download-1|0123456789abcdef"
    assert slot(redis_conn, dead, cap=1).try_take()
    alive = slot(redis_conn, f"{socket.gethostname()}|{os.getpid()}|download-2|0123456789abcdef", cap=1)
    assert alive.try_take()
    assert alive.holders() == [alive.holder]


def test_wait_gives_up_after_its_patience_and_on_stop(redis_conn: Redis) -> None:
    assert slot(redis_conn, foreign("a"), cap=1).try_take()
    waiting = slot(redis_conn, foreign("b"), cap=1)
    began = time.monotonic()
    assert not waiting.wait(0.5)
    assert time.monotonic() - began >= 0.5
    stop = threading.Event()
    stop.set()
    assert not waiting.wait(30, stop=stop)
    assert not waiting.held


def test_wait_takes_a_slot_freed_meanwhile(redis_conn: Redis) -> None:
    first = slot(redis_conn, foreign("a"), cap=1, lifetime=0.4)
    assert first.try_take()
    assert slot(redis_conn, foreign("b"), cap=1).wait(5)


def test_origin_host_is_the_connected_host_without_port() -> None:
    assert origin_host("https://CDN.Example:8443/courses/x") == "cdn.example"
    assert origin_host("http://127.0.0.1:8000/c") == "127.0.0.1"
    with pytest.raises(HostNotAllowedError):
        origin_host("ftp://cdn.example/c")


HOLDER_SCRIPT = """
import sys, time
from redis import Redis
from udemy_dl.lease import TaskLease
from udemy_dl.limits import OriginSlot
connection = Redis.from_url(sys.argv[1])
lease = TaskLease(connection, 991, "download-991", ttl=int(sys.argv[2]))
lease.acquire()
held = OriginSlot(connection, "cdn.example", 1, sys.argv[3], lifetime=int(sys.argv[2]))
assert held.try_take()
lease.renew_with_lease(held.renew)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def slot_holder(redis_url: str, redis_conn: Redis) -> Iterator[subprocess.Popen[str]]:
    """A process holding task 991's lease (lifetime 2 s) and an origin slot beside it, named as a run
    on another server; killed at teardown if the test did not."""
    holder = foreign("991")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, redis_url, "2", holder],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    yield child
    child.kill()
    child.wait(timeout=15)


def test_a_killed_run_leaks_its_slot_no_longer_than_its_lease(
    redis_conn: Redis, slot_holder: subprocess.Popen[str]
) -> None:
    """The lease's renewal keeps the slot well past its lifetime; once the run is SIGKILLed, the slot
    frees within one lease lifetime, as the lease does."""
    waiting = slot(redis_conn, foreign("next"), cap=1)
    deadline = time.monotonic() + 5.0  # two and a half lifetimes: only renewals can keep it
    while time.monotonic() < deadline:
        assert not waiting.try_take()
        time.sleep(0.2)
    slot_holder.send_signal(signal.SIGKILL)
    slot_holder.wait(timeout=15)
    killed = time.monotonic()
    wait_for(waiting.try_take, timeout=2 + 3, interval=0.05, what="the killed run's slot to expire")
    assert time.monotonic() - killed <= 2 + 3  # one lease lifetime, and a generous margin
    assert TaskLease(redis_conn, 991).holder() is None, "its lease expired too"


# -- the byte schedule ----------------------------------------------------------------------------


def test_reservations_queue_up_at_the_rate(redis_conn: Redis) -> None:
    """Each booking waits for the ones before it: 500 bytes at 1000 B/s take half a second of the link."""
    rate = ByteRate(redis_conn, 1000, hostname="box")
    assert rate.reserve(500) == pytest.approx(0, abs=0.05)
    assert rate.reserve(500) == pytest.approx(0.5, abs=0.05)
    assert rate.reserve(1000) == pytest.approx(1.0, abs=0.05)


def test_every_process_of_one_machine_shares_the_schedule(redis_conn: Redis) -> None:
    """Two ByteRates (two worker processes) of one machine book from one schedule; another machine's is its own."""
    ByteRate(redis_conn, 1000, hostname="box").reserve(2000)
    assert ByteRate(redis_conn, 1000, hostname="box").reserve(100) == pytest.approx(2.0, abs=0.05)
    assert ByteRate(redis_conn, 1000, hostname="other-box").reserve(100) == pytest.approx(0, abs=0.05)
    left = redis_conn.pttl(rate_key("box"))
    assert isinstance(left, int) and left > 0, "the schedule expires when unused"


def test_an_idle_schedule_saves_up_half_a_second_at_most(redis_conn: Redis) -> None:
    """Link time nobody used is saved up for half a second at most: after a 1.5 s pause at 10 kB/s,
    5000 bytes (0.5 s) and then 2000 go at once, and the next 2000 wait 0.2 s. A schedule that saved
    nothing would make them wait 0, 0.5 and 0.7 s; one that saved the whole pause, 0, 0 and 0."""
    rate = ByteRate(redis_conn, 10_000, hostname="box")
    assert rate.slack == SLACK_SECONDS == 0.5
    rate.reserve(1000)
    time.sleep(1.5)  # idle link time, three times the slack
    assert rate.reserve(5000) == pytest.approx(0, abs=0.05)
    assert rate.reserve(2000) == pytest.approx(0, abs=0.05)
    assert rate.reserve(2000) == pytest.approx(0.2, abs=0.05)


def test_chunk_is_a_tenth_of_a_second_within_bounds(redis_conn: Redis) -> None:
    assert ByteRate(redis_conn, 2_000_000).chunk == 200_000
    assert ByteRate(redis_conn, 10_000).chunk == 16 * 1024
    assert ByteRate(redis_conn, 10**9).chunk == 256 * 1024


def test_redis_away_lifts_the_limit_rather_than_failing(redis_conn: Redis) -> None:
    away = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert ByteRate(away, 1000, hostname="box").reserve(10_000) == 0.0


# -- the byte schedule in the fetcher -------------------------------------------------------------


def test_the_fetcher_books_every_byte_it_reads(redis_conn: Redis, origin: ContentOrigin, staging: Path) -> None:
    """A paced fetch of two files, 4.5 MB in all, books at least that much: the schedule runs at least
    4.5 MB's worth of time (at the limit) past the moment the fetch began."""
    size = 3_000_000
    url = origin.add_course("booked", {"a.bin": size, "b.bin": size // 2})
    rate = ByteRate(redis_conn, 50_000_000, hostname="box")
    now = redis_conn.time()
    assert isinstance(now, tuple)
    began = now[0] + now[1] / 1e6
    result = fetcher_for(origin, pacer=rate).fetch(url, staging)
    assert result.total_bytes == size + size // 2
    booked = redis_conn.get(rate_key("box"))
    assert isinstance(booked, bytes)
    assert float(booked) - began >= (size + size // 2) / 50_000_000


def test_a_stop_ends_a_fetch_waiting_for_its_turn(redis_conn: Redis, origin: ContentOrigin, staging: Path) -> None:
    """At 2 kB/s each 16 KiB booking waits 8 s: a stop set during that wait ends the fetch within a
    moment, with its bytes kept for the next attempt."""
    url = origin.add_course("slow", {"a.bin": 1_000_000})
    stop = threading.Event()
    fetcher = fetcher_for(origin, pacer=ByteRate(redis_conn, 2_000, hostname="box"))
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetcher.fetch(url, staging, stop=stop)
        except BaseException as exc:  # the outcome is what the test looks at
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: fetcher.bytes_transferred > 0, timeout=10, what="the first paced read")
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the fetch kept waiting for its turn after the stop"
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupted)
    assert 0 < fetcher.bytes_transferred < 1_000_000
