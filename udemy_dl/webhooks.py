"""Webhooks to the payment service: Standard Webhooks signing, and delivery as its own retried job."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from redis import Redis
from rq import Retry, get_current_job
from rq.exceptions import DuplicateJobError
from standardwebhooks import Webhook

from . import defaults, metrics
from .connection import webhook_queue
from .context import get_context
from .errors import ConfigError, WebhookDeliveryError
from .settings import Settings, get_settings
from .storage import read_record
from .store import COMPLETED as ROW_COMPLETED
from .store import TaskRow

log = logging.getLogger(__name__)

COMPLETED = "download.completed"
FAILED = "download.failed"
STARTED = "download.started"
PROGRESS = "download.progress"
LIVE_EVENTS = (STARTED, PROGRESS)
LIVE_RETRY_INTERVALS = (5, 15, 30)
"""Live events are news only while the download runs: retried for about a minute, not an hour."""
DELIVER_FUNCTION = defaults.DELIVER_JOB_FUNCTION
FINAL_KINDS = (COMPLETED.split(".")[-1], FAILED.split(".")[-1])
"""The last part of a final event's type, as it appears in its webhook-id."""


def generate_secret() -> str:
    """A new API_SECRET_KEY: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def event_id(task_id: int, event_type: str, finished_at: datetime) -> str:
    """The webhook-id of one event: the same for every delivery attempt, different for each event."""
    stamp = finished_at.strftime("%Y%m%dT%H%M%S%f")
    return f"msg_{task_id}_{event_type.split('.')[-1]}_{stamp}"


def final_event_of(event_id_: str) -> int | None:
    """The task id of a final event's webhook-id (download.completed or download.failed), else None."""
    parts = event_id_.split("_")
    if len(parts) != 4 or parts[0] != "msg" or parts[2] not in FINAL_KINDS or not parts[1].isdigit():
        return None
    return int(parts[1])


def final_event(row: TaskRow, record: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The download.completed or download.failed event of a settled row, and its webhook-id.

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


def deliver_webhook(msg_id: str, body: str) -> dict[str, Any]:
    """RQ job: POST one signed event to WEBHOOK_URL; anything but 2xx raises, so RQ retries later."""
    settings = get_settings()
    job = get_current_job()
    if not settings.webhook_url or not settings.api_secret_key:
        if job is not None:
            metrics.inc(job.connection, "webhook_deliveries", result="failed")
        missing = "WEBHOOK_URL" if not settings.webhook_url else "API_SECRET_KEY"
        raise ConfigError(missing, "not set on this worker; cannot deliver")
    headers = sign_headers(settings.api_secret_key, msg_id, body)
    try:
        response = requests.post(
            settings.webhook_url,
            data=body.encode("utf-8"),
            headers=headers,
            timeout=(defaults.WEBHOOK_TIMEOUT, defaults.WEBHOOK_TIMEOUT),
            allow_redirects=False,
        )
        if not 200 <= response.status_code < 300:
            raise WebhookDeliveryError(f"webhook {msg_id}: receiver answered HTTP {response.status_code}")
    except (requests.RequestException, WebhookDeliveryError) as exc:
        if job is not None:
            metrics.inc(job.connection, "webhook_deliveries", result="failed")
        if isinstance(exc, WebhookDeliveryError):
            raise
        raise WebhookDeliveryError(f"webhook {msg_id}: {type(exc).__name__}") from exc
    if job is not None:
        metrics.inc(job.connection, "webhook_deliveries", result="delivered")
    log.info("webhook %s delivered (HTTP %s)", msg_id, response.status_code)
    _acknowledge(msg_id)
    return {"delivered": True, "webhookId": msg_id, "status": response.status_code}


def _acknowledge(msg_id: str) -> None:
    """A final event reached the payment service: take it out of the task row's outbox."""
    task_id = final_event_of(msg_id)
    if task_id is None:
        return
    try:
        get_context().store.event_delivered(task_id, msg_id)
    except Exception as exc:  # delivered is delivered; a stale outbox entry only risks one more send
        log.warning("webhook %s delivered, but not recorded in the database: %s", msg_id, exc)
