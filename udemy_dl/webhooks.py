"""Webhooks to the payment service: build events, sign them (Standard Webhooks), queue their delivery.

The delivery itself is a job (job.deliver_webhook)."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Retry
from rq.exceptions import DuplicateJobError
from standardwebhooks import Webhook

from . import defaults
from .folders import read_record
from .queues import webhook_queue
from .settings import Settings
from .store import COMPLETED as ROW_COMPLETED
from .store import TaskRow

log = logging.getLogger(__name__)

COMPLETED = "download.completed"
FAILED = "download.failed"
CANCELLED = "download.cancelled"
"""The final event of a cancelled task (its row is `failed`, its error begins with "cancelled")."""
STARTED = "download.started"
PROGRESS = "download.progress"
LIVE_EVENTS = (STARTED, PROGRESS)
LIVE_RETRY_INTERVALS = (5, 15, 30)
"""Live events are news only while the download runs: retried for about a minute, not an hour."""
DELIVER_FUNCTION = defaults.DELIVER_JOB_FUNCTION
FINAL_KINDS = tuple(kind.split(".")[-1] for kind in (COMPLETED, FAILED, CANCELLED))
"""The last part of a final event's type, as it appears in its webhook-id."""


def generate_secret() -> str:
    """A new API_SECRET_KEY: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def event_id(task_id: int, event_type: str, finished_at: datetime) -> str:
    """The webhook-id of one event: the same for every delivery attempt, different for each event."""
    stamp = finished_at.strftime("%Y%m%dT%H%M%S%f")
    return f"msg_{task_id}_{event_type.split('.')[-1]}_{stamp}"


def final_event_of(event_id_: str) -> int | None:
    """The task id of a final event's webhook-id (download.completed, .failed or .cancelled), else None."""
    parts = event_id_.split("_")
    if len(parts) != 4 or parts[0] != "msg" or parts[2] not in FINAL_KINDS or not parts[1].isdigit():
        return None
    return int(parts[1])


def final_event(row: TaskRow, record: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The download.completed, download.failed or download.cancelled event of a settled row, and
    its webhook-id.

    Built from the row alone (plus the finished folder's record, where this host has it), so the
    run that settled the task, a later run and the reconciler all build the same event.
    """
    if row.finished_at is None:
        raise ValueError(f"task {row.id} is not settled (status {row.status})")
    data: dict[str, Any] = {"taskId": row.id, "email": row.email, "courseUrl": row.course_url, "status": row.status}
    if row.status == ROW_COMPLETED:
        event_type = COMPLETED
        data.update(outputPath=row.output_path, bytes=row.bytes)
        if record is None and row.output_path:
            record = read_record(Path(row.output_path))
        if record is not None:
            data.update(files=len(record.get("files", [])), title=record.get("title"))
    elif row.cancelled:
        event_type = CANCELLED
        data.update(error=row.error_message)
    else:
        event_type = FAILED
        data.update(error=row.error_message, failedPath=row.output_path)
    return event_id(row.id, event_type, row.finished_at), build_event(event_type, data, row.finished_at)


def build_event(event_type: str, data: dict[str, Any], at: datetime) -> dict[str, Any]:
    return {
        "type": event_type,
        "timestamp": at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }


def sign_headers(secret: str, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for *body*, signed now."""
    timestamp = now or datetime.now(UTC)
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)  # naive times are UTC throughout this package
    signature = Webhook(secret).sign(msg_id=msg_id, timestamp=timestamp, data=body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
        "Content-Type": "application/json",
    }


def enqueue_webhook(settings: Settings, connection: Redis, msg_id: str, event: dict[str, Any]) -> bool:
    """Queue one delivery of *event*. The job id derives from *msg_id*, so an event is queued once.

    Returns False when no WEBHOOK_URL is set or the event is already queued or delivered.
    """
    if not settings.webhook_url:
        log.info("task %s: no WEBHOOK_URL, %s not sent", event["data"].get("taskId"), event["type"])
        return False
    body = json.dumps(event, separators=(",", ":"), sort_keys=True)
    intervals = LIVE_RETRY_INTERVALS if event["type"] in LIVE_EVENTS else settings.webhook_retry_intervals
    try:
        webhook_queue(settings, connection).enqueue(
            DELIVER_FUNCTION,
            msg_id,
            body,
            job_id=f"webhook-{msg_id}",
            unique=True,
            retry=Retry(max=len(intervals), interval=list(intervals)),
            job_timeout=defaults.WEBHOOK_JOB_TIMEOUT,
            result_ttl=settings.result_ttl,
            failure_ttl=settings.failure_ttl,
            description=f"webhook {event['type']} task {event['data'].get('taskId')}",
        )
    except DuplicateJobError:
        log.info("task %s: webhook %s already queued or sent", event["data"].get("taskId"), msg_id)
        return False
    return True
