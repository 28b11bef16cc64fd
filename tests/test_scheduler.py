"""The scheduler that moves due retries onto their queues, on a real redis-server of the test's own:
it lives through a Redis outage, and it goes when its worker is killed, freeing its lock at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.scheduler import RQScheduler

from tests.support.processes import pid_running
from tests.support.redis_servers import RedisServer
from tests.support.waiting import wait_for
from udemy_dl.download_worker import DownloadWorker, release_dead_scheduler_locks
from udemy_dl.scheduler import ResilientScheduler


def noop() -> None:
    """A job that does nothing (scheduled, then moved onto its queue)."""


@pytest.fixture
def private_conn(private_redis: RedisServer) -> Iterator[Redis]:
    connection = Redis.from_url(private_redis.url, socket_connect_timeout=1, socket_timeout=5)
    yield connection
    connection.close()


def started(scheduler: RQScheduler) -> RQScheduler:
    assert scheduler.acquire_locks(auto_start=True), "the scheduler lock is free"
    return scheduler


def test_the_scheduler_lives_through_a_redis_restart(private_redis: RedisServer, private_conn: Redis) -> None:
    """Redis goes away and comes back empty: RQ's own scheduler process has died meanwhile (the
    control), ours is still running and moves a retry scheduled afterwards onto its queue."""
    ours = started(ResilientScheduler(["ours"], connection=private_conn, interval=1))
    plain = started(RQScheduler(["plain"], connection=private_conn, interval=1))
    try:
        assert ours._process is not None and plain._process is not None
        wait_for(lambda: private_conn.exists(ours.key, plain.key) == 2, timeout=10, what="both schedulers registered")

        private_redis.stop()
        wait_for(lambda: not plain._process.is_alive(), timeout=20, what="RQ's scheduler ending at the outage")
        private_redis.start()

        assert ours._process.is_alive()
        queue = Queue("ours", connection=private_conn)
        job = queue.enqueue_in(timedelta(seconds=1), noop)
        wait_for(
            lambda: job.get_status(refresh=True) == JobStatus.QUEUED,
            timeout=20,
            interval=0.1,
            what="the scheduled job moved onto its queue after the restart",
        )
        assert queue.job_ids == [job.id]
    finally:
        for scheduler in (ours, plain):
            if scheduler._process is not None and scheduler._process.is_alive():
                scheduler._process.terminate()
                scheduler._process.join(10)


def test_a_worker_schedules_with_the_resilient_scheduler(private_conn: Redis) -> None:
    """The service's worker runs our scheduler: in burst mode it moves a due job onto its queue."""
    queue = Queue("downloads", connection=private_conn)
    job = queue.enqueue_in(timedelta(seconds=0), noop)
    worker = DownloadWorker([queue], connection=private_conn)
    worker._start_scheduler(burst=True)
    assert isinstance(worker.scheduler, ResilientScheduler)
    assert job.get_status(refresh=True) == JobStatus.QUEUED


SCHEDULER_HOST = textwrap.dedent(
    """
    import sys, time
    from redis import Redis
    from udemy_dl.scheduler import ResilientScheduler

    scheduler = ResilientScheduler(["downloads"], connection=Redis.from_url(sys.argv[1]), interval=1)
    assert scheduler.acquire_locks(auto_start=True)
    print("scheduler pid", scheduler._process.pid, flush=True)
    time.sleep(600)
    """
)


def test_the_scheduler_dies_with_its_worker_and_its_lock_is_freed(
    private_redis: RedisServer, private_conn: Redis
) -> None:
    """kill -9 of the process that started the scheduler takes the scheduler with it, so the next
    worker on this host frees the lock at once instead of waiting a minute for it to expire."""
    host = subprocess.Popen(
        [sys.executable, "-c", SCHEDULER_HOST, private_redis.url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None
        line = ""
        while not line.startswith("scheduler pid"):
            line = host.stdout.readline()
            assert line, "the scheduler host ended early"
        scheduler_pid = int(line.split()[-1])
        lock = RQScheduler.get_locking_key("downloads")
        wait_for(lambda: private_conn.exists(lock), timeout=10, what="the scheduler lock taken")
        wait_for(
            lambda: private_conn.keys("rq:scheduler:*"),
            timeout=10,
            what="the scheduler registered",
        )
        assert release_dead_scheduler_locks(private_conn, ["downloads"]) == []  # alive: its lock stays

        host.kill()
        host.wait(10)
        wait_for(lambda: not pid_running(scheduler_pid), timeout=10, what="the scheduler gone with its worker")
        assert int(private_conn.ttl(lock)) > 30  # type: ignore[arg-type]  # it would have held the queue for this long more
        assert release_dead_scheduler_locks(private_conn, ["downloads"]) == ["downloads"]
        assert not private_conn.exists(lock)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
