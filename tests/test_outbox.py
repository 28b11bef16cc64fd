"""The outbox: a settled task's final event stays recorded in its row until the payment service
has acknowledged it, so an event that Redis loses is sent again, under the same webhook-id.

Real Redis, MariaDB and SQLite, a real forking worker and a receiver that verifies signatures.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from rq import Worker
from rq.job import Job

from tests.support.rq_state import ends_while_the_reconciler_looks
from tests.support.service import Service
from udemy_dl.errors import StoreError
from udemy_dl.queues import webhook_queue
from udemy_dl.reconciler import Reconciler
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, FAILED, TaskStore
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.worker_rq import process_download

EMAIL = "buyer@shop.example"


class World(Service):
    """The service on each store back end, with the outbox's moves: a paid task, its run, the sweep."""

    def paid(self, files: dict[str, int] | None = None, missing: bool = False) -> int:
        url = (
            f"{self.origin.base_url}/courses/missing"
            if missing
            else self.origin.add_course(f"c-{uuid.uuid4().hex[:8]}", files or {"a.bin": 64})
        )
        return self.paid_task(url)

    def run(self, task_id: int) -> dict[str, Any]:
        return process_download(self.payload(task_id))

    def sweep(self) -> list[int]:
        return Reconciler(self.settings).sweep().events_resent

    def final_ids(self, event_type: str = EVENT_COMPLETED) -> list[str]:
        return [hook.webhook_id for hook in self.receiver.accepted() if hook.event_type == event_type]


@pytest.fixture
def world(any_svc: Service) -> World:
    return World(**vars(any_svc))


def test_the_event_stays_pending_until_the_payment_service_takes_it(world: World) -> None:
    """Completed: the row holds the event's webhook-id; a refused delivery leaves it; an accepted one clears it."""
    task_id = world.paid()
    world.receiver.status_for = lambda attempt: 503
    assert world.run(task_id)["success"] is True
    pending = world.row(task_id).pending_event
    assert pending is not None and pending.startswith(f"msg_{task_id}_completed_")

    world.run_jobs()  # refused: scheduled for a retry
    assert world.row(task_id).pending_event == pending
    assert world.final_ids() == []

    world.receiver.status_for = lambda attempt: 204
    world.redis.flushdb()  # the scheduled retry is gone with Redis's data
    assert world.sweep() == [task_id]
    world.run_jobs()
    assert world.final_ids() == [pending]  # the same webhook-id as the refused attempt
    assert (world.row(task_id).status, world.row(task_id).pending_event) == (COMPLETED, None)
    assert world.sweep() == []


def test_a_failed_task_s_event_is_sent_again_after_redis_lost_it(world: World) -> None:
    """download.failed goes through the same outbox."""
    task_id = world.paid(missing=True)  # the origin answers 404: a permanent error
    assert world.run(task_id)["success"] is False
    pending = world.row(task_id).pending_event
    assert world.row(task_id).status == FAILED
    assert pending is not None and pending.startswith(f"msg_{task_id}_failed_")

    world.redis.flushdb()
    assert world.sweep() == [task_id]
    world.run_jobs()
    assert world.final_ids(EVENT_FAILED) == [pending]
    assert world.row(task_id).pending_event is None


def test_the_sweep_leaves_an_event_whose_delivery_redis_still_holds(world: World) -> None:
    """A delivery still queued (or scheduled, or running) is not queued a second time."""
    task_id = world.paid()
    world.run(task_id)

    assert world.sweep() == []
    world.run_jobs()
    assert len(world.final_ids()) == 1
    assert world.row(task_id).pending_event is None


def test_the_sweep_leaves_a_delivery_that_ends_while_it_looks(
    world: World, workers_here: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep reads a pending event's delivery (running on a live worker), then asks whether a live
    worker has it. A delivery its worker ends in between is in no one's hands by then: it must not be
    queued again (a second POST of the event). The next sweep sees it delivered and empties the outbox."""
    task_id = world.paid()
    world.run(task_id)
    pending = world.row(task_id).pending_event
    queue = webhook_queue(world.settings, world.redis)
    delivery = Job.fetch(f"webhook-{pending}", connection=world.redis)
    finished = ends_while_the_reconciler_looks(monkeypatch, queue, workers_here, delivery, after="fetch")

    assert world.sweep() == []
    assert finished == [delivery.id], "the delivery did not end in the window"
    assert delivery.id not in queue.job_ids
    assert world.sweep() == []
    assert world.row(task_id).pending_event is None


def test_a_delivery_whose_acknowledgement_was_lost_is_not_sent_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver took the event but the database was away when the delivery tried to record that:
    the sweep sees RQ's finished delivery and empties the outbox instead of sending again."""
    task_id = world.paid()
    world.run(task_id)
    real = TaskStore.event_delivered

    def unreachable(self: TaskStore, task: int, event: str) -> bool:
        raise StoreError("status store: the database is away")

    monkeypatch.setattr(TaskStore, "event_delivered", unreachable)
    world.run_jobs()  # delivered; the acknowledgement fails and is only logged
    assert len(world.final_ids()) == 1
    assert world.row(task_id).pending_event is not None

    monkeypatch.setattr(TaskStore, "event_delivered", real)
    assert world.sweep() == []
    assert world.row(task_id).pending_event is None
    world.run_jobs()
    assert len(world.final_ids()) == 1


def test_without_a_webhook_url_nothing_waits_in_the_outbox(
    world: World, configure: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No receiver configured: no event is recorded as pending, so the sweep has nothing to chase."""
    monkeypatch.delenv("WEBHOOK_URL")
    world.settings = configure()
    assert world.settings.webhook_url is None
    task_id = world.paid()
    assert world.run(task_id)["success"] is True
    assert (world.row(task_id).status, world.row(task_id).pending_event) == (COMPLETED, None)
    assert world.store.rows_to_reconcile() == []
