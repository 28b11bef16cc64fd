"""The producer side: confirm payment, enqueue one deduplicated job per task (see queues.py),
cancel a task, requeue failed tasks, queue statistics."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.registry import (
    BaseRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from . import status_stream
from .cancellation import cancel_text, clear_cancel, request_cancel
from .connection import redis_connection
from .errors import InvalidTaskError, LeaseBusyError
from .folders import staging_lock
from .lease import TaskLease
from .outcome import fail_row, record_cancelled
from .payload import TaskPayload, parse_task, parse_task_id
from .queues import (
    WAITING_STATUSES,
    DownloadQueues,
    EnqueueResult,
    download_queue,
    download_queues,
    job_id_for,
    live_workers,
    parse_priority,
    webhook_queue,
)
from .settings import Settings, get_settings
from .store import COMPLETED, FAILED, PROCESSING, UNPAID, TaskRow, TaskStore, open_store

log = logging.getLogger(__name__)


@dataclass
class ConfirmResult:
    """What confirm_payment did, task by task (the intake answers with this)."""

    enqueued: list[int] = field(default_factory=list)
    already_queued: list[int] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"enqueued": self.enqueued, "alreadyQueued": self.already_queued, "refused": self.refused}


CANCEL_WAIT = 15.0
"""Seconds a cancel waits for a running download to stop and settle the task (it looks for the
request every second, wherever it runs), before it answers that the cancel is under way."""

CANCEL_POLL = 0.1
"""Seconds between two looks at the task while a cancel waits for its run to stop."""

CANCELLED = "cancelled"
ALREADY_CANCELLED = "already_cancelled"
CANCEL_REQUESTED = "requested"
REFUSED = "refused"
NOT_FOUND = "not_found"


@dataclass
class CancelResult:
    """What a cancel did: `cancelled` (now), `already_cancelled`, `requested` (a run is still
    stopping; it settles the task), `refused` (completed, or failed before) or `not_found`."""

    task_id: int
    outcome: str
    message: str
    row: TaskRow | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (CANCELLED, ALREADY_CANCELLED, CANCEL_REQUESTED)

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"taskId": self.task_id, "result": self.outcome, "message": self.message}
        if self.row is not None:
            answer.update(status=self.row.status, error=self.row.error_message)
        return answer


def _already_final(row: TaskRow) -> CancelResult | None:
    """The answer for a task settled before the cancel: completed is refused, cancelled stays."""
    if row.status == COMPLETED:
        return CancelResult(row.id, REFUSED, f"task {row.id} is already completed; it cannot be cancelled", row)
    if row.cancelled:
        return CancelResult(row.id, ALREADY_CANCELLED, f"task {row.id} is already cancelled ({row.error_message})", row)
    if row.status == FAILED:
        return CancelResult(row.id, REFUSED, f"task {row.id} has already failed ({row.error_message})", row)
    return None


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
                    outcome = self.enqueue_row(row)
                except InvalidTaskError as exc:
                    result.refused.append({"taskId": task_id, "reason": str(exc)})
                    continue
                if outcome.created:
                    result.enqueued.append(task_id)
                    status_stream.publish_processing(self.connection, task_id)  # paid and queued: the browser sees it
                else:
                    result.already_queued.append(task_id)
        return result

    def enqueue_row(self, row: TaskRow) -> EnqueueResult:
        """Enqueue the download of a `processing` row (once). Data a job could not run (a control character in
        the email, a URL no longer allowed: the row was edited after it was confirmed, or the allow-list
        changed) settles the row `failed` at once, with its event, and raises InvalidTaskError: a job would fail
        the same way, and the caller goes on with its other rows."""
        try:
            return self.add_download_job(
                {"taskId": row.id, "email": row.email, "courseUrl": row.course_url}, priority=row.priority
            )
        except InvalidTaskError as exc:
            fail_row(self.settings, self.store, self.connection, row, f"bad task data: {exc}")
            raise

    def cancel(self, task_id: int, reason: str | None = None, wait: float = CANCEL_WAIT) -> CancelResult:
        """Cancel a task that has not completed: it never starts, or its run stops (on any host),
        its partial files go, and it becomes `failed` with `cancelled…` and a download.cancelled
        event. Settling happens under the task's lease, so it never races a run that completes:
        a task completed first stays completed and the cancel is refused. Cancelling twice
        changes nothing. *reason* is checked by cancellation.parse_reason beforehand."""
        row = self.store.get(task_id)
        if row is None:
            return CancelResult(task_id, NOT_FOUND, f"task {task_id}: no such task")
        final = _already_final(row)
        if final is not None:
            if final.outcome == REFUSED:
                clear_cancel(self.connection, task_id)  # an earlier request that came too late
            return final
        # The request first: a run starting or running anywhere sees it from now on.
        text = cancel_text(reason)
        request_cancel(self.connection, task_id, text)
        self._cancel_waiting_job(task_id)
        deadline = time.monotonic() + wait
        while True:
            settled = self.settle_cancel_unheld(row, text)
            current = self.store.get(task_id) or row
            if settled or current.status not in (PROCESSING, *UNPAID):
                break
            if time.monotonic() >= deadline:
                log.warning("task %s: cancel requested; its run has not stopped yet", task_id)
                return CancelResult(
                    task_id, CANCEL_REQUESTED, f"task {task_id}: cancel requested; its download is stopping", current
                )
            time.sleep(CANCEL_POLL)  # polling the run (on any host), which settles the task itself
        if current.cancelled:
            log.info("task %s: %s", task_id, current.error_message)
            return CancelResult(task_id, CANCELLED, f"task {task_id} cancelled ({current.error_message})", current)
        clear_cancel(self.connection, task_id)  # settled otherwise first: the request has no more to do
        final = _already_final(current)
        assert final is not None
        return final

    def _cancel_waiting_job(self, task_id: int) -> None:
        """Take the task's job off its queue or schedule, with RQ's own cancel (it goes to the
        CanceledJobRegistry). A job a worker has in hand is left to the cancel request."""
        job = self.queues.fetch_job(job_id_for(task_id))
        if job is None:
            return
        status = job.get_status(refresh=False)
        if status != JobStatus.QUEUED and status not in WAITING_STATUSES:
            return
        try:
            job.cancel()
        except InvalidJobOperation:  # cancelled meanwhile
            return
        log.info("task %s: job %s (%s) cancelled", task_id, job.id, status)

    def settle_cancel_unheld(self, row: TaskRow, text: str) -> bool:
        """Settle the cancel if no run holds the task's lease (none started, or it stopped).
        False while a run holds it (that run settles it) or when the task was settled first."""
        lease = TaskLease(self.connection, row.id, "cancel")
        try:
            lease.acquire()
        except LeaseBusyError:
            return False
        try:
            # The staging lock too: a run on this host that still writes the folder (its lease lost in a
            # Redis outage) keeps it, and settles the cancel itself when it stops.
            with staging_lock(self.settings, row.id):
                current = self.store.get(row.id)
                if current is None or current.status not in (PROCESSING, *UNPAID):
                    return False  # settled before the lease was ours: its run saw the cancel, or completed first
                task = TaskPayload(task_id=row.id, email=row.email, course_url=row.course_url)
                return record_cancelled(self.settings, self.store, self.connection, task, text)
        except LeaseBusyError:
            return False
        finally:
            lease.release()

    def requeue_failed(self, task_ids: Iterable[int] | None = None) -> ConfirmResult:
        """Operator's retry: `failed` rows (all, or those named) go back to `processing` and are enqueued."""
        if task_ids is None:  # every failed task, but a cancelled one only when named
            ids = [row.id for row in self.store.rows_with_status(FAILED) if not row.cancelled]
        else:
            ids = list(task_ids)
            for row in self.store.get_many(ids):
                if row.cancelled:
                    clear_cancel(self.connection, row.id)  # reopened by name: the cancel is withdrawn
        result = ConfirmResult()
        runnable = []
        for row in self.store.get_many(ids):
            try:
                if row.status == FAILED:
                    parse_task({"taskId": row.id, "email": row.email, "courseUrl": row.course_url})
            except InvalidTaskError as exc:  # it stays failed: a run would fail the same way
                result.refused.append({"taskId": row.id, "reason": f"bad task data: {exc}"})
                continue
            runnable.append(row.id)
        self.store.reopen_failed(runnable)
        for row in self.store.get_many(runnable):
            if row.status != PROCESSING:
                result.refused.append({"taskId": row.id, "reason": f"task is {row.status}"})
                continue
            try:
                outcome = self.enqueue_row(row)
            except InvalidTaskError as exc:
                result.refused.append({"taskId": row.id, "reason": str(exc)})
                continue
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
            "workers": len(live_workers(conn, [self.queue])),
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
