"""The producer on a real Redis: one deduplicated job per task, payment confirmation, stats, retry backoff."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

import udemy_dl
from tests.support.mariadb import TEST_URL
from tests.support.processes import LoggedProcess, kill_group, pid_running
from tests.support.service import Backend, BusyWorker, run_burst_worker
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl.defaults import DOWNLOAD_JOB_FUNCTION as JOB_FUNCTION
from udemy_dl.errors import InvalidTaskError
from udemy_dl.producer import ConfirmResult, Producer
from udemy_dl.queues import job_id_for, retry_intervals
from udemy_dl.settings import Settings, load_settings
from udemy_dl.store import COMPLETED, FAILED, PENDING, PROCESSING, MySQLStore, utcnow

EMAIL = "buyer@shop.example"
URL = "https://cdn.example/courses/1"
DEAD_ORIGIN = "127.0.0.1:1"
"""A host:port where nothing listens: fetching from it fails at once with a (transient) connection error."""


def horse_pids(worker: LoggedProcess) -> list[int]:
    """The worker's work horse: the child that leads its own process group (RQ calls setpgrp in it)."""
    horses = []
    for pid in worker.children():
        try:
            if os.getpgid(pid) == pid:
                horses.append(pid)
        except ProcessLookupError:
            continue
    return horses


def payload(task_id: int, url: str = URL) -> dict[str, Any]:
    return {"taskId": task_id, "email": EMAIL, "courseUrl": url}


def queued_ids(connection: Redis, settings: Settings) -> list[str]:
    return list(Queue(settings.queue_name, connection=connection).job_ids)


@pytest.fixture
def settings(configure: Callable[..., Settings], redis_conn: Redis) -> Settings:
    return configure()


@pytest.fixture
def producer(settings: Settings, redis_conn: Redis) -> Producer:
    """A producer without a database: enough for add_download_job and stats."""
    return Producer(settings, connection=redis_conn)


# -- add_download_job -----------------------------------------------------------------------------


def test_add_download_job_enqueues_one_job_named_after_the_task(
    producer: Producer, redis_conn: Redis, settings: Settings
) -> None:
    """The job id is download-<taskId>, on the downloads queue, running process_download(payload)."""
    outcome = producer.add_download_job(payload(5))
    assert outcome.created is True
    assert queued_ids(redis_conn, settings) == ["download-5"]
    job = Job.fetch("download-5", connection=redis_conn)
    assert (job.func_name, job.args) == (JOB_FUNCTION, (payload(5),))


def test_add_download_job_twice_returns_the_live_job(producer: Producer, redis_conn: Redis, settings: Settings) -> None:
    """Asking again while the job is queued returns it and enqueues nothing."""
    first = producer.add_download_job(payload(5))
    second = producer.add_download_job(payload(5))
    assert (second.created, second.job.id) == (False, first.job.id)
    assert queued_ids(redis_conn, settings) == ["download-5"]


def test_job_carries_the_configured_timeouts_and_ttls(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """JOB_TIMEOUT, RESULT_TTL and FAILURE_TTL reach the RQ job."""
    settings = configure(JOB_TIMEOUT="120", RESULT_TTL="300", FAILURE_TTL="900")
    Producer(settings, connection=redis_conn).add_download_job(payload(6))
    job = Job.fetch("download-6", connection=redis_conn)
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (120, 300, 900)


def test_job_retries_max_attempts_minus_one_times_with_backoff(
    configure: Callable[..., Settings], redis_conn: Redis
) -> None:
    """MAX_ATTEMPTS=4 means 3 retries, waiting RETRY_DELAY, 2x, 4x (plus jitter)."""
    settings = configure(MAX_ATTEMPTS="4", RETRY_DELAY="10")
    Producer(settings, connection=redis_conn).add_download_job(payload(7))
    job = Job.fetch("download-7", connection=redis_conn)
    assert job.retries_left == 3
    assert job.retry_intervals is not None and len(job.retry_intervals) == 3
    for n, interval in enumerate(job.retry_intervals):
        assert 10 * 2**n <= interval <= round(10 * 2**n * (1 + defaults.RETRY_JITTER))


def test_single_attempt_means_no_retry(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """MAX_ATTEMPTS=1 enqueues without an RQ Retry."""
    settings = configure(MAX_ATTEMPTS="1")
    Producer(settings, connection=redis_conn).add_download_job(payload(8))
    assert not Job.fetch("download-8", connection=redis_conn).retries_left


def test_add_download_job_refuses_bad_data_and_queues_nothing(
    producer: Producer, redis_conn: Redis, settings: Settings
) -> None:
    """Invalid task data raises InvalidTaskError before anything reaches Redis."""
    with pytest.raises(InvalidTaskError, match="not-an-email"):
        producer.add_download_job({"taskId": 9, "email": "not-an-email", "courseUrl": URL})
    assert queued_ids(redis_conn, settings) == []


def test_module_level_api_uses_the_process_settings(redis_conn: Redis) -> None:
    """udemy_dl.add_download_job / get_queue_stats / close work on the settings from the environment."""
    job = udemy_dl.add_download_job(payload(11))
    try:
        assert job.id == "download-11"
        assert udemy_dl.get_queue_stats()["waiting"] == 1
    finally:
        udemy_dl.close()
    assert Queue(defaults.DOWNLOAD_QUEUE, connection=redis_conn).job_ids == ["download-11"]


# -- re-enqueue once the job is over --------------------------------------------------------------


def test_add_download_job_enqueues_again_after_the_job_finished(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """A finished job does not block a new one: asking again enqueues a fresh job."""
    settings = configure(DATABASE_URL=backend.url, ALLOWED_HOSTS="cdn.example")
    task_id = backend.store.insert_task(EMAIL, URL, COMPLETED)  # the job finds it done and finishes at once
    producer = Producer(settings, connection=redis_conn)
    producer.add_download_job(payload(task_id))
    run_burst_worker(redis_conn, settings)
    assert Job.fetch(job_id_for(task_id), connection=redis_conn).get_status() == JobStatus.FINISHED

    again = producer.add_download_job(payload(task_id))
    assert again.created is True
    assert again.job.get_status() == JobStatus.QUEUED
    assert queued_ids(redis_conn, settings) == [job_id_for(task_id)]


def test_add_download_job_enqueues_again_after_the_job_failed(
    configure: Callable[..., Settings], redis_conn: Redis, mysql_store: MySQLStore
) -> None:
    """A failed job does not block a new one (the operator's requeue path)."""
    settings = configure(DATABASE_URL=TEST_URL, ALLOWED_HOSTS=DEAD_ORIGIN, MAX_ATTEMPTS="1")
    task_id = mysql_store.insert_task(EMAIL, f"http://{DEAD_ORIGIN}/course", PROCESSING)
    producer = Producer(settings, connection=redis_conn)
    producer.add_download_job(payload(task_id, f"http://{DEAD_ORIGIN}/course"))
    run_burst_worker(redis_conn, settings)
    assert Job.fetch(job_id_for(task_id), connection=redis_conn).get_status() == JobStatus.FAILED

    again = producer.add_download_job(payload(task_id, f"http://{DEAD_ORIGIN}/course"))
    assert again.created is True
    assert again.job.get_status() == JobStatus.QUEUED


def test_job_waiting_for_its_retry_counts_as_queued(
    configure: Callable[..., Settings], redis_conn: Redis, mysql_store: MySQLStore
) -> None:
    """While a job is scheduled for a retry, asking again returns it instead of enqueuing a second one."""
    url = f"http://{DEAD_ORIGIN}/course"
    settings = configure(
        DATABASE_URL=TEST_URL,
        ALLOWED_HOSTS=DEAD_ORIGIN,
        MAX_ATTEMPTS="2",
        RETRY_DELAY="600",
    )
    task_id = mysql_store.insert_task(EMAIL, url, PROCESSING)
    producer = Producer(settings, connection=redis_conn)
    producer.add_download_job(payload(task_id, url))
    run_burst_worker(redis_conn, settings)  # first attempt fails; the retry waits 600 s
    assert Job.fetch(job_id_for(task_id), connection=redis_conn).get_status() == JobStatus.SCHEDULED

    again = producer.add_download_job(payload(task_id, url))
    assert (again.created, again.job.get_status()) == (False, JobStatus.SCHEDULED)
    assert queued_ids(redis_conn, settings) == []


def test_job_started_by_a_killed_worker_is_replaced(busy_worker: BusyWorker) -> None:
    """A job left `started` by a worker that was killed (kill -9) is not live: asking again enqueues a new one."""
    assert busy_worker.add_job().created is False  # its worker is alive: still live

    busy_worker.worker.kill()
    again = busy_worker.add_job()
    assert (again.created, again.job.get_status()) == (True, JobStatus.QUEUED)


def test_killed_worker_takes_its_horse_down_and_frees_the_task(busy_worker: BusyWorker) -> None:
    """kill -9 of a worker's main process kills its horse too, so the task can be enqueued anew at once."""
    worker = busy_worker.worker
    horses = wait_for(lambda: horse_pids(worker), timeout=20, what="the work horse to fork")
    children = worker.children()
    try:
        os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as `kill -9 <pid>` or the OOM killer would
        worker.process.wait(timeout=15)
        wait_for(lambda: not pid_running(horses[0]), timeout=15, what="the orphaned horse to die")
        assert busy_worker.add_job().created is True
    finally:
        for pid in children:
            kill_group(pid)


# -- confirm_payment ------------------------------------------------------------------------------


def test_twenty_concurrent_confirmations_make_exactly_one_job(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """20 threads, each with its own Producer, confirm one task at once: one job, one enqueue, 19 alreadyQueued."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, PENDING)
    barrier = threading.Barrier(20)
    results: list[ConfirmResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def confirm() -> None:
        own = Producer(settings)
        try:
            barrier.wait(timeout=10)
            result = own.confirm_payment([task_id])
            with lock:
                results.append(result)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=confirm) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 20
    assert sum(len(r.enqueued) for r in results) == 1
    assert sum(len(r.already_queued) for r in results) == 19
    assert [r.refused for r in results if r.refused] == []
    assert queued_ids(redis_conn, settings) == [job_id_for(task_id)]
    assert redis_conn.keys("rq:job:*") == [f"rq:job:{job_id_for(task_id)}".encode()]


def test_second_confirmation_changes_nothing(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """Confirming twice: the second call reports alreadyQueued and leaves job and row as they were."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, PENDING)
    producer = Producer(settings, connection=redis_conn, store=backend.store)
    first = producer.confirm_payment([task_id])
    job_before = Job.fetch(job_id_for(task_id), connection=redis_conn)
    row_before = backend.store.get(task_id)

    second = producer.confirm_payment([task_id])
    assert first.as_dict() == {"enqueued": [task_id], "alreadyQueued": [], "refused": []}
    assert second.as_dict() == {"enqueued": [], "alreadyQueued": [task_id], "refused": []}
    assert queued_ids(redis_conn, settings) == [job_id_for(task_id)]
    assert Job.fetch(job_id_for(task_id), connection=redis_conn).enqueued_at == job_before.enqueued_at
    assert backend.store.get(task_id) == row_before


def test_confirmation_marks_the_row_processing(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """A confirmed (paid) pending task is processing in the database before its job runs."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, PENDING)
    Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([task_id])
    row = backend.store.get(task_id)
    assert row is not None and row.status == PROCESSING


def test_confirmation_deduplicates_ids_within_one_call(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """The same task named three times in one call (int and digit string) is enqueued once."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, PENDING)
    result = Producer(settings, connection=redis_conn, store=backend.store).confirm_payment(
        [task_id, str(task_id), task_id]
    )
    assert result.as_dict() == {"enqueued": [task_id], "alreadyQueued": [], "refused": []}


@pytest.mark.parametrize(("status", "reason"), [(COMPLETED, "task is completed"), (FAILED, "task is failed")])
def test_confirmation_refuses_settled_tasks_with_a_reason(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend, status: str, reason: str
) -> None:
    """A completed or failed task is not downloaded again by a payment confirmation; the reason says why."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, status)
    result = Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([task_id])
    assert result.refused == [{"taskId": task_id, "reason": reason}]
    assert (result.enqueued, result.already_queued) == ([], [])
    assert queued_ids(redis_conn, settings) == []


def test_confirmation_refuses_an_unknown_task(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """An id with no row is refused as 'no such task'."""
    settings = configure(DATABASE_URL=backend.url)
    result = Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([424242])
    assert result.refused == [{"taskId": 424242, "reason": "no such task"}]
    assert queued_ids(redis_conn, settings) == []


@pytest.mark.parametrize("raw", ["abc", -1, True, 1.5])
def test_confirmation_refuses_a_malformed_id_naming_it(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend, raw: object
) -> None:
    """A taskId that is not a positive integer is refused with a reason that shows it."""
    settings = configure(DATABASE_URL=backend.url)
    result = Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([raw])
    assert [item["taskId"] for item in result.refused] == [raw]
    assert repr(raw) in result.refused[0]["reason"]


def test_confirmation_fails_a_row_with_bad_data_at_once(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """A paid row whose email is invalid is refused, marked failed with the reason, and never queued."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task("not-an-email", URL, PENDING)
    result = Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([task_id])
    assert [item["taskId"] for item in result.refused] == [task_id]
    row = backend.store.get(task_id)
    assert row is not None and row.status == FAILED and "not-an-email" in (row.error_message or "")
    assert queued_ids(redis_conn, settings) == []


def test_confirmation_of_a_row_with_bad_data_tells_the_payment_service(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend, webhook_secret: str
) -> None:
    """The bad-data failure found at confirmation queues one download.failed webhook with the reason."""
    settings = configure(DATABASE_URL=backend.url, WEBHOOK_URL="http://127.0.0.1:1/hook", API_SECRET_KEY=webhook_secret)
    task_id = backend.store.insert_task("not-an-email", URL, PENDING)
    Producer(settings, connection=redis_conn, store=backend.store).confirm_payment([task_id])
    jobs = Queue(settings.webhook_queue_name, connection=redis_conn).get_jobs()
    assert len(jobs) == 1
    event = json.loads(jobs[0].args[1])
    assert (event["type"], event["data"]["taskId"], event["data"]["status"]) == ("download.failed", task_id, FAILED)
    assert "not-an-email" in event["data"]["error"]
    row = backend.store.get(task_id)
    assert row is not None and f"webhook-{row.pending_event}" == jobs[0].id  # in the outbox until acknowledged


def test_requeue_failed_reopens_and_enqueues(
    configure: Callable[..., Settings], redis_conn: Redis, backend: Backend
) -> None:
    """The operator's requeue puts a failed task back to processing with no attempts and enqueues it."""
    settings = configure(DATABASE_URL=backend.url)
    task_id = backend.store.insert_task(EMAIL, URL, PROCESSING)
    backend.store.begin_attempt(task_id, 3)
    backend.store.mark_failed(task_id, "boom", None, utcnow())
    result = Producer(settings, connection=redis_conn, store=backend.store).requeue_failed()
    assert result.enqueued == [task_id]
    row = backend.store.get(task_id)
    assert row is not None and (row.status, row.attempts) == (PROCESSING, 0)
    assert queued_ids(redis_conn, settings) == [job_id_for(task_id)]


# -- stats ----------------------------------------------------------------------------------------


def test_queue_stats_report_every_documented_count(producer: Producer) -> None:
    """get_queue_stats has the old producer's counts (plus deferred and webhook queue counts), all ints."""
    stats = producer.get_queue_stats()
    assert set(stats) == {
        "waiting",
        "waiting_high",
        "active",
        "scheduled",
        "deferred",
        "completed",
        "failed",
        "workers",
        "webhooks_waiting",
        "webhooks_failed",
    }
    assert all(isinstance(value, int) for value in stats.values())


def test_queue_stats_count_waiting_jobs(producer: Producer) -> None:
    """Two enqueued tasks show as waiting 2 with nothing active, finished, failed, or listening."""
    producer.add_download_job(payload(1))
    producer.add_download_job(payload(2))
    stats = producer.get_queue_stats()
    assert (stats["waiting"], stats["active"], stats["completed"], stats["failed"], stats["workers"]) == (
        2,
        0,
        0,
        0,
        0,
    )


# -- retry backoff --------------------------------------------------------------------------------


def test_retry_intervals_one_per_retry() -> None:
    """There is one interval per retry: MAX_ATTEMPTS - 1 of them."""
    for attempts in (1, 2, 3, 6):
        settings = load_settings(environ={"MAX_ATTEMPTS": str(attempts)}, env_file=None)
        assert len(retry_intervals(settings)) == attempts - 1


def test_retry_intervals_double_within_jitter_bounds() -> None:
    """Interval n lies in [RETRY_DELAY * 2^n, RETRY_DELAY * 2^n * 1.25] for every random draw."""
    settings = load_settings(environ={"MAX_ATTEMPTS": "5", "RETRY_DELAY": "20"}, env_file=None)
    for seed in range(300):
        intervals = retry_intervals(settings, random.Random(seed))
        for n, interval in enumerate(intervals):
            assert 20 * 2**n <= interval <= round(20 * 2**n * (1 + defaults.RETRY_JITTER)), (seed, intervals)


def test_retry_intervals_reach_both_jitter_extremes() -> None:
    """The jitter really stretches: a draw of 0 gives the bare backoff, a draw of the maximum gives +25 %."""

    class Extreme(random.Random):
        def __init__(self, pick_high: bool) -> None:
            super().__init__(0)
            self.pick_high = pick_high

        def uniform(self, a: float, b: float) -> float:
            return b if self.pick_high else a

    settings = load_settings(environ={"MAX_ATTEMPTS": "3", "RETRY_DELAY": "20"}, env_file=None)
    assert retry_intervals(settings, Extreme(pick_high=False)) == [20, 40]
    assert retry_intervals(settings, Extreme(pick_high=True)) == [25, 50]


def test_retry_intervals_vary_between_jobs() -> None:
    """Two jobs failing together do not retry in lockstep: the jitter differs between draws."""
    settings = load_settings(environ={"MAX_ATTEMPTS": "3", "RETRY_DELAY": "100"}, env_file=None)
    assert len({tuple(retry_intervals(settings)) for _ in range(50)}) > 1
