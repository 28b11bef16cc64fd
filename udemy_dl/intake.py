"""The intake: an HTTP front door for producers in any language (`udemy-dl serve`, SPEC §10).

    POST /orders/confirm   signed; {"taskIds": [int, ...], "priority": "normal"|"high"} -> 202
    POST /orders/cancel    signed; {"taskId": int, "reason": "refund"} -> 200 cancelled (or already),
                           202 still stopping, 409 completed or failed before, 404 no such task
    GET  /tasks/<id>       signed (empty body) -> 200 task status, or 404
    GET  /metrics          Prometheus text format (no signature)
    GET  /healthz          200 when Redis and the database answer, else 503 naming what does not

Requests are signed like our webhooks (Standard Webhooks: webhook-id, webhook-timestamp and
webhook-signature, with API_SECRET_KEY), so the payment service needs one secret and one library
for both directions. What a request signs as the Standard Webhooks "payload" is not the body
alone but `<METHOD> <request-target>\n<body>` (request_content), so a signature is good for one
method on one path (query string included) and nothing else. Every request is checked completely
before anything changes: a 4xx answer means nothing was written to Redis or the database.

Bad input of any shape is a 4xx with a reason: numbers are read with ASCII-digit patterns, never
str.isdigit() or an unbounded int(); tests/test_intake_properties.py fuzzes the whole request.

A confirmation is idempotent twice over: confirm_payment itself changes nothing for a task that
is already queued or done, and a replayed webhook-id (the same signed message sent again within
its tolerance window) gets the first answer back without touching the queue at all.

This module is the intake without HTTP: verification, parsing, and what each route does (IntakeApp, answering
with an Answer). The HTTP server is web.py (Starlette on uvicorn), which runs IntakeApp's blocking methods in
worker threads. They share one Redis client (redis-py's pool is thread-safe) and borrow status-store
connections from a small pool, since a database connection must not be used by two threads at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote

from redis import Redis
from redis.exceptions import RedisError
from standardwebhooks import Webhook

from . import defaults
from .cancellation import parse_reason
from .connection import redis_connection
from .errors import ConfigError, InvalidTaskError, StoreError
from .metrics import render_latest
from .producer import ALREADY_CANCELLED, CANCEL_REQUESTED, CANCELLED, NOT_FOUND, Producer
from .settings import Settings
from .store import TaskRow, TaskStore, open_store
from .webhooks import sign_headers

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted; 1000 task ids fit in about 20 KiB."""

DRAIN_BODY_BYTES = 1024 * 1024
"""An oversized body up to this size is read and dropped before the 413, so the client sees the
answer instead of a reset connection; a larger one is not read at all."""

MAX_TASK_IDS = 1000
"""Most task ids one confirmation may carry."""

MAX_TASK_ID = 2**63 - 1
"""Largest task id accepted (what both stores can hold)."""

REPLAY_TTL = 600
"""Seconds a confirmation's webhook-id is remembered: longer than the signature's tolerance
(a timestamp up to 5 minutes old or ahead), so every replay that could pass verification is caught."""

REPLAY_WAIT = 5.0
"""Seconds a replay waits for the first request with its webhook-id to finish, before 409."""

REPLAY_KEY = "udemy_dl:intake:msg:{}"

MAX_IDLE_STORES = 8
"""Database connections kept open between requests."""

WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
JSON_TYPE = "application/json; charset=utf-8"

SIGNATURE_TOLERANCE = 5 * 60
"""Seconds a webhook-timestamp may be off the server's clock, either way (as in Standard Webhooks)."""

MSG_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
"""A webhook-id: 1 to 256 printable ASCII characters, no spaces (it is logged and becomes a Redis key)."""

TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
"""A webhook-timestamp: Unix seconds in ASCII digits (float() would also take `1e9`, `nan` or `1_700_000_000`)."""

CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")
"""A Content-Length: ASCII digits only (`²` is str.isdigit() but not int()), short enough for int()."""

MAX_NUMBER_DIGITS = 40
"""Longest integer read from a JSON body; a task id has at most 19 digits (int() of a much longer
string is slow, and over 4300 digits it raises)."""

SIGNING_DOC = "docs/INTAKE.md, Signing a request"


# -- request validation ----------------------------------------------------------------------------


class HttpError(Exception):
    """An answer other than success: status, a message for the caller and, for 400s, the field at fault."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            answer["field"] = self.field
        return answer


def bad_request(message: str, field: str | None = None) -> HttpError:
    return HttpError(400, message, field)


# -- signing --------------------------------------------------------------------------------------------


def request_content(method: str, target: str, body: str) -> str:
    """What a request's signature covers, given to Standard Webhooks as its payload: the method, one space, the
    request-target exactly as sent on the request line (path and query string, percent-encoding untouched), a line
    feed, then the body (empty for a GET). The HMAC input is therefore `<id>.<timestamp>.<METHOD> <target>\\n<body>`.
    """
    return f"{method} {target}\n{body}"


def sign_request(
    secret: str, method: str, target: str, body: str = "", msg_id: str | None = None, now: datetime | None = None
) -> dict[str, str]:
    """The webhook-* headers (and Content-Type) for one request to the intake, signed now: the helper for a Python
    caller. *target* is the path and query string exactly as they will be sent."""
    return sign_headers(secret, msg_id or f"msg_{uuid.uuid4().hex}", request_content(method, target, body), now=now)


def _unauthorized(message: str) -> HttpError:
    return HttpError(401, message)


def _signature_bytes(webhook: Webhook, msg_id: str, at: datetime, content: str) -> bytes:
    return base64.b64decode(webhook.sign(msg_id=msg_id, timestamp=at, data=content).split(",", 1)[1])


def verify_request(
    webhook: Webhook,
    method: str,
    target: str,
    body: str,
    headers: Mapping[str, str],
    now: datetime | None = None,
) -> str:
    """Check the Standard Webhooks headers of one request over request_content(); return its webhook-id.

    HttpError 401 when a header is missing or malformed, the timestamp is more than 5 minutes off, or no
    signature matches; a signature over the body alone (the scheme before method and path were signed) is told so.
    """
    present = {name: headers[name] for name in WEBHOOK_HEADERS if headers.get(name)}
    missing = [name for name in WEBHOOK_HEADERS if name not in present]
    if missing:
        raise _unauthorized(f"missing header(s) {', '.join(missing)}: sign the request (Standard Webhooks)")
    msg_id, stamp, signatures = (present[name] for name in WEBHOOK_HEADERS)
    if not MSG_ID_RE.fullmatch(msg_id):
        raise _unauthorized(
            "signature verification failed: malformed webhook-id: 1 to 256 printable ASCII characters, no spaces"
        )
    if not TIMESTAMP_RE.fullmatch(stamp.strip(" \t")):
        raise _unauthorized("signature verification failed: malformed webhook-timestamp: Unix seconds, ASCII digits")
    signed_at = int(stamp.strip(" \t"))
    clock = (now or datetime.now(UTC)).timestamp()
    if signed_at < clock - SIGNATURE_TOLERANCE:
        raise _unauthorized("signature verification failed: Message timestamp too old")
    if signed_at > clock + SIGNATURE_TOLERANCE:
        raise _unauthorized("signature verification failed: Message timestamp too new")
    offered: list[bytes] = []
    for item in signatures.split(" "):
        version, comma, value = item.partition(",")
        if not comma:
            raise _unauthorized("signature verification failed: malformed webhook-signature: expected v1,<base64>")
        if version != "v1":
            continue
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise _unauthorized("signature verification failed: malformed webhook-signature: bad base64") from None
    at = datetime.fromtimestamp(signed_at, UTC)
    expected = _signature_bytes(webhook, msg_id, at, request_content(method, target, body))
    if any(hmac.compare_digest(expected, signature) for signature in offered):
        return msg_id
    body_only = _signature_bytes(webhook, msg_id, at, body)
    if any(hmac.compare_digest(body_only, signature) for signature in offered):
        raise _unauthorized(
            "signature verification failed: it covers the body only; the signature must cover the method and the "
            f"path too: sign `<METHOD> <path>\\n<body>` ({SIGNING_DOC})"
        )
    raise _unauthorized(
        "signature verification failed: No matching signature found "
        f"(it covers webhook-id, webhook-timestamp, method, path with query string, and body: {SIGNING_DOC})"
    )


# -- request validation, continued ------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON name of *value*'s type, as a JavaScript caller would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shown(value: object, limit: int = 40) -> str:
    """*value* as JSON, shortened, for an error message."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):  # a value the parser could read but not write back
        text = f"<{_json_type(value)}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RefusedJson(ValueError):
    """JSON that Python's parser would read but the intake does not take: NaN and Infinity (not JSON), duplicate
    keys (two readings of one body), numbers too long to be a task id."""


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise RefusedJson(f"a number has {digits} digits (a task id has at most 19)")
    return int(text)


def _json_constant(name: str) -> Any:
    raise RefusedJson(f"{name} is not JSON")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise RefusedJson(f"duplicate key {_shown(key)}")
        data[key] = value
    return data


def load_json(text: str) -> Any:
    """Parse a request body strictly; HttpError 400 saying why it is not acceptable JSON."""
    try:
        return json.loads(text, parse_int=_json_int, parse_constant=_json_constant, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise bad_request(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RefusedJson as exc:
        raise bad_request(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # anything else the parser refuses
        raise bad_request(f"body is not valid JSON: {_shown(str(exc), 80)}") from None


@dataclass(frozen=True)
class ConfirmRequest:
    """A validated `POST /orders/confirm` body."""

    task_ids: list[int]
    priority: str = "normal"


CONFIRM_FIELDS = ("taskIds", "priority")


def parse_confirm_body(text: str) -> ConfirmRequest:
    """Validate a confirmation body completely; HttpError 400 names the field and the value at fault."""
    data = load_json(text)
    if not isinstance(data, dict):
        raise bad_request(f'body must be a JSON object like {{"taskIds": [1, 2]}}, got {_json_type(data)}')
    unknown = sorted(key for key in data if key not in CONFIRM_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field(s) {', '.join(map(json.dumps, unknown))}: expected taskIds and optionally priority",
            unknown[0],
        )
    if "taskIds" not in data:
        raise bad_request("taskIds is required: a list of task ids", "taskIds")
    raw_ids = data["taskIds"]
    if not isinstance(raw_ids, list):
        raise bad_request(f"taskIds must be a list of task ids, got {_json_type(raw_ids)}", "taskIds")
    if not raw_ids:
        raise bad_request("taskIds must not be empty", "taskIds")
    if len(raw_ids) > MAX_TASK_IDS:
        raise bad_request(f"taskIds holds {len(raw_ids)} ids; at most {MAX_TASK_IDS} per request", "taskIds")
    task_ids: list[int] = []
    for index, value in enumerate(raw_ids):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad_request(
                f"taskIds[{index}] must be a positive integer, got {_shown(value)} ({_json_type(value)})", "taskIds"
            )
        if value > MAX_TASK_ID:
            raise bad_request(f"taskIds[{index}] is too large: {_shown(value)} (at most {MAX_TASK_ID})", "taskIds")
        task_ids.append(value)
    priority = data.get("priority", "normal")
    if priority not in defaults.PRIORITIES:
        raise bad_request(
            f"priority must be one of {', '.join(map(json.dumps, defaults.PRIORITIES))}, got {_shown(priority)}",
            "priority",
        )
    return ConfirmRequest(task_ids, str(priority))


@dataclass(frozen=True)
class CancelRequest:
    """A validated `POST /orders/cancel` body."""

    task_id: int
    reason: str | None = None


CANCEL_FIELDS = ("taskId", "reason")


def parse_cancel_body(text: str) -> CancelRequest:
    """Validate a cancel body completely; HttpError 400 names the field and the value at fault."""
    data = load_json(text)
    if not isinstance(data, dict):
        example = '{"taskId": 1, "reason": "refund"}'
        raise bad_request(f"body must be a JSON object like {example}, got {_json_type(data)}")
    unknown = sorted(key for key in data if key not in CANCEL_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field(s) {', '.join(map(json.dumps, unknown))}: expected taskId and optionally reason", unknown[0]
        )
    if "taskId" not in data:
        raise bad_request("taskId is required: the id of the task to cancel", "taskId")
    value = data["taskId"]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise bad_request(f"taskId must be a positive integer, got {_shown(value)} ({_json_type(value)})", "taskId")
    if value > MAX_TASK_ID:
        raise bad_request(f"taskId is too large: {_shown(value)} (at most {MAX_TASK_ID})", "taskId")
    try:
        reason = parse_reason(data.get("reason"))
    except InvalidTaskError as exc:
        raise bad_request(str(exc), "reason") from None
    return CancelRequest(value, reason)


CANCEL_STATUS = {CANCELLED: 200, ALREADY_CANCELLED: 200, CANCEL_REQUESTED: 202, NOT_FOUND: 404}
"""The HTTP status of each cancel outcome; anything else (refused) is 409."""


TASK_ID_RE = re.compile(r"[1-9][0-9]{0,18}")


def parse_path_task_id(raw: str) -> int:
    """The <id> of `/tasks/<id>`: a positive integer, else HttpError 400."""
    text = unquote(raw)
    if not TASK_ID_RE.fullmatch(text) or int(text) > MAX_TASK_ID:
        raise bad_request(f"task id must be a positive integer, got {_shown(text)}", "taskId")
    return int(text)


def _iso(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with Z, as our webhooks write it."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def task_view(row: TaskRow) -> dict[str, Any]:
    """What `GET /tasks/<id>` answers about one row (no e-mail address: the caller has it)."""
    return {
        "taskId": row.id,
        "status": row.status,
        "priority": row.priority,
        "progress": row.progress,
        "attempts": row.attempts,
        "outputPath": row.output_path,
        "bytes": row.bytes,
        "error": row.error_message,
        "startedAt": _iso(row.started_at),
        "updatedAt": _iso(row.updated_at),
        "finishedAt": _iso(row.finished_at),
    }


# -- the application --------------------------------------------------------------------------------


class StorePool:
    """Status-store connections lent to one request thread at a time (a connection is not thread-safe)."""

    def __init__(self, database_url: str, max_idle: int = MAX_IDLE_STORES) -> None:
        self.database_url = database_url
        self.max_idle = max_idle
        self._idle: list[TaskStore] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def borrow(self) -> Iterator[TaskStore]:
        with self._lock:
            store = self._idle.pop() if self._idle else None
        if store is None:
            store = open_store(self.database_url)
        try:
            # Reconnect a connection the server dropped while it sat idle (a ping, no SQL statement).
            store.ensure_connected()
        except Exception as exc:
            store.close()
            raise StoreError(f"status store: {type(exc).__name__}: {exc}") from exc
        try:
            yield store
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < self.max_idle
                if keep:
                    self._idle.append(store)
            if not keep:
                store.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for store in idle:
            store.close()


@dataclass
class Answer:
    """One HTTP answer: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, status: int, data: object, headers: Mapping[str, str] | None = None) -> Answer:
        return cls(status, json.dumps(data).encode("utf-8"), JSON_TYPE, dict(headers or {}))


class IntakeApp:
    """What the routes do, apart from HTTP: shared by every request thread. A route is a method taking what the
    request carried (verified and parsed by the caller) and answering an Answer."""

    def __init__(self, settings: Settings) -> None:
        if not settings.api_secret_key:
            raise ConfigError("API_SECRET_KEY", "required by `udemy-dl serve`: every request is verified with it")
        self.settings = settings
        self.webhook = Webhook(settings.api_secret_key)
        self.redis: Redis = redis_connection(settings)
        self.stores = StorePool(settings.require_database())

    def close(self) -> None:
        self.stores.close()
        self.redis.close()

    # -- authentication

    def verify(self, method: str, target: str, body: str, headers: Mapping[str, str]) -> str:
        """Check the request's signature (verify_request); return the webhook-id, else HttpError 401."""
        return verify_request(self.webhook, method, target, body, headers)

    # -- routes

    def confirm(self, request: ConfirmRequest, msg_id: str, body: bytes) -> Answer:
        """Confirm payment once per webhook-id; a replay of the same message gets the first answer."""
        key = REPLAY_KEY.format(msg_id)
        digest = hashlib.sha256(body).hexdigest()
        deadline = time.monotonic() + REPLAY_WAIT
        while not self.redis.set(key, json.dumps({"body": digest}), nx=True, ex=REPLAY_TTL):
            raw = cast(bytes | None, self.redis.get(key))
            if raw is None:
                continue  # the first request failed and let go of the id: this one takes it
            seen = json.loads(raw)
            if seen.get("body") != digest:
                raise HttpError(409, f"webhook-id {msg_id!r} was already used for a different body; use a new id")
            if "answer" in seen:
                log.info("confirm %s: replayed webhook-id, answering as before", msg_id)
                return Answer.of_json(202, seen["answer"], {"Idempotent-Replayed": "true"})
            if time.monotonic() >= deadline:
                raise HttpError(
                    409, f"a request with webhook-id {msg_id!r} is still in progress; retry", None, {"Retry-After": "1"}
                )
            time.sleep(0.05)  # polling for the first request's answer
        try:
            with self.stores.borrow() as store:
                result = Producer(self.settings, connection=self.redis, store=store).confirm_payment(
                    request.task_ids, priority=request.priority
                )
        except BaseException:
            self._forget(key)
            raise
        answer = result.as_dict()
        try:
            self.redis.set(key, json.dumps({"body": digest, "answer": answer}), ex=REPLAY_TTL)
        except RedisError:  # the work is done: answer it; a replay will find no answer and be told to retry
            log.warning("confirm %s: could not record the answer for replays", msg_id)
        log.info(
            "confirm %s: %d enqueued, %d already queued, %d refused (priority %s)",
            msg_id,
            len(result.enqueued),
            len(result.already_queued),
            len(result.refused),
            request.priority,
        )
        return Answer.of_json(202, answer)

    def _forget(self, key: str) -> None:
        try:
            self.redis.delete(key)
        except RedisError:
            log.warning("could not release %s; a replay will wait for it to expire", key)

    def cancel(self, request: CancelRequest, msg_id: str) -> Answer:
        """Cancel one task (Producer.cancel). Idempotent by nature: a replay, or a second cancel,
        finds the task already cancelled and says so."""
        with self.stores.borrow() as store:
            result = Producer(self.settings, connection=self.redis, store=store).cancel(request.task_id, request.reason)
        log.info("cancel %s: task %s: %s", msg_id, request.task_id, result.outcome)
        return Answer.of_json(CANCEL_STATUS.get(result.outcome, 409), result.as_dict())

    def task(self, task_id: int) -> Answer:
        with self.stores.borrow() as store:
            row = store.get(task_id)
        if row is None:
            return Answer.of_json(404, {"error": "no such task", "taskId": task_id})
        return Answer.of_json(200, task_view(row))

    def health(self) -> Answer:
        checks: dict[str, str] = {}
        try:
            self.redis.ping()
            checks["redis"] = "ok"
        except RedisError as exc:
            checks["redis"] = f"down: {type(exc).__name__}"
        try:
            with self.stores.borrow() as store:
                store.ping()
            checks["database"] = "ok"
        except StoreError as exc:
            checks["database"] = f"down: {type(exc).__name__}"
            log.warning("healthz: database does not answer: %s", exc)
        down = [name for name, state in checks.items() if state != "ok"]
        if down:
            return Answer.of_json(503, {**checks, "error": f"not answering: {', '.join(down)}"})
        return Answer.of_json(200, checks)

    def metrics(self) -> Answer:
        body, content_type = render_latest(self.settings, self.redis)
        return Answer(200, body, content_type)
