"""VIP orders: a high-priority task starts before waiting normal ones, and normal ones never starve."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable

import pytest
from redis import Redis
from rq.job import Job

from dev.devservers import ContentOrigin
from udemy_dl.download_worker import DownloadWorker
from udemy_dl.errors import InvalidTaskError
from udemy_dl.producer import Producer
from udemy_dl.queues import job_id_for, worker_queues
from udemy_dl.settings import Settings
from udemy_dl.store import PENDING, PROCESSING, SQLiteStore

EMAIL = "vip@shop.example"


def run_download_worker(connection: Redis, settings: Settings) -> None:
    """Our own DownloadWorker (with its VIP ordering), forking, in burst mode, in this process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = DownloadWorker(
            worker_queues(settings, connection), connection=connection, name=f"test-vip-{uuid.uuid4().hex[:8]}"
        )
        worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def pickup_order(connection: Redis, task_ids: list[int]) -> list[int]:
    """Task ids in the order their jobs started, from RQ's own started_at timestamps."""
    jobs = {task_id: Job.fetch(job_id_for(task_id), connection=connection) for task_id in task_ids}
    assert all(job.started_at is not None for job in jobs.values())
    return sorted(task_ids, key=lambda task_id: jobs[task_id].started_at)  # type: ignore[arg-type,return-value]


@pytest.fixture
def vip_setup(
    configure: Callable[..., Settings], redis_conn: Redis, sqlite_store: SQLiteStore, origin: ContentOrigin
) -> tuple[Settings, Producer, str]:
    settings = configure(DATABASE_URL=f"sqlite:///{sqlite_store.path}", ALLOWED_HOSTS=origin.host_port)
    url = origin.add_course("tiny", {"a.txt": 10})
    return settings, Producer(settings, connection=redis_conn, store=sqlite_store), url


def test_vip_task_confirmed_after_fifty_normal_ones_starts_next(
    vip_setup: tuple[Settings, Producer, str], redis_conn: Redis, sqlite_store: SQLiteStore
) -> None:
    """With 50 normal tasks waiting, a VIP task confirmed afterwards is the next one a worker picks up."""
    settings, producer, url = vip_setup
    normal = [sqlite_store.insert_task(EMAIL, url, PENDING) for _ in range(50)]
    assert producer.confirm_payment(normal).enqueued == normal
    vip = sqlite_store.insert_task(EMAIL, url, PENDING)
    assert producer.confirm_payment([vip], priority="high").enqueued == [vip]
    assert Job.fetch(job_id_for(vip), connection=redis_conn).origin == settings.high_queue_name

    run_download_worker(redis_conn, settings)
    order = pickup_order(redis_conn, [*normal, vip])
    assert order[0] == vip, order[:5]
    assert all(row.status == "completed" for row in sqlite_store.get_many([*normal, vip]))


def test_steady_vip_flow_leaves_normal_tasks_one_pickup_in_five(
    vip_setup: tuple[Settings, Producer, str], redis_conn: Redis, sqlite_store: SQLiteStore
) -> None:
    """20 VIP and 5 normal tasks waiting: never more than 4 VIP pickups in a row while normal ones wait."""
    settings, producer, url = vip_setup
    normal = [sqlite_store.insert_task(EMAIL, url, PENDING) for _ in range(5)]
    vip = [sqlite_store.insert_task(EMAIL, url, PENDING) for _ in range(20)]
    producer.confirm_payment(normal)
    producer.confirm_payment(vip, priority="high")

    run_download_worker(redis_conn, settings)
    order = pickup_order(redis_conn, [*normal, *vip])
    run = longest = 0
    normal_left = set(normal)
    for task_id in order:
        if task_id in normal_left:
            normal_left.discard(task_id)
            run = 0
        elif normal_left:
            run += 1
            longest = max(longest, run)
    assert longest <= 4, order
    # And VIP still goes first: the first four pickups are VIP.
    assert set(order[:4]) <= set(vip), order


def test_priority_is_recorded_and_kept_when_the_task_is_enqueued_again(
    vip_setup: tuple[Settings, Producer, str], redis_conn: Redis, sqlite_store: SQLiteStore
) -> None:
    """The row remembers the priority, so a re-enqueue from the database (reconciler) stays VIP."""
    settings, producer, url = vip_setup
    task_id = sqlite_store.insert_task(EMAIL, url, PENDING)
    producer.confirm_payment([task_id], priority="high")
    row = sqlite_store.get(task_id)
    assert row is not None and (row.status, row.priority) == (PROCESSING, "high")
    Job.fetch(job_id_for(task_id), connection=redis_conn).delete()  # Redis forgot it

    from udemy_dl.reconciler import Reconciler

    assert Reconciler(settings, producer).sweep().requeued == [task_id]
    assert Job.fetch(job_id_for(task_id), connection=redis_conn).origin == settings.high_queue_name


def test_unknown_priority_is_refused_and_changes_nothing(
    vip_setup: tuple[Settings, Producer, str], redis_conn: Redis, sqlite_store: SQLiteStore
) -> None:
    """priority="urgent" is bad input named in the error; the row stays unpaid, nothing is queued."""
    _, producer, url = vip_setup
    task_id = sqlite_store.insert_task(EMAIL, url, PENDING)
    with pytest.raises(InvalidTaskError, match="urgent"):
        producer.confirm_payment([task_id], priority="urgent")
    row = sqlite_store.get(task_id)
    assert row is not None and row.status == PENDING
    assert producer.get_queue_stats()["waiting"] == 0


def test_webhook_pickup_between_does_not_cancel_the_normal_turn(
    vip_setup: tuple[Settings, Producer, str], redis_conn: Redis
) -> None:
    """After 4 VIP pickups the normal queue is asked first; a webhook delivery picked up in between
    (they follow every completion) leaves that turn in place."""
    settings, _, _ = vip_setup
    worker = DownloadWorker(worker_queues(settings, redis_conn), connection=redis_conn, name="test-order")
    webhooks, high, normal = worker_queues(settings, redis_conn)
    for _ in range(4):
        worker.reorder_queues(high)
    worker.reorder_queues(webhooks)
    assert [q.name for q in worker._ordered_queues] == [webhooks.name, normal.name, high.name]
    worker.reorder_queues(normal)
    assert [q.name for q in worker._ordered_queues] == [webhooks.name, high.name, normal.name]
