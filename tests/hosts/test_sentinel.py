"""A highly available Redis: the service reaches Redis through Sentinel and rides out a failover.

A master, one replica and three Sentinels (quorum 2, down-after 1 s) run on loopback. The service
is configured with REDIS_SENTINELS and REDIS_SENTINEL_MASTER only: its REDIS_URL names no server
(port 1), so anything that bypassed the Sentinels would fail at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import SentinelManagedSSLConnection
from rq import Worker
from rq.job import Job
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from dev.devservers import WebhookReceiver
from tests.support.deployment import Deployment, served_by, site_environ
from tests.support.files import sha256_of
from tests.support.hosts import MARKER
from tests.support.http_servers import Origin, Task, completed_ids, make_tasks, serving
from tests.support.mariadb import HOSTS_DB, database_url, fresh_store
from tests.support.measurements import record
from tests.support.processes import kill_tree
from tests.support.scripts import clean_environ, rq_info, rq_info_workers
from tests.support.sentinel import MASTER_NAME, SentinelGroup, running_sentinel_group
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl.connection import redis_connection
from udemy_dl.reconciler import REDIS_MARKER
from udemy_dl.settings import load_settings
from udemy_dl.store import COMPLETED, PROCESSING
from udemy_dl.webhooks import generate_secret

NO_SERVER_URL = "redis://127.0.0.1:1/0"
"""REDIS_URL of the Sentinel scenarios: database 0, on a port where nothing listens."""

MIB = 1024 * 1024
POOL_SIZE = 2


def sentinel_settings(group: SentinelGroup) -> dict[str, str]:
    return {
        "REDIS_URL": NO_SERVER_URL,
        "REDIS_SENTINELS": group.sentinels_setting,
        "REDIS_SENTINEL_MASTER": MASTER_NAME,
    }


def info(client: Redis, section: str) -> dict[str, Any]:
    found: dict[str, Any] = client.info(section)  # type: ignore[assignment]
    return found


def port_of(client: Redis) -> int:
    return int(info(client, "server")["tcp_port"])


def test_redis_connection_talks_to_the_current_master(sentinel_group: SentinelGroup) -> None:
    """redis_connection() with REDIS_SENTINELS reaches the master the Sentinels name, and after a
    failover the same client writes to the promoted replica."""
    group = sentinel_group
    settings = load_settings(sentinel_settings(group), env_file=None)
    client = redis_connection(settings)
    try:
        client.set("udemy_dl:hosts:probe", "before")
        assert port_of(client) == group.master.port == group.master_port()
        replica = group.replica.client()
        wait_for(lambda: replica.get("udemy_dl:hosts:probe") == b"before", timeout=10, what="replication")

        group.master.kill()
        promoted = group.wait_failover(group.master.port)
        assert promoted == group.replica.port

        def writes() -> int:
            try:
                client.set("udemy_dl:hosts:probe", "after")
                return port_of(client)
            except (RedisConnectionError, RedisTimeoutError):
                return 0

        assert wait_for(writes, timeout=30, interval=0.2, what="a write after the failover") == group.replica.port
        assert replica.get("udemy_dl:hosts:probe") == b"after"
        assert info(client, "replication")["role"] == "master"
        replica.close()
    finally:
        client.close()


def test_sentinel_connections_keep_the_acl_user_and_tls() -> None:
    """With REDIS_SENTINELS, what REDIS_URL says about logging in and TLS still applies to the master."""
    settings = load_settings(
        {"REDIS_URL": "rediss://udemy_dl:secret@sentinel-managed:6380/2", "REDIS_SENTINELS": "127.0.0.1:1"},
        env_file=None,
    )
    client = redis_connection(settings)  # connects lazily: no server needed
    pool = client.connection_pool
    assert (pool.connection_kwargs.get("password"), pool.connection_kwargs.get("db")) == ("secret", 2)
    assert pool.connection_kwargs.get("username") == "udemy_dl"
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)


# -- the service through a failover ----------------------------------------------------------------

TASKS_BEFORE = 8
TASKS_AFTER = 6
TASK_SIZE = 1 * MIB
THROTTLE = 1 * MIB
"""Bytes per second per response: a second per task, so the failover falls mid-run."""


def rq_info_with_sentinel(group: SentinelGroup, folder: Path) -> str:
    """`rq info -c <module> -P <folder>`, the module holding RQ's SENTINEL setting (as docs/MULTI_SERVER.md shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    instances = ", ".join(f"('127.0.0.1', {sentinel.port})" for sentinel in group.sentinels)
    (folder / "rq_sentinel_settings.py").write_text(
        f"SENTINEL = {{'INSTANCES': [{instances}], 'MASTER_NAME': '{MASTER_NAME}', 'DB': 0, 'SOCKET_TIMEOUT': 5}}\n"
    )
    return rq_info("-c", "rq_sentinel_settings", "-P", str(folder), env=clean_environ())


def held_deliveries(client: Redis, task_ids: list[int]) -> dict[int, str]:
    """For each of *task_ids*, where Redis holds its download.completed delivery job (read without
    side effects: no registry cleanup). Closes *client*."""
    try:
        places = {
            "started": StartedJobRegistry("webhooks", connection=client).get_job_ids(cleanup=False),
            "scheduled": ScheduledJobRegistry("webhooks", connection=client).get_job_ids(cleanup=False),
            "queued": [item.decode() for item in client.lrange("rq:queue:webhooks", 0, -1)],  # type: ignore[union-attr]
        }
    finally:
        client.close()
    found = {}
    for task_id in task_ids:
        for place, job_ids in places.items():
            if any(job_id.startswith(f"webhook-msg_{task_id}_completed_") for job_id in job_ids):
                found[task_id] = place
    return found


def workers_on(port: int) -> list[str]:
    """udemy-dl workers registered on the Redis server at *port*."""
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=2, socket_timeout=5)
    try:
        return sorted(w.name for w in Worker.all(connection=client) if w.name.startswith("udemy-dl."))
    except (RedisConnectionError, RedisTimeoutError):
        return []
    finally:
        client.close()


class Service(Deployment):
    """udemy_dl on a Sentinel group: a fresh table, an origin, a receiver, `udemy-dl pool` as systemd
    runs it, and the CLI as the payment service runs it; everything closed by *stack*."""

    def __init__(self, stack: contextlib.ExitStack, group: SentinelGroup, folder: Path, run_id: str) -> None:
        self.group = group
        secret = generate_secret()
        self.store = stack.enter_context(fresh_store(HOSTS_DB))
        self.origin = stack.enter_context(serving(Origin(folder / "origin", token=uuid.uuid4().hex)))
        self.receiver = stack.enter_context(serving(WebhookReceiver(secret)))
        env = site_environ(
            MARKER,
            run_id,
            folder,
            **sentinel_settings(group),
            **served_by(self.origin, self.receiver, secret),
            DATABASE_URL=database_url(HOSTS_DB),
            STOP_TIMEOUT=str(defaults.STOP_TIMEOUT),
            RECONCILE_INTERVAL="5",
        )
        super().__init__(folder, env)
        self.log_path = folder / "pool.log"
        self._stack = stack
        self.pool: subprocess.Popen[bytes] | None = None

    def start_pool(self, count: int) -> None:
        pool = self.launch_pool(count, self.log_path)
        self.pool = pool.process
        self._stack.callback(pool.stop, 20)
        wait_for(
            lambda: len(workers_on(self.group.master.port)) == count,
            timeout=60,
            interval=0.2,
            what=lambda: f"{count} pool workers on the master\n{self.pool_log()[-4000:]}",
        )

    def pay(self, tasks: list[Task]) -> subprocess.CompletedProcess[str]:
        return self.cli("confirm-payment", "--json", *(str(task.id) for task in tasks))

    def pool_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def completed(self, tasks: list[Task]) -> int:
        return sum(row.status == COMPLETED for row in self.store.get_many([task.id for task in tasks]))

    def webhook_ids(self, tasks: list[Task]) -> dict[int, set[str]]:
        """taskId -> distinct webhook ids of verified download.completed events."""
        return {**{task.id: set() for task in tasks}, **completed_ids(self.receiver)}


def test_an_event_the_old_master_never_replicated_is_still_sent(
    redis_binary: str, hosts_database: str, tmp_path: Path
) -> None:
    """The replica is frozen (SIGSTOP) and its link cut while a task completes and its
    download.completed delivery is refused (503: scheduled for a retry, on the master only); the
    master is killed, the replica thawed and promoted. The event must still reach the payment
    service, within 30 s of the failover: the task's row still lists it as unacknowledged (the
    outbox), so the reconciler's sweep queues it again under the same webhook-id."""
    run_id = uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(running_sentinel_group(redis_binary, tmp_path, run_id))
        service = Service(stack, group, tmp_path, run_id)
        service.receiver.status_for = lambda attempt: 503  # the payment service is down for now
        service.start_pool(1)
        # A service in its steady state: its reconciler has had its first look at Redis, and the
        # replica holds that look's marker (else the promoted replica would look like a Redis that
        # lost its data, which the reconciler meets with a lease's lifetime of grace).
        replica = stack.enter_context(contextlib.closing(group.replica.client()))
        wait_for(
            lambda: replica.exists(REDIS_MARKER), timeout=30, interval=0.2, what="the reconciler's marker replicated"
        )
        (task,) = make_tasks(service.origin, service.store, 1, 64 * 1024, "unreplicated")
        replica_pid = group.replica.process.pid if group.replica.process else 0
        os.kill(replica_pid, signal.SIGSTOP)
        stack.callback(lambda: os.kill(replica_pid, signal.SIGCONT) if group.replica.alive else None)
        master = group.master.client()
        # Cut the frozen replica's link too: what the master writes from now on stays on the master.
        assert master.client_kill_filter(_type="slave") == 1
        paid = service.pay([task])
        assert paid.returncode == 0, paid.stdout + paid.stderr
        wait_for(
            lambda: [
                job_id
                for job_id in ScheduledJobRegistry("webhooks", connection=master).get_job_ids(cleanup=False)
                if job_id.startswith(f"webhook-msg_{task.id}_completed_")
            ],
            timeout=30,
            interval=0.05,
            what=lambda: f"the completed event refused and scheduled for a retry\n{service.pool_log()[-3000:]}",
        )
        master.close()
        assert service.completed([task]) == 1
        old_port = group.master.port
        group.master.kill()
        os.kill(replica_pid, signal.SIGCONT)
        group.wait_failover(old_port)
        service.receiver.status_for = lambda attempt: 204
        wait_for(
            lambda: service.webhook_ids([task])[task.id],
            timeout=30,
            interval=0.2,
            what=lambda: f"the download.completed event after the failover\n{service.pool_log()[-3000:]}",
        )


@dataclass
class Failover:
    """What the failover scenario saw; the tests judge it."""

    service: Service
    tasks: list[Task]
    after: list[Task]
    failover_seconds: float
    completed_seconds: float
    paid_after: subprocess.CompletedProcess[str]
    webhook_ids: dict[int, set[str]]
    pending: dict[int, str]
    """taskId -> where its undelivered download.completed delivery is held in Redis (started, scheduled, queued)."""
    registered: list[str]
    listed_by_rq_info: list[str]
    health: subprocess.CompletedProcess[str]
    pool_alive: bool


@pytest.fixture(scope="module")
def failover(redis_binary: str, hosts_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    """`udemy-dl pool --count 2` (as systemd runs it) and the payment side reach Redis through the
    Sentinels only. Eight tasks are paid; after two have completed the master gets SIGKILL; once a
    replica is promoted six more are paid; the scenario waits until every task completed."""
    tmp = tmp_path_factory.mktemp("sentinel-failover")
    run_id = uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(running_sentinel_group(redis_binary, tmp, run_id))
        service = Service(stack, group, tmp, run_id)
        before = make_tasks(service.origin, service.store, TASKS_BEFORE, TASK_SIZE, "before")
        after = make_tasks(service.origin, service.store, TASKS_AFTER, TASK_SIZE, "after")
        tasks = [*before, *after]
        service.origin.throttle = THROTTLE
        service.start_pool(POOL_SIZE)
        paid = service.pay(before)
        assert paid.returncode == 0, paid.stdout + paid.stderr
        wait_for(lambda: service.completed(tasks) >= 2, timeout=60, interval=0.05, what="two tasks completed")

        old_port = group.master.port
        killed = time.monotonic()
        group.master.kill()
        group.wait_failover(old_port)
        failover_seconds = time.monotonic() - killed

        paid_after = service.pay(after)
        wait_for(
            lambda: service.completed(tasks) == len(tasks),
            timeout=120,
            interval=0.2,
            what=lambda: f"every task completed\n{service.pool_log()[-4000:]}",
        )
        completed_seconds = time.monotonic() - killed
        with contextlib.suppress(AssertionError):
            # A delivery that failed during the outage is retried by RQ's scheduler (WEBHOOK_RETRY_INTERVALS).
            wait_for(lambda: all(service.webhook_ids(tasks).values()), timeout=90, interval=0.2)
        webhook_ids = service.webhook_ids(tasks)
        pending = held_deliveries(group.replica.client(), [task for task, ids in webhook_ids.items() if not ids])
        registered = wait_for(
            lambda: workers_on(group.replica.port) if len(workers_on(group.replica.port)) == POOL_SIZE else [],
            timeout=60,
            interval=0.5,
            what=lambda: f"the pool's workers on the new master\n{service.pool_log()[-4000:]}",
        )
        listed = [
            name
            for name, _, _ in rq_info_workers(rq_info_with_sentinel(group, tmp / "rqconf"))
            if name.startswith("udemy-dl.")
        ]
        yield Failover(
            service=service,
            tasks=tasks,
            after=after,
            failover_seconds=failover_seconds,
            completed_seconds=completed_seconds,
            paid_after=paid_after,
            webhook_ids=webhook_ids,
            pending=pending,
            registered=registered,
            listed_by_rq_info=sorted(listed),
            health=service.cli("health"),
            pool_alive=service.pool is not None and service.pool.poll() is None,
        )


def test_sentinel_failover_keeps_the_service_running(failover: Failover, request: pytest.FixtureRequest) -> None:
    """Through a failover, payments go on, every task is completed once, no webhook is sent twice, and
    the workers are registered on the new master (rq info through the Sentinels lists them).

    A delivery that failed during the outage is retried (the scheduler, which waits out the failover,
    puts it back on the queue): every task has exactly one download.completed webhook id."""
    run = failover
    record(request.config, "hosts", "sentinel", "kill -9 of the master -> replica promoted", run.failover_seconds)
    record(request.config, "hosts", "sentinel", "kill -9 of the master -> all tasks completed", run.completed_seconds)
    assert run.failover_seconds < 30
    assert run.paid_after.returncode == 0, run.paid_after.stdout + run.paid_after.stderr

    for task in run.tasks:
        row = run.service.store.get(task.id)
        assert row is not None and row.status == COMPLETED and row.bytes == task.size, row
        for item in task.files:
            assert sha256_of(Path(str(row.output_path)) / item.rel) == item.sha256, f"task {task.id}"
            full = [
                headers for _, headers in run.service.origin.timed.for_path(item.url_path) if "Range" not in headers
            ]
            assert len(full) == 1, f"task {task.id}: {item.rel} fetched in full {len(full)} times"
    assert run.service.store.ids_with_status(PROCESSING) == []

    assert all(len(ids) <= 1 for ids in run.webhook_ids.values()), run.webhook_ids
    # Every task has its event, even one the old master acknowledged but never replicated: the row's
    # outbox still lists it, and the sweep queues it again.
    rows = {row.id: row for row in run.service.store.get_many(sorted(run.webhook_ids))}
    missing = sorted(task_id for task_id, ids in run.webhook_ids.items() if not ids)
    assert not missing, (
        f"no download.completed webhook for tasks {missing} (held in Redis: {run.pending})\n"
        f"{run.service.pool_log()[-4000:]}"
    )
    assert all(row.pending_event is None for row in rows.values()), rows

    assert run.pool_alive, run.service.pool_log()[-4000:]
    assert len(run.registered) == POOL_SIZE, run.registered
    assert run.listed_by_rq_info == run.registered
    assert run.health.returncode == 0, run.health.stdout + run.health.stderr


def test_retries_fire_after_the_failover(failover: Failover) -> None:
    """After the failover, a delivery the receiver refuses once (503) is retried on schedule: RQ's
    scheduler still runs, and the same webhook-id arrives within 15 s of the retry's due time."""
    run = failover
    refused = threading.Event()

    def status_for(attempt: int) -> int:
        if refused.is_set():
            return 204
        refused.set()
        return 503

    (task,) = make_tasks(run.service.origin, run.service.store, 1, 64 * 1024, "retry")
    run.service.origin.throttle = None
    run.service.receiver.status_for = status_for
    try:
        paid = run.service.cli("confirm-payment", "--json", str(task.id))
        assert paid.returncode == 0, paid.stdout + paid.stderr
        client = run.service.group.replica.client()
        try:

            def scheduled() -> list[tuple[str, float]]:
                entries: list[tuple[bytes, float]] = client.zrange("rq:scheduled:webhooks", 0, -1, withscores=True)  # type: ignore[assignment]
                return [
                    (job_id.decode(), due)
                    for job_id, due in entries
                    if job_id.startswith(f"webhook-msg_{task.id}_".encode())
                ]

            ((job_id, due),) = wait_for(scheduled, timeout=30, interval=0.1, what="a delivery scheduled for retry")
        finally:
            client.close()
        webhook_id = job_id.removeprefix("webhook-")
        wait_for(
            lambda: any(item.webhook_id == webhook_id for item in run.service.receiver.accepted()),
            timeout=max(due - time.time(), 0) + 15,
            interval=0.2,
            what=lambda: (
                f"the retry of {webhook_id}, due {due - time.time():.0f} s from now\n{run.service.pool_log()[-3000:]}"
            ),
        )
    finally:
        run.service.receiver.status_for = lambda attempt: 204


def test_a_delivery_whose_worker_died_is_sent_again(failover: Failover) -> None:
    """After the failover, a pool worker is killed (kill -9, with its horse) while its horse is
    delivering a webhook: the same delivery (same webhook-id) is sent again within 20 s."""
    run = failover
    (late,) = make_tasks(run.service.origin, run.service.store, 1, 64 * 1024, "late")
    run.service.origin.throttle = None
    held = threading.Event()
    release = threading.Event()

    def status_for(attempt: int) -> int:
        if held.is_set():
            return 204
        held.set()
        release.wait(30)  # the horse delivering this is killed meanwhile
        return 503

    run.service.receiver.status_for = status_for
    try:
        paid = run.service.cli("confirm-payment", "--json", str(late.id))
        assert paid.returncode == 0, paid.stdout + paid.stderr
        wait_for(held.is_set, timeout=30, interval=0.05, what="a delivery for the late task")
        time.sleep(1)  # deliveries the receiver does not hold are over by now
        client = run.service.group.replica.client()
        try:
            in_hand = wait_for(
                lambda: [
                    job_id
                    for job_id in StartedJobRegistry("webhooks", connection=client).get_job_ids(cleanup=False)
                    if job_id.startswith(f"webhook-msg_{late.id}_")
                ],
                timeout=10,
                what="the delivery in a worker's hands",
            )
            assert len(in_hand) == 1, in_hand
            job = Job.fetch(in_hand[0], connection=client)
            worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + str(job.worker_name), connection=client)
            assert worker is not None and worker.pid, job.worker_name
        finally:
            client.close()
        kill_tree(worker.pid)
        killed_at = time.monotonic()
        release.set()
        webhook_id = in_hand[0].removeprefix("webhook-")
        assert all(item.webhook_id != webhook_id for item in run.service.receiver.accepted())
        wait_for(
            lambda: any(item.webhook_id == webhook_id for item in run.service.receiver.accepted()),
            timeout=20,
            interval=0.2,
            what=lambda: f"delivery {webhook_id} sent again\n{run.service.pool_log()[-4000:]}",
        )
        print(f"[hosts] abandoned delivery sent again after {time.monotonic() - killed_at:.1f} s")
    finally:
        release.set()
        run.service.receiver.status_for = lambda attempt: 204
