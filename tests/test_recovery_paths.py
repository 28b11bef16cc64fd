"""Recovery paths, each on its own: store retries through a database outage, used-up attempts, hand-back on stop,
the per-task lease inside a run, dead schedulers' locks, re-registration after Redis lost a worker.

Fast and focused; the long scenarios with real outages are in tests/faults/.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler

from dev.devservers import WebhookReceiver
from tests.support.mariadb import MYSQL_HOST, MYSQL_PORT, TEST_DB, database_url
from tests.support.processes import LoggedProcess
from tests.support.relay import RefusingServer, Relay
from tests.support.service import Backend, Service, run_burst_worker
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl import job as download_job
from udemy_dl.context import get_context
from udemy_dl.download_worker import WAKE_KEY, DownloadWorker, release_dead_scheduler_locks
from udemy_dl.errors import LeaseBusyError, StoreError
from udemy_dl.fetch import PARTS_DIRNAME
from udemy_dl.lease import TaskLease, lease_key
from udemy_dl.process_control import HAND_BACK
from udemy_dl.queues import job_id_for, worker_queues
from udemy_dl.store import COMPLETED, FAILED, PROCESSING, MySQLStore, utcnow
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.worker_rq import process_download

EMAIL = "buyer@shop.example"
URL = "https://cdn.example/courses/1"


@pytest.fixture
def proxy(mysql_url: str) -> Iterator[Relay]:
    """A relay to MariaDB that the test can cut (connections refused, as while the database restarts)."""
    relay = Relay((MYSQL_HOST, MYSQL_PORT)).start()
    yield relay
    relay.cut()


def timed(action: Callable[[], object]) -> tuple[float, BaseException | None]:
    """Run *action*; return the seconds it took and what it raised (None if it returned)."""
    started = time.monotonic()
    try:
        action()
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.fixture
def refusing_database() -> Iterator[RefusingServer]:
    """A port where a database would be: each connection is accepted and closed at once."""
    database = RefusingServer()
    yield database
    database.close()


def test_unreachable_database_is_retried_with_backoff_until_retry_for(refusing_database: RefusingServer) -> None:
    """With retry_for=2, a statement reconnects a few times (backoff, not a busy loop), then raises StoreError."""
    store = MySQLStore(database_url(TEST_DB, refusing_database.port), retry_for=2)
    with pytest.raises(StoreError):
        store.ping()
    assert 2 <= refusing_database.connections <= 6, refusing_database.connections


def test_retry_for_zero_fails_at_once(refusing_database: RefusingServer) -> None:
    """With retry_for=0 (the default), an unreachable database raises StoreError after one try."""
    store = MySQLStore(database_url(TEST_DB, refusing_database.port), retry_for=0)
    with pytest.raises(StoreError):
        store.ping()
    assert refusing_database.connections == 1


def test_set_progress_never_retries(refusing_database: RefusingServer) -> None:
    """set_progress is best effort: even with retry_for set, an unreachable database fails it after one try."""
    store = MySQLStore(database_url(TEST_DB, refusing_database.port), retry_for=10)
    with pytest.raises(StoreError):
        store.set_progress(1, 50)
    assert refusing_database.connections == 1


def test_statement_succeeds_when_the_database_returns_within_the_window(proxy: Relay, mysql_store: MySQLStore) -> None:
    """The database goes away (connections cut and refused) and comes back 1 s later: a status change issued during
    the outage waits and is applied, exactly once."""
    task_id = mysql_store.insert_task(EMAIL, URL, PROCESSING)
    store = MySQLStore(database_url(TEST_DB, proxy.port), retry_for=15)
    try:
        assert store.get(task_id) is not None  # connected through the proxy
        proxy.cut()
        back = threading.Timer(1.0, proxy.restore)  # the outage lasts one second
        back.start()
        elapsed, error = timed(lambda: store.begin_attempt(task_id, 3))
        back.join()
        assert error is None
        assert elapsed >= 0.9, elapsed
        row = mysql_store.get(task_id)
        assert row is not None and row.attempts == 1
    finally:
        store.close()


@pytest.mark.parametrize(
    ("status", "attempts", "given_back", "left"),
    [(PROCESSING, 2, True, 1), (PROCESSING, 0, False, 0), (COMPLETED, 1, False, 1), (FAILED, 1, False, 1)],
    ids=["processing", "no-attempt-counted", "completed", "failed"],
)
def test_undo_attempt_only_gives_back_a_counted_attempt_of_a_processing_row(
    backend: Backend, status: str, attempts: int, given_back: bool, left: int
) -> None:
    """undo_attempt decrements attempts only on a processing row that has counted one; never below 0, never on a
    settled row."""
    task_id = backend.store.insert_task(EMAIL, URL, PROCESSING)
    for _ in range(attempts):
        backend.store.begin_attempt(task_id, 3)
    if status == COMPLETED:
        backend.store.mark_completed(task_id, "/done", 1, utcnow())
    elif status == FAILED:
        backend.store.mark_failed(task_id, "boom", None, utcnow())
    assert backend.store.undo_attempt(task_id, attempts) is given_back
    row = backend.store.get(task_id)
    assert row is not None and (row.status, row.attempts) == (status, left)


# -- process_download's recovery paths --------------------------------------------------------------


def outcome_events(receiver: WebhookReceiver) -> list[tuple[str, int]]:
    """(type, taskId) of each verified download.completed / download.failed event the receiver accepted."""
    return [
        (hook.event_type, hook.body["data"]["taskId"])
        for hook in receiver.accepted()
        if hook.event_type in (EVENT_COMPLETED, EVENT_FAILED)
    ]


@pytest.fixture
def svc(svc: Service) -> Service:
    """The service with the default RETRY_DELAY: no retry falls due while a test runs."""
    svc.reconfigure(RETRY_DELAY=str(defaults.RETRY_DELAY))
    return svc


@pytest.fixture(autouse=True)
def hand_back_cleared() -> Iterator[None]:
    """HAND_BACK is process-wide (a work horse's flag); in-process runs must not leak it to the next test."""
    HAND_BACK.clear()
    yield
    HAND_BACK.clear()


def set_hand_back_once_bytes_arrive(svc: Service, task_id: int) -> threading.Thread:
    """From a thread: wait until the download has written bytes to staging, then ask it to hand the task back."""

    def watch() -> None:
        try:
            wait_for(lambda: svc.partial_bytes(task_id) > 0, timeout=30, what="the first bytes in staging")
        finally:
            HAND_BACK.set()

    thread = threading.Thread(target=watch, name="hand-back", daemon=True)
    thread.start()
    return thread


def test_task_with_attempts_used_up_is_failed_without_fetching(svc: Service) -> None:
    """A row already at MAX_ATTEMPTS (every earlier run died) is settled failed at once: nothing is fetched, the
    reason says why, the payment service gets download.failed."""
    url = svc.origin.add_course("poison", {"a.bin": 100})
    task_id = svc.paid_task(url)
    for _ in range(svc.settings.max_attempts):
        svc.store.begin_attempt(task_id, 3)

    result = process_download(svc.payload(task_id))

    assert (result["success"], result["taskId"]) == (False, task_id)
    assert "no attempts left" in result["error"]
    assert svc.origin.requests.paths() == []
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (FAILED, svc.settings.max_attempts)
    assert "no attempts left" in (row.error_message or "")
    run_burst_worker(svc.redis, svc.settings)
    assert outcome_events(svc.receiver) == [(EVENT_FAILED, task_id)]


def test_interrupted_download_is_handed_back_and_resumes_from_its_bytes(svc: Service) -> None:
    """HAND_BACK set mid-download: the run returns handedBack, gives its attempt back and keeps its bytes in
    staging; the next run continues the file with a Range request from there and completes in one attempt."""
    svc.origin.throttle = 2_000_000  # bytes/s: 8 MB take 4 s, ample time to interrupt after the first chunk
    url = svc.origin.add_course("handback", {"a.bin": 8_000_000})
    task_id = svc.paid_task(url)
    watcher = set_hand_back_once_bytes_arrive(svc, task_id)

    result = process_download(svc.payload(task_id))
    watcher.join(timeout=5)

    assert result == {"success": False, "taskId": task_id, "handedBack": True}
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 0)
    kept = svc.partial_bytes(task_id)
    assert 0 < kept < 8_000_000
    assert svc.redis.exists(lease_key(task_id)) == 0

    HAND_BACK.clear()
    svc.origin.throttle = None
    again = process_download(svc.payload(task_id))

    assert again["success"] is True
    requests = svc.file_requests("/files/handback/a.bin")
    assert [r.get("range") for r in requests] == [None, f"bytes={kept}-"]
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (COMPLETED, 1)


def test_held_lease_makes_a_second_run_step_aside_without_an_attempt(svc: Service) -> None:
    """While another live run holds the task's lease, process_download raises LeaseBusyError (a transient error,
    so RQ retries later) before counting an attempt or fetching anything."""
    url = svc.origin.add_course("busy", {"a.bin": 100})
    task_id = svc.paid_task(url)
    holder = TaskLease(svc.redis, task_id, "download-elsewhere")
    holder.acquire()
    try:
        with pytest.raises(LeaseBusyError):
            process_download(svc.payload(task_id))
        assert svc.redis.get(lease_key(task_id)) == holder.token.encode()
    finally:
        holder.release()
    assert svc.row(task_id).attempts == 0
    assert svc.origin.requests.paths() == []


def test_duplicate_run_steps_aside_while_the_last_attempt_runs(svc: Service) -> None:
    """While the last attempt runs (it holds the lease and has counted attempt MAX_ATTEMPTS), a duplicate run steps
    aside with LeaseBusyError: it neither fails the task nor touches the running attempt's staging folder."""
    url = svc.origin.add_course("last-attempt", {"a.bin": 100})
    task_id = svc.paid_task(url)
    for _ in range(svc.settings.max_attempts):
        svc.store.begin_attempt(task_id, 3)
    part = svc.settings.staging_dir / str(task_id) / PARTS_DIRNAME / "running.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 10)  # the running attempt's bytes so far
    running = TaskLease(svc.redis, task_id, f"download-{task_id}")
    running.acquire()
    try:
        with pytest.raises(LeaseBusyError):
            process_download(svc.payload(task_id))
    finally:
        running.release()
    assert svc.row(task_id).status == PROCESSING
    assert part.read_bytes() == b"x" * 10


def test_run_that_loses_its_lease_stops_and_leaves_the_task_to_the_holder(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another run takes the lease mid-download, this run stops at its next chunk, says leaseLost (no
    hand-back: the holder has the task, and the attempt count with it), and leaves the holder's lease in place."""
    monkeypatch.setattr(download_job, "TaskLease", functools.partial(TaskLease, ttl=1))  # renewed every 1/3 s
    svc.origin.throttle = 2_000_000
    url = svc.origin.add_course("stolen", {"a.bin": 8_000_000})
    task_id = svc.paid_task(url)
    theirs = f"another-host.example|4242|download-{task_id}|feedface"

    def take_the_lease() -> None:
        wait_for(lambda: svc.partial_bytes(task_id) > 0, timeout=30, what="the first bytes in staging")
        svc.redis.set(lease_key(task_id), theirs, px=60_000)

    thief = threading.Thread(target=take_the_lease, daemon=True)
    thief.start()
    result = process_download(svc.payload(task_id))
    thief.join(timeout=5)

    assert result == {"success": False, "taskId": task_id, "leaseLost": True}
    assert svc.row(task_id).attempts == 1
    assert svc.redis.get(lease_key(task_id)) == theirs.encode()
    assert svc.queued() == []


def test_status_change_whose_answer_was_lost_is_still_recognised(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store retried a completion that had in fact been applied (its answer lost), so the retry matched no
    processing row: the run still sees the row carries its own status and finish time and sends download.completed."""
    url = svc.origin.add_course("lost-answer", {"a.bin": 100})
    task_id = svc.paid_task(url)
    store = get_context().store
    real = store.mark_completed

    def applied_then_retried(task: int, output_path: str, total_bytes: int, now: Any, event: str | None) -> bool:
        real(task, output_path, total_bytes, now, event)  # committed; the answer never arrived
        return real(task, output_path, total_bytes, now, event)  # the retry finds the row completed already

    monkeypatch.setattr(store, "mark_completed", applied_then_retried)
    result = process_download(svc.payload(task_id))

    assert result["success"] is True
    run_burst_worker(svc.redis, svc.settings)
    assert outcome_events(svc.receiver) == [(EVENT_COMPLETED, task_id)]


def test_stopping_worker_hands_its_download_back_at_the_front(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """SIGTERM to a real worker mid-download: it exits promptly, its task is queued again ahead of the waiting ones
    with the attempt given back and the bytes kept, and the next worker resumes the file rather than refetching it."""
    svc.origin.throttle = 1_000_000  # bytes/s: the 6 MB file cannot finish before the stop
    url = svc.origin.add_course("stop", {"a.bin": 6_000_000})
    task_id = svc.paid_task(url)
    svc.enqueue(task_id)
    worker = start_worker()
    wait_for(lambda: svc.partial_bytes(task_id) > 0, timeout=30, what=lambda: f"bytes in staging\n{worker.log()}")
    waiting = svc.paid_task(svc.origin.add_course("next", {"b.bin": 10}))
    svc.enqueue(waiting)  # the only worker is busy: this one waits

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=20) == 0, worker.log()  # well before the download could end

    assert svc.queued() == [job_id_for(task_id), job_id_for(waiting)], worker.log()
    assert Job.fetch(job_id_for(task_id), connection=svc.redis).get_status() == JobStatus.QUEUED
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 0), worker.log()
    kept = svc.partial_bytes(task_id)
    assert 0 < kept < 6_000_000

    svc.origin.throttle = None
    run_burst_worker(svc.redis, svc.settings)
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (COMPLETED, 1)
    assert [r.get("range") for r in svc.file_requests("/files/stop/a.bin")] == [None, f"bytes={kept}-"]


# -- a stop never drops a job the worker is being handed -------------------------------------------


def blocked_in_dequeue(svc: Service) -> int:
    """Clients of the test's Redis database blocked in a command (an idle worker in its BLPOP)."""
    db = str(svc.redis.connection_pool.connection_kwargs.get("db", 0))
    clients: list[dict[str, str]] = svc.redis.client_list()  # type: ignore[assignment]
    return len([client for client in clients if "b" in client["flags"] and client["db"] == db])


def freeze_in_dequeue(svc: Service, worker: LoggedProcess) -> None:
    """SIGSTOP *worker* while it is blocked in its dequeue (the state a stop signal can find it in)."""

    def frozen() -> bool:
        os.kill(worker.pid, signal.SIGSTOP)
        if blocked_in_dequeue(svc) == 1:
            return True
        os.kill(worker.pid, signal.SIGCONT)  # not blocked yet (still starting): let it get there
        return False

    wait_for(frozen, timeout=30, interval=0.1, what=lambda: f"the worker blocked in its dequeue\n{worker.log()}")


def test_stopping_idle_worker_leaves_its_blocking_dequeue_at_once(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """SIGTERM to a worker blocked in its dequeue (45 s BLPOP): it stops without waiting for the BLPOP to end,
    deregistered, its wake list gone."""
    worker = start_worker()
    wait_for(lambda: blocked_in_dequeue(svc) == 1, timeout=30, what=lambda: f"the blocked dequeue\n{worker.log()}")

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=15) == 0, worker.log()  # the BLPOP alone would last 45 s

    assert "stopping on request" in worker.log()
    assert Worker.all(connection=svc.redis) == []
    assert svc.redis.exists(WAKE_KEY.format(name=worker.name)) == 0


def test_stopping_idle_worker_puts_a_job_it_was_handed_back_at_the_front(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """The race of a stop against a push, made certain: Redis hands a job to a worker blocked in its dequeue (frozen
    there) just before its stop signal takes effect. The worker puts that same job back at the front of its queue,
    ahead of one enqueued after it, instead of dropping it (which left the task in no list until the reconciler's
    next sweep)."""
    first = svc.paid_task(svc.origin.add_course("handed", {"a.bin": 10}))
    second = svc.paid_task(svc.origin.add_course("after", {"b.bin": 10}))
    worker = start_worker()
    freeze_in_dequeue(svc, worker)
    try:
        svc.enqueue(first)
        assert svc.queued() == [], "Redis handed the job to the frozen worker's BLPOP"
        svc.enqueue(second)
        worker.process.send_signal(signal.SIGTERM)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert worker.process.wait(timeout=15) == 0, worker.log()

    assert svc.queued() == [job_id_for(first), job_id_for(second)], worker.log()
    assert Job.fetch(job_id_for(first), connection=svc.redis).get_status() == JobStatus.QUEUED
    assert f"job {job_id_for(first)} goes back to the front of" in worker.log()
    assert (svc.row(first).status, svc.row(first).attempts) == (PROCESSING, 0)
    assert svc.origin.requests.paths() == [], "the stopping worker ran nothing"


def deliver_stop(worker: Worker) -> None:
    """What the worker's SIGTERM handler runs (the signal itself would land anywhere in this test process)."""
    worker.request_stop(signal.SIGTERM, None)


@pytest.fixture
def in_process_worker(svc: Service) -> Iterator[DownloadWorker]:
    """A registered DownloadWorker driven step by step in this process; its stop handler is called as the signal
    would call it (RQ swaps in its own SIGINT/SIGTERM handlers then: pytest's are put back afterwards)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = DownloadWorker(worker_queues(svc.settings, svc.redis), connection=svc.redis, name="test-inproc-stop")
    registered: Worker = worker
    registered.register_birth()
    try:
        yield worker
    finally:
        registered.register_death()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def dequeue_first_of_two(
    svc: Service, worker: DownloadWorker, first: str, second: str, first_size: int = 10
) -> tuple[int, int, Job, Queue]:
    """Paid tasks for courses *first* (one file of *first_size* bytes) and *second* queued in that order, and the
    first dequeued by *worker*: both task ids, the job in hand and its queue."""
    first_id = svc.paid_task(svc.origin.add_course(first, {"a.bin": first_size}))
    second_id = svc.paid_task(svc.origin.add_course(second, {"b.bin": 10}))
    svc.enqueue(first_id)
    svc.enqueue(second_id)
    dequeued = worker.dequeue_job_and_maintain_ttl(None)
    assert dequeued is not None
    job, queue = dequeued
    return first_id, second_id, job, queue


def test_stop_between_dequeue_and_start_puts_the_job_back(svc: Service, in_process_worker: DownloadWorker) -> None:
    """A stop that arrives after the dequeue returned a job and before the job starts: the handler does not raise
    (RQ's would, dropping the job), and the job goes back, untouched, to the front of its queue."""
    worker = in_process_worker
    first, second, job, queue = dequeue_first_of_two(svc, worker, "popped", "waiting")
    assert (job.id, svc.queued()) == (job_id_for(first), [job_id_for(second)])

    deliver_stop(worker)  # must not raise here: the job is in hand

    with pytest.raises(StopRequested):
        worker.execute_job(job, queue)
    assert svc.queued() == [job_id_for(first), job_id_for(second)]
    assert Job.fetch(job.id, connection=svc.redis).get_status() == JobStatus.QUEUED
    assert StartedJobRegistry(queue.name, connection=svc.redis).get_job_ids() == []
    assert svc.origin.requests.paths() == []


def test_stop_before_the_horse_exists_hands_the_task_back(
    svc: Service, in_process_worker: DownloadWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that lands after the job's execution is prepared, before its horse is forked: the new horse is asked
    to hand the task back as soon as it exists (the request waits for its handler rather than killing it), and the
    task is queued again at the front, its attempt given back, instead of running to its end."""
    worker = in_process_worker
    svc.origin.throttle = 1_000_000  # bytes/s: the 6 MB file cannot finish before the hand-back
    task_id, waiting, job, queue = dequeue_first_of_two(svc, worker, "early-stop", "behind", first_size=6_000_000)
    prepare = worker.prepare_execution

    def prepared_then_stopped(job: Job) -> Any:
        execution = prepare(job)
        deliver_stop(worker)  # the signal, between the preparation and the fork
        return execution

    monkeypatch.setattr(worker, "prepare_execution", prepared_then_stopped)
    worker.execute_job(job, queue)

    assert svc.queued() == [job_id_for(task_id), job_id_for(waiting)]
    assert Job.fetch(job_id_for(task_id), connection=svc.redis).get_status() == JobStatus.QUEUED
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 0)
    assert svc.partial_bytes(task_id) < 6_000_000


# -- workers and schedulers after a crash or a Redis restart --------------------------------------

# A scheduler that takes its queue's lock and registers, then vanishes without releasing anything (kill -9).
VANISHING_SCHEDULER = """
import sys
from redis import Redis
from rq.scheduler import RQScheduler

url, queue_name, name, hostname = sys.argv[1:5]
scheduler = RQScheduler([queue_name], connection=Redis.from_url(url), name=name)
if hostname:
    scheduler.hostname = hostname
assert scheduler.acquire_locks() == {queue_name}
scheduler.register_birth()
"""


def vanished_scheduler(redis_url: str, queue_name: str, hostname: str = "") -> str:
    name = f"sched-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [sys.executable, "-c", VANISHING_SCHEDULER, redis_url, queue_name, name, hostname], check=True, timeout=60
    )
    return name


def lock_owner(connection: Redis, queue_name: str) -> str | None:
    owner = connection.get(RQScheduler.get_locking_key(queue_name))
    return owner.decode() if isinstance(owner, bytes) else None


def test_release_dead_scheduler_locks_frees_only_a_dead_local_schedulers_lock(
    redis_conn: Redis, redis_url: str
) -> None:
    """The lock of a scheduler whose process died on this host is freed (a new scheduler can take it at once); a
    live scheduler's lock and one held from another host are kept."""
    dead = vanished_scheduler(redis_url, "q-dead")
    elsewhere = vanished_scheduler(redis_url, "q-elsewhere", hostname="another-host.example")
    live = RQScheduler(["q-live"], connection=redis_conn, name=f"sched-{uuid.uuid4().hex[:8]}")
    assert live.acquire_locks() == {"q-live"}
    live.register_birth()
    try:
        assert lock_owner(redis_conn, "q-dead") == dead

        assert release_dead_scheduler_locks(redis_conn, ["q-live", "q-dead", "q-elsewhere", "q-unlocked"]) == ["q-dead"]

        assert lock_owner(redis_conn, "q-dead") is None
        assert (lock_owner(redis_conn, "q-live"), lock_owner(redis_conn, "q-elsewhere")) == (live.name, elsewhere)
        successor = RQScheduler(["q-dead"], connection=redis_conn)
        assert successor.acquire_locks() == {"q-dead"}
    finally:
        live.release_locks()


def test_worker_registers_again_after_redis_lost_its_registration(svc: Service) -> None:
    """A DownloadWorker whose registration vanished (Redis restarted without data) registers again at its next
    heartbeat, so rq info lists it; a heartbeat with the registration in place changes nothing."""
    worker: Worker = DownloadWorker(worker_queues(svc.settings, svc.redis), connection=svc.redis, name="test-rereg")
    worker.register_birth()
    try:
        birth = svc.redis.hget(worker.key, "birth")
        worker.heartbeat()
        assert svc.redis.hget(worker.key, "birth") == birth

        svc.redis.flushdb()
        assert Worker.all(connection=svc.redis) == []
        worker.heartbeat()

        assert [w.name for w in Worker.all(connection=svc.redis)] == [worker.name]
        assert svc.redis.hexists(worker.key, "birth")
    finally:
        worker.register_death()
