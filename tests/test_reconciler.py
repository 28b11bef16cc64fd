"""The reconciler on real Redis and MariaDB/SQLite: MySQL is the record, Redis the transport, drift repaired.

`udemy-dl reconcile` (the CLI) is covered in test_cli.py; the long outage scenarios are in tests/faults/.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from dev.devservers import WebhookReceiver
from tests.support.mariadb import TEST_URL
from tests.support.redis_servers import RedisServer
from tests.support.rq_state import ends_while_the_reconciler_looks, live_worker
from tests.support.service import Backend, BusyWorker, Rig, run_burst_worker
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl.producer import Producer
from udemy_dl.queues import job_id_for, webhook_queue
from udemy_dl.reconciler import SWEEP_LOCK, Reconciler, SweepResult
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, FAILED, PENDING, PROCESSING, MySQLStore, SQLiteStore, TaskRow, TaskStore, utcnow
from udemy_dl.webhooks import FAILED as EVENT_FAILED

EMAIL = "buyer@shop.example"

# A worker (or its work horse) that registers, starts a job and then vanishes without any cleanup,
# as after kill -9 or the OOM killer: its registration and the job's `started` state stay behind.
VANISHING_WORKER = """
import sys
from redis import Redis
from rq import Queue, Worker
from rq.job import Job

url, queue_name, name, hostname, job_id = sys.argv[1:6]
connection = Redis.from_url(url)
queue = Queue(queue_name, connection=connection)
worker = Worker([queue], connection=connection, name=name)
if hostname:
    worker.hostname = hostname
worker.register_birth()
if job_id:
    job = Job.fetch(job_id, connection=connection)
    queue.remove(job)
    worker.prepare_execution(job)  # the worker's bookkeeping (started registry), then the horse's
    worker.prepare_job_execution(job)
"""


@pytest.fixture
def rig(configure: Callable[..., Settings], redis_conn: Redis, backend: Backend) -> Rig:
    """The reconciler's world on each store back end in turn."""
    return Rig(configure(DATABASE_URL=backend.url, ALLOWED_HOSTS="cdn.example"), backend.store, redis_conn)


@pytest.fixture
def redis_rig(configure: Callable[..., Settings], redis_conn: Redis, sqlite_store: SQLiteStore) -> Rig:
    """For the Redis-only steps: one store is enough."""
    return Rig(configure(DATABASE_URL=f"sqlite:///{sqlite_store.path}"), sqlite_store, redis_conn)


def vanished_worker(redis_url: str, queue: Queue, job: Job | None = None, hostname: str = "") -> str:
    """Run VANISHING_WORKER in a child process that exits at once; return the dead worker's name."""
    name = f"test-gone-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [sys.executable, "-c", VANISHING_WORKER, redis_url, queue.name, name, hostname, job.id if job else ""],
        check=True,
        timeout=60,
    )
    return name


def status_of(redis_conn: Redis, task_id: int) -> JobStatus | None:
    return Job.fetch(job_id_for(task_id), connection=redis_conn).get_status(refresh=True)


# -- sweep ----------------------------------------------------------------------------------------


def test_sweep_requeues_only_processing_rows_without_a_live_job(
    rig: Rig, redis_url: str, workers_here: list[Worker]
) -> None:
    """Processing with no job, or with a job its dead worker left `started`: enqueued again. Queued, started by a
    live worker, settled or unpaid: left alone."""
    lost = rig.task()
    queued = rig.task()
    queued_job = rig.enqueue(queued)
    running = rig.task(attempts=1)
    running_worker = live_worker(rig.redis, rig.queue, workers_here, rig.enqueue(running))
    orphaned = rig.task(attempts=1)
    vanished_worker(redis_url, rig.queue, rig.enqueue(orphaned))
    settled = [rig.task(COMPLETED, attempts=1), rig.task(FAILED, attempts=1), rig.task(PENDING)]
    rows_before = {task_id: rig.row(task_id) for task_id in settled}

    result = rig.reconciler().sweep()

    assert (result.processing, sorted(result.requeued), result.failed) == (4, sorted([lost, orphaned]), [])
    assert sorted(rig.queue.job_ids) == sorted(job_id_for(t) for t in (queued, lost, orphaned))
    assert Job.fetch(job_id_for(queued), connection=rig.redis).enqueued_at == queued_job.enqueued_at
    running_job = Job.fetch(job_id_for(running), connection=rig.redis)
    assert (running_job.get_status(), running_job.worker_name) == (JobStatus.STARTED, running_worker.name)
    assert {task_id: rig.row(task_id) for task_id in settled} == rows_before
    assert all(rig.row(t).status == PROCESSING for t in (lost, queued, running, orphaned))


def test_second_sweep_finds_nothing_to_do(rig: Rig) -> None:
    """Right after a sweep every processing row has a live job: sweeping again enqueues nothing."""
    lost = rig.task()
    assert rig.reconciler().sweep().requeued == [lost]
    again = rig.reconciler().sweep()
    assert (again.processing, again.requeued, again.failed) == (1, [], [])
    assert rig.queue.job_ids == [job_id_for(lost)]


def test_sweep_leaves_a_row_settled_just_after_its_select(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's SELECT finds a task processing with no live job (its job had just ended), and its run
    records it completed a moment later. Read again before the enqueue, the row says completed: no
    second run of a finished download."""
    task_id = rig.task(attempts=1)
    select = type(rig.store).rows_to_reconcile

    def then_settled(store: TaskStore, *args: Any, **kwargs: Any) -> list[TaskRow]:
        rows = select(store, *args, **kwargs)
        assert rig.store.mark_completed(task_id, "/done", 1, utcnow())
        return rows

    monkeypatch.setattr(type(rig.store), "rows_to_reconcile", then_settled)
    result = rig.reconciler().sweep()

    assert (result.processing, result.requeued) == (1, [])
    assert rig.queue.job_ids == []
    assert rig.row(task_id).status == COMPLETED


@pytest.fixture
def notified(
    configure: Callable[..., Settings], rig: Rig, receiver: WebhookReceiver, webhook_secret: str, backend: Backend
) -> Rig:
    """The rig with webhooks going to a local receiver."""
    rig.settings = configure(
        DATABASE_URL=backend.url, ALLOWED_HOSTS="cdn.example", WEBHOOK_URL=receiver.url, API_SECRET_KEY=webhook_secret
    )
    return rig


def test_sweep_fails_a_row_whose_attempts_are_used_up(notified: Rig, receiver: WebhookReceiver) -> None:
    """Processing, no live job, attempts >= MAX_ATTEMPTS (3): failed with a reason saying so, not enqueued, and the
    payment service gets one download.failed event."""
    spent = notified.task(attempts=3)

    result = notified.reconciler().sweep()

    assert (result.failed, result.requeued) == ([spent], [])
    row = notified.row(spent)
    assert row.status == FAILED
    assert "no attempts left" in (row.error_message or "") and "3 attempts" in (row.error_message or "")
    assert notified.queue.job_ids == []
    run_burst_worker(notified.redis, notified.settings)  # delivers the queued webhook
    hooks = [h for h in receiver.accepted() if h.event_type == EVENT_FAILED]
    assert [(h.event_type, h.body["data"]["taskId"], h.body["data"]["status"]) for h in hooks] == [
        (EVENT_FAILED, spent, FAILED)
    ]
    assert "no attempts left" in hooks[0].body["data"]["error"]


def test_sweep_leaves_a_used_up_row_alone_while_its_job_is_live(notified: Rig) -> None:
    """A row at MAX_ATTEMPTS whose job is still queued is not failed by the sweep: the job itself will settle it."""
    spent = notified.task(attempts=3)
    notified.enqueue(spent)

    result = notified.reconciler().sweep()

    assert (result.processing, result.failed, result.requeued) == (1, [], [])
    assert (notified.row(spent).status, notified.row(spent).attempts) == (PROCESSING, 3)
    assert notified.queue.job_ids == [job_id_for(spent)]


def test_sweep_settles_a_job_rq_failed_while_its_row_says_processing(
    configure: Callable[..., Settings], redis_conn: Redis, mysql_store: MySQLStore
) -> None:
    """A task whose run kills its work horse (as the OOM killer would) leaves RQ's job failed and the row processing
    with its one attempt used; the sweep settles the row failed."""
    killer = "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"
    settings = configure(
        DATABASE_URL=TEST_URL,
        ALLOWED_HOSTS="cdn.example",
        MAX_ATTEMPTS="1",
        FETCH_COMMAND=shlex.join([sys.executable, "-c", killer, "{url}", "{dest}"]),
    )
    rig = Rig(settings, mysql_store, redis_conn)
    task_id = rig.task()
    rig.enqueue(task_id)
    run_burst_worker(redis_conn, settings)
    assert status_of(redis_conn, task_id) == JobStatus.FAILED
    assert (rig.row(task_id).status, rig.row(task_id).attempts) == (PROCESSING, 1)

    result = rig.reconciler().sweep()

    assert result.failed == [task_id]
    row = rig.row(task_id)
    assert row.status == FAILED and "no attempts left" in (row.error_message or "")


# -- recover_started (Redis only) -----------------------------------------------------------------


def test_recover_started_requeues_the_job_of_a_killed_worker_at_the_front(busy_worker: BusyWorker) -> None:
    """While its worker runs, a started download is left alone; after kill -9 of the worker, recover_started
    enqueues it again at the front of the queue, once."""
    rig, busy, worker = busy_worker.rig, busy_worker.task_id, busy_worker.worker
    redis_conn = rig.redis
    waiting = rig.task()
    rig.enqueue(waiting)  # queued behind while the only worker is busy
    reconciler = rig.reconciler()

    assert reconciler.recover_started() == []
    assert status_of(redis_conn, busy) == JobStatus.STARTED

    worker.kill()
    assert reconciler.recover_started() == [busy]
    assert rig.queue.job_ids == [job_id_for(busy), job_id_for(waiting)]
    assert status_of(redis_conn, busy) == JobStatus.QUEUED
    assert reconciler.recover_started() == []


def test_recover_started_leaves_a_job_its_live_worker_is_just_starting(
    redis_rig: Rig, workers_here: list[Worker]
) -> None:
    """A job a live worker has taken but whose horse has not yet marked it started is not orphaned: recover_started
    enqueues nothing."""
    task_id = redis_rig.task()
    job = redis_rig.enqueue(task_id)
    live_worker(redis_rig.redis, redis_rig.queue, workers_here, job, horse_started=False)

    assert redis_rig.reconciler().recover_started() == []
    assert redis_rig.queue.job_ids == []


# -- worker registrations -------------------------------------------------------------------------


def test_retire_dead_local_workers_removes_only_dead_registrations_of_this_host(
    redis_rig: Rig, redis_url: str, workers_here: list[Worker]
) -> None:
    """A registration of this host whose PID is dead is retired (rq info stops listing it); a live worker of this
    host and a worker of another host (whose PID cannot be checked here) stay."""
    dead = vanished_worker(redis_url, redis_rig.queue)
    elsewhere = vanished_worker(redis_url, redis_rig.queue, hostname="another-host.example")
    alive = live_worker(redis_rig.redis, redis_rig.queue, workers_here)
    assert {w.name for w in Worker.all(connection=redis_rig.redis)} == {dead, elsewhere, alive.name}

    assert redis_rig.reconciler().retire_dead_local_workers() == [dead]

    assert {w.name for w in Worker.all(connection=redis_rig.redis)} == {elsewhere, alive.name}
    assert redis_rig.reconciler().retire_dead_local_workers() == []


# -- Redis restarts -------------------------------------------------------------------------------


def test_redis_lost_data_is_reported_once_per_restart(
    configure: Callable[..., Settings], private_redis: RedisServer
) -> None:
    """redis_lost_data() is False at first look and while Redis runs on; True once after a restart; then False."""
    connection = Redis.from_url(private_redis.url)
    reconciler = Reconciler(configure(), Producer(configure(), connection=connection))
    try:
        assert reconciler.redis_lost_data() is False
        assert reconciler.redis_lost_data() is False
        private_redis.restart()
        assert reconciler.redis_lost_data() is True
        assert reconciler.redis_lost_data() is False
    finally:
        connection.close()


def test_run_once_sweeps_one_renewal_period_after_a_redis_restart(
    configure: Callable[..., Settings],
    private_redis: RedisServer,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With periodic sweeps off (RECONCILE_INTERVAL=0), run_once does not sweep. After Redis restarted
    without its data it waits one lease-renewal period (runs still going retake their leases), then
    sweeps and enqueues the processing tasks again, once."""
    monkeypatch.setattr(defaults, "LEASE_TTL", 3)  # renewal period 1 s: wait 2 s
    settings = configure(DATABASE_URL=backend.url, RECONCILE_INTERVAL="0")
    connection = Redis.from_url(private_redis.url)
    try:
        rig = Rig(settings, backend.store, connection)
        reconciler = rig.reconciler()
        task_id = rig.task()
        rig.enqueue(task_id)
        assert "sweep" not in reconciler.run_once()

        private_redis.restart()  # no persistence: the queued job is gone
        assert rig.queue.job_ids == []
        assert "sweep" not in reconciler.run_once()  # too soon: a run may still be retaking its lease

        report = wait_for(lambda: reconciler.run_once().get("sweep"), timeout=10, what="the delayed sweep")
        assert report is not None and report.requeued == [task_id]
        assert rig.queue.job_ids == [job_id_for(task_id)]
        assert "sweep" not in reconciler.run_once()
    finally:
        connection.close()


# -- run_once ---------------------------------------------------------------------------------------


def test_run_once_sweeps_once_per_interval_across_reconcilers(configure: Callable[..., Settings], rig: Rig) -> None:
    """Reconcilers on several hosts share one sweep per RECONCILE_INTERVAL: the first run_once sweeps, the next
    (another reconciler) does not, until the interval has passed; force_sweep always sweeps."""
    rig.settings = configure(DATABASE_URL=rig.settings.database_url or "", RECONCILE_INTERVAL="300")
    first, second = rig.reconciler(), rig.reconciler()
    assert "sweep" in first.run_once()
    lock_ttl = rig.redis.ttl(SWEEP_LOCK)
    assert isinstance(lock_ttl, int) and 0 < lock_ttl <= 300

    lost = rig.task()
    assert "sweep" not in second.run_once()
    assert "sweep" not in first.run_once()
    assert rig.queue.job_ids == []

    assert second.run_once(force_sweep=True)["sweep"].requeued == [lost]
    assert rig.queue.job_ids == [job_id_for(lost)]


def test_run_once_sweeps_again_when_the_interval_has_passed(configure: Callable[..., Settings], rig: Rig) -> None:
    """With RECONCILE_INTERVAL=1 the sweep lock lapses after a second and the next run_once sweeps again."""
    rig.settings = configure(DATABASE_URL=rig.settings.database_url or "", RECONCILE_INTERVAL="1")
    first, second = rig.reconciler(), rig.reconciler()
    assert "sweep" in first.run_once()
    lost = rig.task()
    assert "sweep" not in second.run_once()

    report = wait_for(lambda: second.run_once().get("sweep"), timeout=5, interval=0.1, what="the next sweep")
    assert isinstance(report, SweepResult) and report.requeued == [lost]


def test_run_once_recovers_started_jobs_once_per_recovery_interval(redis_rig: Rig, redis_url: str) -> None:
    """The Redis-only recovery step runs in the first reconciler's run_once and is skipped by the next one within
    RECOVERY_INTERVAL."""
    orphaned = redis_rig.task(attempts=1)
    vanished_worker(redis_url, redis_rig.queue, redis_rig.enqueue(orphaned))
    first, second = redis_rig.reconciler(), redis_rig.reconciler()
    assert first.run_once()["recovered"] == [orphaned]
    assert "recovered" not in second.run_once()
    assert redis_rig.queue.job_ids == [job_id_for(orphaned)]


# -- a job that ends while the recovery pass looks at it ------------------------------------------


@pytest.mark.parametrize("kind", ["download", "delivery"])
def test_recovery_leaves_a_job_that_finished_after_the_registry_was_read(
    kind: str, redis_rig: Rig, workers_here: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recovery pass reads the started registry, then asks whether each job is in a live worker's
    hands. A job its worker finishes in between is in no one's hands by then: it must not be enqueued
    again (a second run of a finished download, a second POST of a delivered event)."""
    reconciler = redis_rig.reconciler()
    recover: Callable[[], list[int] | list[str]]
    if kind == "download":
        queue, recover = redis_rig.queue, reconciler.recover_started
        job = redis_rig.enqueue(redis_rig.task())
    else:
        queue, recover = webhook_queue(redis_rig.settings, redis_rig.redis), reconciler.recover_deliveries
        job = queue.enqueue(defaults.DELIVER_JOB_FUNCTION, "msg_finished", "{}", job_id="webhook-msg_finished")
    finished = ends_while_the_reconciler_looks(monkeypatch, queue, workers_here, job, after="registry")

    assert recover() == []
    assert finished == [job.id], "the job did not finish in the window"
    assert queue.job_ids == []
    assert job.get_status(refresh=True) == JobStatus.FINISHED


def test_recover_started_still_requeues_a_job_popped_by_a_worker_that_died_before_its_horse_started(
    redis_rig: Rig, redis_url: str
) -> None:
    """The re-check before enqueuing again keeps the case where the job's status still says queued: its
    dead worker had popped it and recorded the execution, but no horse marked it started."""
    task_id = redis_rig.task()
    job = redis_rig.enqueue(task_id)
    name = f"test-gone-{uuid.uuid4().hex[:8]}"
    dying = Worker([redis_rig.queue], connection=redis_rig.redis, name=name)
    dying.pid = 2**22 + 1  # beyond any pid_max: no such process on this host
    dying.register_birth()
    redis_rig.queue.remove(job)
    dying.prepare_execution(job)

    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert redis_rig.reconciler().recover_started() == [task_id]
    assert redis_rig.queue.job_ids == [job_id_for(task_id)]
