"""Settling a task at the edges, on real Redis and MariaDB/SQLite: a run that died between its
steps, a late run, a run cut off from Redis, a reconciler that cannot trust Redis's registries.

Each test names the window it walks; the crash-point matrix with real killed workers is in
tests/faults/test_crash_points.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from tests.support.redis_servers import RedisServer
from tests.support.service import Backend, Rig
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl.context import get_context
from udemy_dl.errors import PermanentError
from udemy_dl.fetch import FetchedFile, FetchResult
from udemy_dl.folders import final_path, staging_path, write_record
from udemy_dl.lease import TaskLease, lease_key
from udemy_dl.outcome import record_failed
from udemy_dl.payload import TaskPayload
from udemy_dl.process_control import HAND_BACK
from udemy_dl.queues import job_id_for
from udemy_dl.reconciler import SWEEP_LOCK
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, PROCESSING
from udemy_dl.webhooks import final_event
from udemy_dl.worker_rq import process_download

pytestmark = pytest.mark.usefixtures("redis_conn")


def finished_folder(settings: Settings, task_id: int) -> Path:
    """A verified folder moved into place, as a run leaves it right after its rename."""
    final = final_path(settings, task_id)
    final.mkdir(parents=True)
    (final / "lesson.mp4").write_bytes(b"x" * 10)
    write_record(final, {"files": [{"path": "lesson.mp4", "bytes": 10}], "bytes": 10, "title": "Course"})
    return final


def complete_staging(settings: Settings, task_id: int, course_url: str) -> Path:
    """A verified course in staging with its record, as a run leaves it just before its rename."""
    staging = staging_path(settings, task_id)
    staging.mkdir(parents=True)
    (staging / "lesson.mp4").write_bytes(b"x" * 10)
    files = [{"path": "lesson.mp4", "size": 10, "sha256": "0" * 64}]
    write_record(staging, {"files": files, "bytes": 10, "title": "Course", "courseUrl": course_url})
    return final_path(settings, task_id)


def leave_result(rig: Rig, task_id: int, where: str) -> Path:
    """The course a run fetched and verified before it died: moved into place, or still in staging."""
    if where == "final":
        return finished_folder(rig.settings, task_id)
    return complete_staging(rig.settings, task_id, rig.row(task_id).course_url)


def payload(rig: Rig, task_id: int) -> dict[str, Any]:
    row = rig.row(task_id)
    return {"taskId": row.id, "email": row.email, "courseUrl": row.course_url}


def final_event_ids(redis: Redis, settings: Settings) -> list[str]:
    """Webhook-ids of the final events queued for delivery."""
    jobs = Queue(settings.webhook_queue_name, connection=redis).get_jobs()
    return [job.args[0] for job in jobs if "_completed_" in job.args[0] or "_failed_" in job.args[0]]


@pytest.fixture
def hooked_rig(configure: Callable[..., Settings], redis_conn: Redis, backend: Backend) -> Rig:
    """The reconciler's world on each store back end, with a webhook receiver configured (nothing
    listens: deliveries only get queued)."""
    settings = configure(
        DATABASE_URL=backend.url,
        ALLOWED_HOSTS="cdn.example",
        WEBHOOK_URL="http://127.0.0.1:9/hook",
        API_SECRET_KEY="whsec_" + "A" * 44,
        MAX_ATTEMPTS="3",
    )
    return Rig(settings, backend.store, redis_conn)


# -- a run that died after its rename, on its last attempt (issue 8, item 2) ----------------------


@pytest.mark.parametrize("where", ["final", "staging"])
def test_a_rerun_records_files_already_in_place_even_with_no_attempts_left(hooked_rig: Rig, where: str) -> None:
    """The horse died after the rename (or after writing the record, before the rename) and before
    recording it, on its last attempt: the next run records the task `completed` (not `failed`),
    with the files in place, and queues one download.completed."""
    task_id = hooked_rig.task(PROCESSING, attempts=3)
    final = leave_result(hooked_rig, task_id, where)

    result = process_download(payload(hooked_rig, task_id))

    assert result["success"] is True, result
    row = hooked_rig.row(task_id)
    assert (row.status, row.output_path) == (COMPLETED, str(final))
    assert (final / "lesson.mp4").is_file()
    assert [event for event in final_event_ids(hooked_rig.redis, hooked_rig.settings) if "_completed_" in event]
    assert not [event for event in final_event_ids(hooked_rig.redis, hooked_rig.settings) if "_failed_" in event]


@pytest.mark.parametrize("where", ["final", "staging"])
def test_the_sweep_records_files_already_in_place_even_with_no_attempts_left(hooked_rig: Rig, where: str) -> None:
    """Same windows, found by the reconciler: `completed`, files in place, not counted as failed."""
    task_id = hooked_rig.task(PROCESSING, attempts=3)
    final = leave_result(hooked_rig, task_id, where)

    result = hooked_rig.reconciler().sweep()

    assert result.failed == []
    assert (hooked_rig.row(task_id).status, (final / "lesson.mp4").is_file()) == (COMPLETED, True)
    assert not [event for event in final_event_ids(hooked_rig.redis, hooked_rig.settings) if "_failed_" in event]


# -- the reconciler after Redis lost its data (item 16) and with a skewed clock (item 18) ---------


def plant_live_lease(redis: Redis, task_id: int) -> str:
    """The lease of a live run elsewhere (another host, renewing it)."""
    token = f"worker-elsewhere.example|4242|{job_id_for(task_id)}|0123456789abcdef"
    assert redis.set(lease_key(task_id), token, px=60_000)
    return token


def test_the_sweep_leaves_a_leased_last_attempt_alone_when_redis_forgot_its_job(hooked_rig: Rig) -> None:
    """Redis lost its data; the run on its last attempt has taken its lease back but its job is
    gone from every registry: the sweep must not fail it (nor queue a second run)."""
    task_id = hooked_rig.task(PROCESSING, attempts=3)
    staging = staging_path(hooked_rig.settings, task_id)
    staging.mkdir(parents=True)
    (staging / "part").write_bytes(b"half")
    plant_live_lease(hooked_rig.redis, task_id)

    result = hooked_rig.reconciler().sweep()

    assert (result.failed, result.requeued) == ([], [])
    assert hooked_rig.row(task_id).status == PROCESSING
    assert (staging / "part").read_bytes() == b"half", "the live run's staging folder stays where it is"


def test_after_redis_is_emptied_no_host_sweeps_before_runs_retook_their_leases(
    configure: Callable[..., Settings], hooked_rig: Rig
) -> None:
    """Redis emptied under running reconcilers (its sweep lock gone with the data): the reconciler
    that notices holds every host's sweep off for a lease's lifetime."""
    hooked_rig.settings = configure(DATABASE_URL=hooked_rig.settings.database_url or "", RECONCILE_INTERVAL="1")
    first, second = hooked_rig.reconciler(), hooked_rig.reconciler()
    first.run_once()
    second.run_once()
    task_id = hooked_rig.task(PROCESSING, attempts=3)

    hooked_rig.redis.flushdb()
    reports = [first.run_once(), second.run_once()]

    assert all("sweep" not in report for report in reports), reports
    ttl = hooked_rig.redis.ttl(SWEEP_LOCK)
    assert isinstance(ttl, int) and defaults.LEASE_TTL - 2 <= ttl <= defaults.LEASE_TTL
    assert hooked_rig.row(task_id).status == PROCESSING


def test_a_reconciler_with_a_fast_clock_does_not_take_live_jobs_for_abandoned(hooked_rig: Rig) -> None:
    """RQ's registry scores are written with the worker's clock; read by a host whose clock is two
    minutes ahead, a live job looks abandoned. The reconciler must not act on that: the job stays
    started, and its task (last attempt, lease held) is neither failed nor queued again."""
    from rq import Worker

    task_id = hooked_rig.task(PROCESSING, attempts=3)
    job = hooked_rig.enqueue(task_id)
    queue = Queue(hooked_rig.settings.queue_name, connection=hooked_rig.redis)
    worker = Worker([queue], connection=hooked_rig.redis, name=f"live-{task_id}-{time.monotonic_ns()}")
    worker.register_birth()
    queue.remove(job)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    registry = StartedJobRegistry(queue=queue)
    # As the skewed reconciler sees it: the job's expiry already two minutes past.
    members: list[bytes] = hooked_rig.redis.zrange(registry.key, 0, -1)  # type: ignore[assignment]
    for member in members:
        hooked_rig.redis.zadd(registry.key, {member: time.time() - 120})
    plant_live_lease(hooked_rig.redis, task_id)

    try:
        report = hooked_rig.reconciler().run_once(force_sweep=True)
    finally:
        worker.register_death()

    assert report["recovered"] == [] and report["sweep"].failed == [] and report["sweep"].requeued == []
    assert Job.fetch(job.id, connection=hooked_rig.redis).get_status() == JobStatus.STARTED
    assert hooked_rig.row(task_id).status == PROCESSING


# -- a late run (item 17) ---------------------------------------------------------------------------


def test_a_failure_recorded_at_a_stale_attempt_leaves_a_reopened_task_alone(hooked_rig: Rig) -> None:
    """requeue-failed reopened the task; a late run of the old attempt 3 fails: the row stays
    `processing`, and no second download.failed is queued."""
    task_id = hooked_rig.task(PROCESSING, attempts=3)
    task = TaskPayload(
        task_id=task_id, email=hooked_rig.row(task_id).email, course_url=hooked_rig.row(task_id).course_url
    )
    store, settings, redis = hooked_rig.store, hooked_rig.settings, hooked_rig.redis
    assert record_failed(settings, store, redis, task, "first failure", attempt=3)
    assert hooked_rig.producer().requeue_failed([task_id]).enqueued == [task_id]
    queued_before = final_event_ids(redis, settings)

    assert record_failed(settings, store, redis, task, "late failure", attempt=3) is False

    row = hooked_rig.row(task_id)
    assert (row.status, row.attempts, row.error_message) == (PROCESSING, 0, None)
    assert final_event_ids(redis, settings) == queued_before


class LeaseStealingFetcher:
    """A fetch that, while it runs, loses its lease to another run, then fails for good."""

    bytes_transferred = 0

    def __init__(self, redis: Redis, task_id: int) -> None:
        self.redis, self.task_id = redis, task_id

    def reset_count(self) -> None:
        pass

    def fetch(self, url: str, staging: Path, **_: object) -> object:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "theirs").write_bytes(b"the other run's bytes")
        plant_live_lease(self.redis, self.task_id)
        raise PermanentError(f"HTTP 404 for {url}")


def test_a_run_that_lost_its_lease_does_not_record_its_failure(hooked_rig: Rig) -> None:
    """A run whose lease another run took fails permanently: it records nothing, leaves the
    staging folder (now the other run's) alone, gives back no attempt and sends no event."""
    task_id = hooked_rig.task(PROCESSING)
    context = get_context()
    context.fetcher = LeaseStealingFetcher(hooked_rig.redis, task_id)  # type: ignore[assignment]

    result = process_download(payload(hooked_rig, task_id))

    assert result.get("leaseLost") is True, result
    row = hooked_rig.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 1)
    assert (staging_path(hooked_rig.settings, task_id) / "theirs").is_file()
    assert final_event_ids(hooked_rig.redis, hooked_rig.settings) == []


class LeaseLosingBeforeRenameFetcher(LeaseStealingFetcher):
    """A fetch that succeeds, but another run takes the lease just before the files would move."""

    def fetch(self, url: str, staging: Path, **_: object) -> object:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "lesson.mp4").write_bytes(b"x" * 10)
        plant_live_lease(self.redis, self.task_id)
        return FetchResult(title="Course", files=(FetchedFile(path="lesson.mp4", size=10, sha256="0" * 64),))


def test_a_run_that_lost_its_lease_before_the_rename_moves_nothing_into_place(hooked_rig: Rig) -> None:
    """The lease changed hands after the fetch: the run moves nothing into place, settles nothing
    and gives back no attempt (the count is the lease holder's now: it may be a reopened task's);
    the run that holds the lease decides."""
    task_id = hooked_rig.task(PROCESSING)
    get_context().fetcher = LeaseLosingBeforeRenameFetcher(hooked_rig.redis, task_id)  # type: ignore[assignment]

    result = process_download(payload(hooked_rig, task_id))

    assert result.get("leaseLost") is True, result
    assert not final_path(hooked_rig.settings, task_id).exists()
    assert (staging_path(hooked_rig.settings, task_id) / "lesson.mp4").is_file()
    row = hooked_rig.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 1)
    assert final_event_ids(hooked_rig.redis, hooked_rig.settings) == []
    assert not HAND_BACK.is_set(), "a lost lease stops its own run, not the next one in this process"


# -- a final event whose delivery Redis dropped (item 19) -------------------------------------------


def test_the_sweep_resends_a_final_event_whose_delivery_sits_in_no_queue(hooked_rig: Rig) -> None:
    """A stopping worker popped a delivery and dropped it: the job says `queued` but is in no list
    and no worker's hands. The sweep puts the same job (same webhook-id) back on its queue."""
    task_id = hooked_rig.task(PROCESSING, attempts=1)
    row = hooked_rig.row(task_id)
    task = TaskPayload(task_id=task_id, email=row.email, course_url=row.course_url)
    assert record_failed(hooked_rig.settings, hooked_rig.store, hooked_rig.redis, task, "HTTP 404", attempt=1)
    pending = hooked_rig.row(task_id).pending_event
    assert pending
    queue = Queue(hooked_rig.settings.webhook_queue_name, connection=hooked_rig.redis)
    assert hooked_rig.redis.lrem(queue.key, 0, f"webhook-{pending}") == 1  # popped, never run

    result = hooked_rig.reconciler().sweep()

    assert result.events_resent == [task_id]
    assert queue.job_ids == [f"webhook-{pending}"]
    assert final_event(hooked_rig.row(task_id))[0] == pending


def test_the_sweep_does_not_resend_a_delivery_still_waiting_in_its_queue(hooked_rig: Rig) -> None:
    """The control: a delivery still in its queue is left to it."""
    task_id = hooked_rig.task(PROCESSING, attempts=1)
    row = hooked_rig.row(task_id)
    task = TaskPayload(task_id=task_id, email=row.email, course_url=row.course_url)
    assert record_failed(hooked_rig.settings, hooked_rig.store, hooked_rig.redis, task, "HTTP 404", attempt=1)

    assert hooked_rig.reconciler().sweep().events_resent == []
    assert len(Queue(hooked_rig.settings.webhook_queue_name, connection=hooked_rig.redis).job_ids) == 1


# -- a run cut off from Redis (item 20) -------------------------------------------------------------


def test_still_held_answers_false_once_redis_has_been_silent_for_the_leases_lifetime(
    private_redis: RedisServer,
) -> None:
    """Cut off from Redis, a run cannot confirm its lease: still_held() keeps asking for the rest
    of the lease's lifetime, then answers False (it used to trust the last renewal forever)."""
    connection = Redis.from_url(private_redis.url, socket_connect_timeout=0.2, socket_timeout=0.2)
    lease = TaskLease(connection, 41, "download-41", ttl=2)
    lease.acquire()
    try:
        private_redis.stop()
        assert lease.still_held() is False
        assert lease.lost.is_set() and not lease.taken_over
    finally:
        lease._stop.set()
        connection.close()


def test_renewals_give_up_and_stop_the_run_after_the_leases_lifetime_without_redis(
    private_redis: RedisServer,
) -> None:
    """The renewal thread does not retry forever: after a lease's lifetime without an answer it
    marks the lease lost and sets the run's stop event."""
    import threading

    connection = Redis.from_url(private_redis.url, socket_connect_timeout=0.2, socket_timeout=0.2)
    stop = threading.Event()
    lease = TaskLease(connection, 42, "download-42", ttl=2, also_set=stop)
    lease.acquire()
    try:
        private_redis.stop()
        wait_for(stop.is_set, timeout=10, what="the run's stop event")
        assert lease.lost.is_set()
        assert not lease.taken_over, "cut off, not taken: the run gives its attempt back"
    finally:
        lease._stop.set()
        connection.close()


def test_still_held_rides_out_a_short_outage(private_redis: RedisServer) -> None:
    """The control: Redis back within the lease's lifetime, the lease is confirmed and kept."""
    connection = Redis.from_url(private_redis.url, socket_connect_timeout=0.2, socket_timeout=0.2)
    lease = TaskLease(connection, 43, "download-43", ttl=20)
    lease.acquire()
    try:
        private_redis.restart()  # no persistence: the lease vanished, and is taken again
        assert lease.still_held() is True
        assert connection.get(lease_key(43)) == lease.token.encode()
    finally:
        lease.release()
        connection.close()
