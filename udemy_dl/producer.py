"""The producer side: confirm payment, enqueue one deduplicated job per task (see queues.py),
requeue failed tasks, queue statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq import Worker
from rq.job import Job
from rq.registry import (
    BaseRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from . import status_stream
from .connection import redis_connection
from .errors import InvalidTaskError
from .outcome import fail_row
from .payload import TaskPayload, parse_task_id
from .queues import DownloadQueues, EnqueueResult, download_queue, download_queues, parse_priority, webhook_queue
from .settings import Settings, get_settings
from .store import FAILED, PROCESSING, TaskRow, TaskStore, open_store

log = logging.getLogger(__name__)


@dataclass
class ConfirmResult:
    """What confirm_payment did, task by task (the intake answers with this)."""

    enqueued: list[int] = field(default_factory=list)
    already_queued: list[int] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"enqueued": self.enqueued, "alreadyQueued": self.already_queued, "refused": self.refused}


class Producer:
    """Enqueues download jobs and reads queue statistics; one per process is enough."""

    def __init__(self, settings: Settings, connection: Redis | None = None, store: TaskStore | None = None) -> None:
        self.settings = settings
        self.connection = connection or redis_connection(settings)
        self._store = store
        self.queue = download_queue(settings, self.connection)
        self.queues = DownloadQueues(settings, self.connection)

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = open_store(self.settings.require_database())
        return self._store

    def add_download_job(
        self, task_data: Mapping[str, Any] | TaskPayload, priority: str = "normal", at_front: bool = False
    ) -> EnqueueResult:
        """Enqueue *task_data* once: an existing live job for the same taskId is returned instead.

        *priority* `high` puts it on the VIP queue, served before the normal one.
        """
        return self.queues.enqueue(task_data, priority, at_front)

    def confirm_payment(self, task_ids: Iterable[object], priority: str = "normal") -> ConfirmResult:
        """Paid: move the rows to `processing`, then enqueue each. Calling it twice changes nothing.

        A bad *priority* raises InvalidTaskError before anything changes.
        """
        priority = parse_priority(priority)
        result = ConfirmResult()
        ids: list[int] = []
        for raw in task_ids:
            try:
                task_id = parse_task_id(raw)
            except InvalidTaskError as exc:
                result.refused.append({"taskId": raw, "reason": str(exc)})
                continue
            if task_id not in ids:
                ids.append(task_id)
        if not ids:
            return result
        self.store.mark_processing(ids, priority)
        rows = {row.id: row for row in self.store.get_many(ids)}
        for task_id in ids:
            row = rows.get(task_id)
            if row is None:
                result.refused.append({"taskId": task_id, "reason": "no such task"})
            elif row.status != PROCESSING:
                result.refused.append({"taskId": task_id, "reason": f"task is {row.status}"})
            else:
                try:
                    outcome = self.add_download_job(
                        {"taskId": row.id, "email": row.email, "courseUrl": row.course_url}, priority=row.priority
                    )
                except InvalidTaskError as exc:
                    # A job would fail the same way: record the failure now and tell the payment service.
                    self._fail_unrunnable(row, f"bad task data: {exc}")
                    result.refused.append({"taskId": task_id, "reason": str(exc)})
                    continue
                if outcome.created:
                    result.enqueued.append(task_id)
                    status_stream.publish_processing(self.connection, task_id)  # paid and queued: the browser sees it
                else:
                    result.already_queued.append(task_id)
        return result

    def _fail_unrunnable(self, row: TaskRow, reason: str) -> None:
        fail_row(self.settings, self.store, self.connection, row, reason)

    def requeue_failed(self, task_ids: Iterable[int] | None = None) -> ConfirmResult:
        """Operator's retry: `failed` rows (all, or those named) go back to `processing` and are enqueued."""
        ids = list(task_ids) if task_ids is not None else self.store.ids_with_status(FAILED)
        self.store.reopen_failed(ids)
        result = ConfirmResult()
        for row in self.store.get_many(ids):
            if row.status != PROCESSING:
                result.refused.append({"taskId": row.id, "reason": f"task is {row.status}"})
                continue
            outcome = self.add_download_job(
                {"taskId": row.id, "email": row.email, "courseUrl": row.course_url}, priority=row.priority
            )
            (result.enqueued if outcome.created else result.already_queued).append(row.id)
        known = {row.id for row in self.store.get_many(ids)}
        result.refused += [{"taskId": task_id, "reason": "no such task"} for task_id in ids if task_id not in known]
        return result

    def get_queue_stats(self) -> dict[str, int]:
        """Counts the old producer reported: waiting, active, scheduled, completed, failed, workers
        (download queues: VIP and normal together, with the VIP share of waiting shown apart)."""
        conn = self.connection
        queues = download_queues(self.settings, conn)

        def total(registry: type[BaseRegistry]) -> int:
            # No cleanup: RQ's would judge "abandoned" by this host's clock; stats change nothing.
            return sum(registry(queue=queue).get_job_count(cleanup=False) for queue in queues)

        return {
            "waiting": sum(queue.count for queue in queues),
            "waiting_high": queues[0].count,
            "active": total(StartedJobRegistry),
            "scheduled": total(ScheduledJobRegistry),
            "deferred": total(DeferredJobRegistry),
            "completed": total(FinishedJobRegistry),
            "failed": total(FailedJobRegistry),
            "workers": Worker.count(connection=conn, queue=self.queue),
            "webhooks_waiting": webhook_queue(self.settings, conn).count,
            "webhooks_failed": FailedJobRegistry(queue=webhook_queue(self.settings, conn)).get_job_count(cleanup=False),
        }

    def close(self) -> None:
        self.connection.close()
        if self._store is not None:
            self._store.close()


_default: Producer | None = None


def _producer() -> Producer:
    global _default
    if _default is None:
        _default = Producer(get_settings())
    return _default


def add_download_job(task_data: Mapping[str, Any], priority: str = "normal") -> Job:
    """Enqueue one download (idempotent per taskId); returns the task's job. `priority="high"`: VIP."""
    return _producer().add_download_job(task_data, priority=priority).job


def confirm_payment(task_ids: Iterable[object], priority: str = "normal") -> ConfirmResult:
    """Mark the paid tasks `processing` and enqueue them (idempotent)."""
    return _producer().confirm_payment(task_ids, priority=priority)


def get_queue_stats() -> dict[str, int]:
    return _producer().get_queue_stats()


def close() -> None:
    global _default
    if _default is not None:
        _default.close()
        _default = None
