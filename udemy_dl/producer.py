"""The producer side: confirm payment, enqueue one deduplicated job per task, queue statistics.

A download job's id is `download-<taskId>`. While that job is queued, scheduled, started or
deferred, asking again returns it; once it has finished or failed, asking again enqueues anew.
The check and the enqueue happen under a short per-task Redis lock, so twenty concurrent
confirmations of one task make exactly one job.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import LockError
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (
    BaseRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from . import defaults
from .connection import download_queue, download_queues, redis_connection, webhook_queue
from .errors import InvalidTaskError, TransientError
from .outcome import fail_row
from .settings import Settings, get_settings
from .store import FAILED, PROCESSING, TaskRow, TaskStore, open_store
from .task import TaskData, parse_task, parse_task_id
from .worker import job_is_running

log = logging.getLogger(__name__)

JOB_FUNCTION = defaults.DOWNLOAD_JOB_FUNCTION
WAITING_STATUSES = frozenset({JobStatus.SCHEDULED, JobStatus.DEFERRED})


def parse_priority(value: object) -> str:
    """`normal` or `high`; anything else is bad input named in the error."""
    if value is None:
        return "normal"
    if value not in defaults.PRIORITIES:
        raise InvalidTaskError(f"priority must be one of {', '.join(defaults.PRIORITIES)}, got {value!r}")
    return str(value)


def priority_of(job: Job) -> str:
    """The priority a job was enqueued with, read from the queue it came from."""
    return "high" if job.origin.endswith(defaults.HIGH_QUEUE_SUFFIX) else "normal"


def job_id_for(task_id: int) -> str:
    return f"download-{task_id}"


def retry_intervals(settings: Settings, rng: random.Random | None = None) -> list[int]:
    """Exponential backoff from RETRY_DELAY, doubling, each stretched by random jitter."""
    rng = rng or random.Random()
    return [
        round(settings.retry_delay * 2**n * (1 + rng.uniform(0, defaults.RETRY_JITTER)))
        for n in range(settings.max_attempts - 1)
    ]


@dataclass
class EnqueueResult:
    job: Job
    created: bool


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

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = open_store(self.settings.require_database())
        return self._store

    def job_is_live(self, job: Job) -> bool:
        """Waiting where a worker will find it (queued in its queue, scheduled, deferred), or in
        the hands of a live worker (see worker.job_is_running).

        A job whose status says queued but which sits in no queue list and no live worker's hands
        was popped by a worker that died at once (RQ's multi-queue dequeue keeps no safety copy).
        """
        status = job.get_status(refresh=False)
        if status == JobStatus.QUEUED:
            queue = Queue(job.origin, connection=self.connection)
            if any(self.connection.lpos(key, job.id) is not None for key in (queue.key, queue.intermediate_queue_key)):
                return True
            return job_is_running(self.connection, job)
        if status in WAITING_STATUSES:
            return True
        return status == JobStatus.STARTED and job_is_running(self.connection, job)

    def fetch_job(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def live_job(self, task_id: int) -> Job | None:
        """The task's job if it is live (see job_is_live); else None."""
        job = self.fetch_job(job_id_for(task_id))
        return job if job is not None and self.job_is_live(job) else None

    def add_download_job(
        self, task_data: Mapping[str, Any] | TaskData, priority: str = "normal", at_front: bool = False
    ) -> EnqueueResult:
        """Enqueue *task_data* once: an existing live job for the same taskId is returned instead.

        *priority* `high` puts it on the VIP queue, served before the normal one.
        """
        task = task_data if isinstance(task_data, TaskData) else parse_task(task_data)
        queue = download_queue(self.settings, self.connection, parse_priority(priority))
        job_id = job_id_for(task.task_id)
        lock = self.connection.lock(
            f"udemy_dl:lock:enqueue:{task.task_id}",
            timeout=defaults.ENQUEUE_LOCK_TIMEOUT,
            blocking_timeout=defaults.ENQUEUE_LOCK_TIMEOUT,
        )
        try:
            with lock:
                try:
                    existing: Job | None = Job.fetch(job_id, connection=self.connection)
                except NoSuchJobError:
                    existing = None
                if existing is not None:
                    status = existing.get_status(refresh=False)
                    if self.job_is_live(existing):
                        log.info("task %s: job %s already %s", task.task_id, job_id, status)
                        return EnqueueResult(existing, created=False)
                    # Finished, failed, or started by a dead worker: its record makes way for the new run.
                    log.info("task %s: job %s was %s, enqueuing anew", task.task_id, job_id, status)
                    existing.delete(remove_from_queue=True)
                retries = retry_intervals(self.settings)
                job = queue.enqueue(
                    JOB_FUNCTION,
                    task.to_payload(),
                    job_id=job_id,
                    retry=Retry(max=len(retries), interval=retries) if retries else None,
                    job_timeout=self.settings.job_timeout,
                    result_ttl=self.settings.result_ttl,
                    failure_ttl=self.settings.failure_ttl,
                    description=f"download task {task.task_id}",
                    at_front=at_front,
                )
        except LockError as exc:
            raise TransientError(f"task {task.task_id}: enqueue lock busy: {exc}") from exc
        log.info("task %s: enqueued job %s on %s", task.task_id, job_id, queue.name)
        return EnqueueResult(job, created=True)

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
                (result.enqueued if outcome.created else result.already_queued).append(task_id)
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
