"""Cancel requests in Redis: the signal that reaches a task's run wherever its worker runs.

`udemy-dl cancel` and `POST /orders/cancel` set `udemy_dl:cancel:<taskId>` (its value is the
reason recorded in the row) before anything else, so every run of the task sees it: a run in
progress polls it once a second beside its lease and stops, and a run about to start refuses to
fetch. The key outlives any run (CANCEL_TTL); reopening the task with `requeue-failed` clears it.
"""

from __future__ import annotations

from redis import Redis

from .errors import InvalidTaskError
from .store import CANCELLED_PREFIX

CANCEL_KEY = "udemy_dl:cancel:{}"
CANCEL_TTL = 7 * 24 * 3600
"""Seconds a cancel request is kept: longer than any run of the task can last."""

CANCEL_POLL_INTERVAL = 1.0
"""Seconds between two looks at the cancel key by a running download."""

MAX_REASON_LENGTH = 200
"""Longest reason a cancel request may give (it goes into the row and the webhook)."""


def cancel_key(task_id: int) -> str:
    return CANCEL_KEY.format(task_id)


def parse_reason(value: object) -> str | None:
    """A cancel request's reason: None, or printable text of at most MAX_REASON_LENGTH characters.
    InvalidTaskError names the field and the value at fault."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTaskError(f"reason must be text, got {type(value).__name__}")
    text = value.strip()
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidTaskError(f"reason is {len(text)} characters long; at most {MAX_REASON_LENGTH}")
    if any(not char.isprintable() for char in text):
        raise InvalidTaskError(f"reason must be printable text without control characters, got {text[:40]!r}")
    return text or None


def cancel_text(reason: str | None) -> str:
    """The error recorded for a cancelled task: `cancelled`, or `cancelled: <reason>`."""
    return f"{CANCELLED_PREFIX}: {reason}" if reason else CANCELLED_PREFIX


def request_cancel(connection: Redis, task_id: int, text: str) -> None:
    """Ask every run of *task_id* to stop and settle it as cancelled with *text* (see cancel_text)."""
    connection.set(cancel_key(task_id), text, ex=CANCEL_TTL)


def cancel_requested(connection: Redis, task_id: int) -> str | None:
    """The recorded reason of a pending cancel request for *task_id*, or None."""
    value = connection.get(cancel_key(task_id))
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


def clear_cancel(connection: Redis, task_id: int) -> None:
    """Forget a cancel request (the task completed first, or an operator reopened it)."""
    connection.delete(cancel_key(task_id))
