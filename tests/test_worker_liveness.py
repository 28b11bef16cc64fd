"""Which workers count as alive, on real Redis: a worker's key lives WORKER_TTL seconds from its last
heartbeat whatever RQ asks for, and a worker whose key expired (another host's, killed) or whose
process is gone (this host's) is counted by no one, its entry in RQ's worker sets cleaned away."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker
from rq.job import JobStatus
from rq.utils import utcparse
from rq.worker_registration import WORKERS_BY_QUEUE_KEY, get_keys

from tests.support.processes import LoggedProcess
from tests.support.waiting import wait_for
from udemy_dl import crashpoints, defaults
from udemy_dl.download_worker import DownloadWorker, clear_stale_registration
from udemy_dl.producer import Producer
from udemy_dl.queues import live_workers, worker_queues
from udemy_dl.settings import Settings


def registered(
    settings: Settings, connection: Redis, hostname: str | None = None, pid: int | None = None
) -> DownloadWorker:
    """A worker registered in Redis as `udemy-dl worker` registers (it never runs)."""
    worker = DownloadWorker(
        worker_queues(settings, connection), connection=connection, name=f"t-{uuid.uuid4().hex[:8]}"
    )
    worker.hostname = hostname or worker.hostname
    worker.pid = pid or worker.pid
    worker.register_birth()  # type: ignore[no-untyped-call]
    return worker


def key_ttl(connection: Redis, worker: Worker) -> int:
    ttl: int = connection.ttl(worker.key)  # type: ignore[assignment]
    return ttl


def test_a_workers_key_lives_worker_ttl_from_each_heartbeat(
    configure: Callable[..., Settings], redis_conn: Redis
) -> None:
    """RQ would keep the key worker_ttl + 60 s, and a busy worker's 90 s: here every beat, plain or in
    RQ's job pipelines, gives it WORKER_TTL, so a killed worker's key is gone within that."""
    worker = registered(configure(), redis_conn)
    worker.heartbeat()
    assert 0 < key_ttl(redis_conn, worker) <= defaults.WORKER_TTL
    with redis_conn.pipeline() as pipe:
        worker.heartbeat(worker.job_monitoring_interval + 60, pipeline=pipe)  # as RQ's maintain_heartbeats asks
        pipe.execute()
    assert 0 < key_ttl(redis_conn, worker) <= defaults.WORKER_TTL
    assert worker.dequeue_timeout == worker.job_monitoring_interval == defaults.WORKER_HEARTBEAT < defaults.WORKER_TTL


def test_a_worker_whose_key_expired_is_counted_by_no_one(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """Two workers of another host; one's key expires (it was killed there): stats, health's count and the
    metrics' set of live workers drop it, and RQ's per-queue worker set no longer lists it."""
    settings = configure()
    queues = worker_queues(settings, redis_conn)
    gone, alive = registered(settings, redis_conn, "far-host"), registered(settings, redis_conn, "far-host")
    assert Producer(settings, connection=redis_conn).get_queue_stats()["workers"] == 2
    redis_conn.delete(gone.key)  # as its expiry would
    assert [worker.name for worker in live_workers(redis_conn, queues)] == [alive.name]
    assert Producer(settings, connection=redis_conn).get_queue_stats()["workers"] == 1
    assert redis_conn.smembers(WORKERS_BY_QUEUE_KEY % settings.queue_name) == {alive.key.encode()}
    assert Worker.count(connection=redis_conn, queue=queues[-1]) == 1, "rq's own count agrees once cleaned"


def test_a_worker_of_this_host_whose_process_is_gone_is_not_counted(
    configure: Callable[..., Settings], redis_conn: Redis
) -> None:
    """On its own host a killed worker drops out at once, while its key still lives."""
    settings = configure()
    dead_pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout)
    dead = registered(settings, redis_conn, pid=dead_pid)
    assert redis_conn.exists(dead.key)
    assert live_workers(redis_conn, worker_queues(settings, redis_conn)) == []


def test_a_job_the_worker_runs_itself_does_not_let_its_key_expire(
    configure: Callable[..., Settings], redis_conn: Redis
) -> None:
    """A webhook delivery runs in the worker process, where no monitoring loop beats: a thread beats every
    WORKER_HEARTBEAT seconds while it runs, so a slow receiver never makes a live worker look dead."""
    worker = registered(configure(), redis_conn)
    queue = worker.queues[0]
    job = queue.enqueue("time.sleep", defaults.WORKER_HEARTBEAT * 2 + 1)
    began = datetime.now(UTC)
    worker._execute_in_process(job, queue)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    beat = utcparse(redis_conn.hget(worker.key, "last_heartbeat").decode())  # type: ignore[union-attr]
    assert (beat.replace(tzinfo=UTC) - began).total_seconds() >= defaults.WORKER_HEARTBEAT * 2


def test_a_worker_stopped_while_it_starts_deregisters(
    configure: Callable[..., Settings],
    redis_conn: Redis,
    tmp_path: Path,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """A stop that lands after RQ registered the worker but before RQ's own stop handlers exist (a pool
    stopping just as it replaces a dead worker) ends the worker cleanly, its registration gone, rather
    than killing it with its key left for `rq info` and `health` to count."""
    marker = tmp_path / "registered"
    configure(
        **{
            crashpoints.CRASH_AT: crashpoints.WORKER_REGISTERED,
            crashpoints.CRASH_ACTION: crashpoints.PAUSE,
            crashpoints.CRASH_MARKER: str(marker),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}",
            "ALLOWED_HOSTS": "cdn.example",
        }
    )
    worker = start_worker()
    wait_for(lambda: marker.exists() or worker.process.poll() is not None, timeout=30, interval=0.05)
    assert marker.exists(), f"the worker exited before registering:\n{worker.log(3000)}"
    key = Worker.redis_worker_namespace_prefix + worker.name
    assert key in get_keys(connection=redis_conn), "registered before the stop"
    os.kill(worker.pid, signal.SIGTERM)
    Path(f"{marker}{crashpoints.GO_SUFFIX}").touch()
    assert worker.wait(timeout=30) == 0, worker.log(4000)
    assert key not in get_keys(connection=redis_conn), worker.log(4000)
    assert redis_conn.hget(key, "death") is not None, "it registered its death"
    assert "Traceback" not in worker.log(), worker.log(4000)


def test_a_name_left_by_a_killed_worker_is_retired_and_a_clean_stop_s_is_left_alone(
    configure: Callable[..., Settings], redis_conn: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker restarted under its name: the registration of a killed one (this host, its pid gone) is
    retired with a warning; a worker that stopped cleanly left a registration RQ reuses, with no warning
    (a restart right after `stop_workers.sh` must not read as a crash); a live one is never touched."""
    settings = configure()
    dead_pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout)
    killed = registered(settings, redis_conn, pid=dead_pid)
    stopped = registered(settings, redis_conn, pid=dead_pid)
    stopped.register_death()  # type: ignore[no-untyped-call]
    alive = registered(settings, redis_conn)
    with caplog.at_level(logging.WARNING, logger="udemy_dl"):
        assert clear_stale_registration(redis_conn, killed.name)
        assert not clear_stale_registration(redis_conn, stopped.name)
        assert not clear_stale_registration(redis_conn, alive.name)
    assert redis_conn.hget(killed.key, "death") is not None
    assert redis_conn.hget(alive.key, "death") is None
    assert [record.getMessage() for record in caplog.records] == [
        f"worker {killed.name}: retiring the registration of dead pid {dead_pid}"
    ]
