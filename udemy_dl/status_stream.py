"""Each task's live status, as one Redis Stream per task (`udemy_dl:status:<taskId>`), for the customer's browser.

Workers, the producer and the settling code append to it from the places the webhooks are sent; the web front
(`serve`) reads it and turns each entry into a Server-Sent Event (docs/STATUS.md). An entry carries
customer-facing fields only: status, progress (0-100), bytes, total, files, filesTotal, and for `failed` a short
reason. No path, no e-mail address, no internal error text.

Appending is best effort: a Redis error is logged and never fails the task (MySQL is the record; the stream's
snapshot is read from there). Each stream is bounded (XADD MAXLEN ~) and expires STREAM_TTL seconds after its last
entry, so it is kept for well over an hour after its task settles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from .store import COMPLETED, FAILED, PROCESSING, TaskRow

log = logging.getLogger(__name__)

KEY = "udemy_dl:status:{}"

MAXLEN = 1000
"""Entries kept per stream (about; Redis trims whole nodes): over 16 minutes of progress at one a second. A
reconnect after a trimmed entry gets a fresh snapshot instead."""

STREAM_TTL = 2 * 3600
"""Seconds a stream lives after its last entry: the final entry keeps it two hours, at least one as promised."""

PENDING = "pending"
FINAL_STATUSES = frozenset({COMPLETED, FAILED})
STATUSES = (PENDING, PROCESSING, COMPLETED, FAILED)

FIELDS = ("status", "progress", "bytes", "total", "files", "filesTotal", "reason")

MAX_REASON = 120
"""Longest reason shown to a customer."""

REASONS = (
    ("cancelled", "cancelled"),
    ("bad task data", "the order's data is not valid"),
    ("not allowed", "the course address is not allowed"),
    ("no attempts left", "the download kept failing"),
    ("too large", "the course is too large"),
)
"""Internal reason (a prefix or a phrase in it) -> what the customer is told; anything else is `download failed`."""


def stream_key(task_id: int) -> str:
    return KEY.format(task_id)


def customer_reason(reason: str | None) -> str:
    """A short reason a customer may read, from the internal one (which may name paths, hosts or exceptions)."""
    text = (reason or "").lower()
    for needle, shown in REASONS:
        if needle in text:
            return shown
    return "download failed"


def public_status(status: str) -> str:
    """The four statuses a customer sees: `enrolled` (unpaid) reads as `pending`."""
    return status if status in STATUSES else PENDING


def event_fields(
    status: str,
    progress: int = 0,
    done: int = 0,
    total: int | None = None,
    files: int = 0,
    files_total: int = 0,
    reason: str | None = None,
) -> dict[str, str]:
    """One stream entry's fields (strings, as Redis stores them); `total` absent when not known."""
    fields = {
        "status": public_status(status),
        "progress": str(max(0, min(int(progress), 100))),
        "bytes": str(max(0, int(done))),
        "files": str(max(0, int(files))),
        "filesTotal": str(max(0, int(files_total))),
    }
    if total is not None:
        fields["total"] = str(max(0, int(total)))
    if fields["status"] == FAILED:
        fields["reason"] = customer_reason(reason)[:MAX_REASON]
    return fields


def append(redis: Redis, task_id: int, fields: Mapping[str, str]) -> str | None:
    """XADD one entry to the task's stream (bounded, its expiry renewed); its id, or None when Redis refused.
    Never raises: a status stream must not fail a download."""
    key = stream_key(task_id)
    try:
        with redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, dict(fields), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(key, STREAM_TTL)
            entry_id, _ = pipe.execute()
    except RedisError as exc:
        log.warning("task %s: status stream not updated (%s): %s", task_id, fields.get("status"), type(exc).__name__)
        return None
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def publish_progress(
    redis: Redis, task_id: int, progress: int, done: int, total: int | None, files: int, files_total: int
) -> str | None:
    return append(redis, task_id, event_fields(PROCESSING, progress, done, total, files, files_total))


def publish_processing(redis: Redis, task_id: int) -> str | None:
    """Paid and queued, or a run starting: `processing`, nothing fetched yet (the progress events follow)."""
    return append(redis, task_id, event_fields(PROCESSING))


def publish_completed(redis: Redis, task_id: int, total: int, files: int) -> str | None:
    return append(redis, task_id, event_fields(COMPLETED, 100, total, total, files, files))


def publish_failed(redis: Redis, task_id: int, reason: str) -> str | None:
    return append(redis, task_id, event_fields(FAILED, reason=reason))


# -- reading (the web front) ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(fields: Mapping[str, str], name: str) -> int:
    value = fields.get(name, "0")
    return int(value) if value.isdigit() and len(value) <= 20 else 0


def event_data(task_id: int, raw: Mapping[Any, Any]) -> dict[str, Any]:
    """An entry's fields as the event's JSON data: numbers as numbers, `total` null when not known."""
    fields = {_text(name): _text(value) for name, value in raw.items()}
    data: dict[str, Any] = {
        "taskId": task_id,
        "status": public_status(fields.get("status", PENDING)),
        "progress": _number(fields, "progress"),
        "bytes": _number(fields, "bytes"),
        "total": _number(fields, "total") if "total" in fields else None,
        "files": _number(fields, "files"),
        "filesTotal": _number(fields, "filesTotal"),
    }
    if data["status"] == FAILED:
        data["reason"] = fields.get("reason") or customer_reason(None)
    return data


def snapshot_data(task_id: int, row: TaskRow, latest: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The task now: its row's status (read after *latest*, and every entry is written after the row change it
    reports, so the row is the newer word), with the latest entry's figures while both say `processing`."""
    status = public_status(row.status)
    entry = event_data(task_id, latest) if latest else None
    if status == COMPLETED:
        files = entry["filesTotal"] if entry else 0
        done = row.bytes or (entry["bytes"] if entry else 0)
        return event_data(task_id, event_fields(COMPLETED, 100, done, done, files, files))
    if status == FAILED:
        return {**event_data(task_id, event_fields(FAILED, reason=row.error_message)), "progress": row.progress or 0}
    if status == PROCESSING and entry is not None and entry["status"] == PROCESSING:
        return {**entry, "progress": max(entry["progress"], row.progress or 0)}
    progress = row.progress or 0 if status == PROCESSING else 0
    return event_data(task_id, event_fields(status, progress))


def is_final(data: Mapping[str, Any]) -> bool:
    return data.get("status") in FINAL_STATUSES
