"""A task's last word: record it `completed` or `failed` in MySQL with its final event in the row's
outbox, then queue that event's delivery.

One module for the job, the producer and the reconciler alike; it takes settings, store and
Redis as arguments and reaches for no per-process context. The caller must hold the task's
lease (or know that no run can hold it), because failing a task moves its staging folder aside.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from redis import Redis

from . import crashpoints, defaults, status_stream
from .folders import final_path, finished_staging, keep_failed, promote, read_record, remove_folder, staging_path
from .payload import TaskPayload
from .settings import Settings
from .store import COMPLETED, FAILED, TaskRow, TaskStore, utcnow
from .webhooks import enqueue_webhook, final_event

log = logging.getLogger(__name__)


def files_in_place(settings: Settings, task: TaskPayload) -> tuple[Path, dict[str, Any]] | None:
    """The task's finished folder and its record, when a run got that far: the verified course is
    in place, or it is complete in staging (its run wrote the record and stopped before the rename),
    and is moved into place now. None when neither holds. Whatever the attempt count says, such
    files are the task's result. The caller holds the task's lease."""
    final = final_path(settings, task.task_id)
    record = read_record(final) if final.is_dir() else None
    if record is not None:
        return final, record
    staging = staging_path(settings, task.task_id)
    record = finished_staging(staging, task.course_url)
    if record is None:
        return None
    log.info("task %s: staging holds the verified course; moving it into place", task.task_id)
    promote(staging, final)
    return final, record


def settled_row(
    task: TaskPayload,
    status: str,
    finished_at: datetime,
    output_path: str | None,
    total: int | None = None,
    error: str | None = None,
) -> TaskRow:
    """The row as a status change leaves it (what final_event reads)."""
    return TaskRow(
        id=task.task_id,
        email=task.email,
        course_url=task.course_url,
        status=status,
        attempts=0,
        progress=100 if status == COMPLETED else 0,
        error_message=error,
        output_path=output_path,
        bytes=total,
        started_at=None,
        finished_at=finished_at,
        updated_at=finished_at,
    )


def record_completed(
    settings: Settings, store: TaskStore, redis: Redis, task: TaskPayload, final: Path, record: dict[str, Any]
) -> bool:
    """processing -> completed for files already verified and in place at *final*. Returns whether
    this call settled the task (False: it was settled before, and is left as it is)."""
    finished_at = utcnow()
    total = int(record.get("bytes", 0))
    msg_id, event = final_event(settled_row(task, COMPLETED, finished_at, str(final), total=total), record)
    changed = store.mark_completed(task.task_id, str(final), total, finished_at, event=_outbox(settings, msg_id))
    if not _took_effect(store, task.task_id, COMPLETED, finished_at, changed):
        log.warning("task %s: row was no longer processing; left as it is", task.task_id)
        return False
    crashpoints.crash_point(crashpoints.AFTER_COMPLETED)
    log.info("task %s: completed, %s files, %s bytes in %s", task.task_id, len(record.get("files", [])), total, final)
    status_stream.publish_completed(redis, task.task_id, total, len(record.get("files", [])))
    enqueue_webhook(settings, redis, msg_id, event)
    crashpoints.crash_point(crashpoints.AFTER_WEBHOOK)
    return True


def record_failed(
    settings: Settings,
    store: TaskStore,
    redis: Redis,
    task: TaskPayload,
    reason: str,
    attempt: int | None = None,
    keep_files: bool = True,
) -> bool:
    """processing -> failed: keep what was fetched aside (FAILED_DIR), record the reason, tell the
    payment service. With *attempt*, only while the row still counts that attempt: a late run
    cannot fail a task an operator has reopened since. Returns whether this call settled it."""
    reason = reason[: defaults.MAX_ERROR_LENGTH]
    kept = (
        str(keep_failed(settings, task.task_id, staging_path(settings, task.task_id), reason)) if keep_files else None
    )
    finished_at = utcnow()
    msg_id, event = final_event(settled_row(task, FAILED, finished_at, kept, error=reason))
    outbox = _outbox(settings, msg_id)
    changed = store.mark_failed(task.task_id, reason, kept, finished_at, event=outbox, attempt=attempt)
    if not _took_effect(store, task.task_id, FAILED, finished_at, changed):
        log.warning("task %s: row was no longer processing at attempt %s; failure not recorded", task.task_id, attempt)
        return False
    crashpoints.crash_point(crashpoints.AFTER_FAILED)
    status_stream.publish_failed(redis, task.task_id, reason)
    enqueue_webhook(settings, redis, msg_id, event)
    return True


def record_cancelled(
    settings: Settings, store: TaskStore, redis: Redis, task: TaskPayload, reason: str, attempt: int | None = None
) -> bool:
    """Not settled yet (`processing`, or unpaid) -> failed with *reason* (`cancelled…`), then its
    partial files are deleted and the payment service gets `download.cancelled`. The status change
    is conditional: a task a run completed first stays completed (False), and its files stay. With
    *attempt*, only while the row still counts that attempt. Nothing is kept aside and nothing is
    retried. The caller holds the task's lease, so no run writes the staging folder meanwhile."""
    reason = reason[: defaults.MAX_ERROR_LENGTH]
    finished_at = utcnow()
    msg_id, event = final_event(settled_row(task, FAILED, finished_at, None, error=reason))
    changed = store.mark_cancelled(task.task_id, reason, finished_at, event=_outbox(settings, msg_id), attempt=attempt)
    if not _took_effect(store, task.task_id, FAILED, finished_at, changed):
        log.warning("task %s: already settled; not cancelled", task.task_id)
        return False
    removed = [
        str(folder)
        for folder in (staging_path(settings, task.task_id), final_path(settings, task.task_id))
        if remove_folder(folder)
    ]
    log.info("task %s: %s; removed %s", task.task_id, reason, ", ".join(removed) or "no files")
    status_stream.publish_failed(redis, task.task_id, reason)
    enqueue_webhook(settings, redis, msg_id, event)
    return True


def fail_row(settings: Settings, store: TaskStore, redis: Redis, row: TaskRow, reason: str) -> bool:
    """Fail a `processing` row that never ran (its data cannot make a job): no folder to keep."""
    task = TaskPayload(task_id=row.id, email=row.email, course_url=row.course_url)
    return record_failed(settings, store, redis, task, reason, keep_files=False)


def resend_final_event(settings: Settings, redis: Redis, row: TaskRow) -> bool:
    """Queue again the final event of a settled task while the payment service has not
    acknowledged it, under the webhook-id the first run used: a run that died after the status
    change but before queuing its webhook must not leave the payment service uninformed."""
    if row.finished_at is None or not row.pending_event:
        return False
    msg_id, event = final_event(row)
    return enqueue_webhook(settings, redis, msg_id, event)


def _took_effect(store: TaskStore, task_id: int, status: str, finished_at: datetime, changed: bool) -> bool:
    """Did our status change take effect? Also true when the update was applied but its answer
    was lost (the store retried a statement that had in fact committed): the row then carries
    our status and our finish time."""
    if changed:
        return True
    row = store.get(task_id)
    return row is not None and row.status == status and row.finished_at == finished_at


def _outbox(settings: Settings, msg_id: str) -> str | None:
    """What the status change records as the pending final event: nothing when no webhook is sent."""
    return msg_id if settings.webhook_url else None
