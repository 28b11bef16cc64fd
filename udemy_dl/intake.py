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

The server is the standard library's ThreadingHTTPServer (one thread per connection). Threads
share one Redis client (redis-py's pool is thread-safe) and borrow status-store connections from
a small pool, since a database connection must not be used by two threads at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TypeVar, cast
from urllib.parse import unquote

from redis import Redis
from redis.exceptions import RedisError
from standardwebhooks import Webhook

from . import defaults
from .cancellation import parse_reason
from .connection import redis_connection
from .errors import ConfigError, InvalidTaskError, StoreError, TransientError
from .producer import ALREADY_CANCELLED, CANCEL_REQUESTED, CANCELLED, NOT_FOUND, Producer
from .settings import Settings
from .store import TaskRow, TaskStore, open_store
from .webhooks import sign_headers

log = logging.getLogger(__name__)

T = TypeVar("T")

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

SOCKET_TIMEOUT = 15
"""Seconds a connection may stay silent (mid-request, or idle between keep-alive requests)."""

DRAIN_TIMEOUT = 10.0
"""Seconds `serve` waits on shutdown for requests in progress to finish."""

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
    """What the routes do, apart from HTTP: shared by every request thread."""

    def __init__(self, settings: Settings) -> None:
        if not settings.api_secret_key:
            raise ConfigError("API_SECRET_KEY", "required by `udemy-dl serve`: every request is verified with it")
        self.settings = settings
        self.webhook = Webhook(settings.api_secret_key)
        self.redis: Redis = redis_connection(settings)
        self.stores = StorePool(settings.require_database())
        self._in_flight = 0
        self._idle = threading.Condition()
        self.stopping = False

    # -- request accounting, for a clean shutdown

    @contextmanager
    def request(self) -> Iterator[None]:
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress; False if some still are after *timeout* seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

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
        try:
            module = importlib.import_module(f"{__package__}.metrics")
        except ImportError as exc:
            log.warning("/metrics: %s", exc)
            return Answer.of_json(503, {"error": "metrics are not available in this build"})
        render = cast(Callable[[Settings, Redis], tuple[bytes, str]], module.render_latest)
        body, content_type = render(self.settings, self.redis)
        return Answer(200, body, content_type)


# -- HTTP ---------------------------------------------------------------------------------------------


POST_CONFIRM = "/orders/confirm"
POST_CANCEL = "/orders/cancel"
TASK_PATH_RE = re.compile(r"/tasks/([^/]*)")
STATIC_ROUTES = {POST_CONFIRM: "POST", POST_CANCEL: "POST", "/metrics": "GET", "/healthz": "GET"}
QUIET_PATHS = frozenset({"/metrics", "/healthz"})
"""Logged at DEBUG when they answer 200: monitoring polls them."""


class IntakeServer(ThreadingHTTPServer):
    """The intake's HTTP server; `app` holds what its request threads share."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: IntakeApp) -> None:
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, IntakeHandler)

    def server_close(self) -> None:
        super().server_close()
        self.app.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke mid-answer is the client's business; anything else is logged (no traceback
        to stderr, as socketserver would print)."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("connection from %s: %s", client_address[0], type(error).__name__)
        else:
            log.error("connection from %s failed", client_address[0], exc_info=True)


def _printable(text: str, limit: int = 200) -> str:
    """*text* for a log line: control characters escaped, shortened."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


class IntakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "udemy-dl-intake"
    sys_version = ""
    timeout = SOCKET_TIMEOUT

    _started = 0.0
    _body_pending = False

    @property
    def app(self) -> IntakeApp:
        return cast(IntakeServer, self.server).app

    # -- logging: one line per answer, never a header (signatures stay out of logs)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        elapsed = (time.monotonic() - self._started) * 1000 if self._started else 0.0
        path = self.path if hasattr(self, "path") else "-"
        quiet = str(code) == "200" and path in QUIET_PATHS  # scraped every few seconds
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s -> %s (%.1f ms) from %s",
            _printable(self.command or "-"),
            _printable(path),
            code,
            elapsed,
            self.client_address[0],
        )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + _printable(format % args))

    # -- answers

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long...) answered as JSON.

        A method http.server has no do_<METHOD> for (it would answer 501) is routed like any other, so it gets
        404 or 405 with Allow: a client's odd request is a 4xx.
        """
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command and getattr(self, "headers", None) is not None:
            self._dispatch()
            return
        reason = message or self.responses.get(code, ("error",))[0]
        self._send(Answer.of_json(code, {"error": reason}), close=True)

    def _send(self, answer: Answer, close: bool = False) -> None:
        if self._body_pending or self.app.stopping:
            close = True  # an unread body would be taken for the next request
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    # -- reading

    def _content_length(self) -> int | None:
        """The declared body length, None when there is none; HttpError 400 unless it is one number in ASCII digits."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        if len(values) > 1:
            self._body_pending = True
            raise bad_request(f"{len(values)} Content-Length headers: send exactly one")
        raw = str(values[0]).strip(" \t")
        if not CONTENT_LENGTH_RE.fullmatch(raw):
            self._body_pending = True
            raise bad_request(f"Content-Length is not a number of bytes in ASCII digits: {_shown(raw)}")
        return int(raw)

    def _read_body(self) -> bytes:
        """The request body (Content-Length only); HttpError 411/413/400 otherwise."""
        if self.headers.get("Transfer-Encoding"):
            self._body_pending = True
            raise HttpError(411, "chunked bodies are not supported: send Content-Length")
        length = self._content_length()
        if length is None:
            if self.command == "POST":
                raise HttpError(411, "Content-Length is required")
            self._body_pending = False
            return b""
        if length > MAX_BODY_BYTES:
            self._body_pending = True
            if length <= DRAIN_BODY_BYTES:
                self._drain(length)
            raise HttpError(413, f"body is {length} bytes; at most {MAX_BODY_BYTES}")
        body = self.rfile.read(length)
        if len(body) != length:
            self._body_pending = True
            raise bad_request(f"body ended after {len(body)} of {length} bytes")
        self._body_pending = False
        return body

    def _drain(self, length: int) -> None:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 64 * 1024))
            if not chunk:
                return
            left -= len(chunk)
        self._body_pending = False

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._started = time.monotonic()
        length = self.headers.get("Content-Length", "").strip()
        self._body_pending = length not in ("", "0") or "Transfer-Encoding" in self.headers
        app = self.app
        with app.request():
            try:
                if app.stopping:
                    raise HttpError(503, "shutting down", None, {"Retry-After": "1"})
                answer = self._route(self._path())
            except HttpError as exc:
                answer = Answer.of_json(exc.status, exc.body(), exc.headers)
            except StoreError as exc:
                log.warning("%s %s: database unavailable: %s", self.command, _printable(self.path), exc)
                answer = Answer.of_json(503, {"error": "database unavailable; retry"}, {"Retry-After": "5"})
            except RedisError as exc:
                log.warning("%s %s: redis unavailable: %s", self.command, _printable(self.path), type(exc).__name__)
                answer = Answer.of_json(503, {"error": "redis unavailable; retry"}, {"Retry-After": "5"})
            except TransientError as exc:
                log.warning("%s %s: %s", self.command, _printable(self.path), exc)
                answer = Answer.of_json(503, {"error": "busy; retry"}, {"Retry-After": "1"})
            except Exception:
                log.exception("%s %s: unexpected error", self.command, _printable(self.path))
                answer = Answer.of_json(500, {"error": "internal error"})
            self._send(answer)
            self._started = 0.0

    def _target(self) -> str:
        """The request-target exactly as sent on the request line: what a signature covers."""
        words = (self.requestline or "").split()
        return words[1] if len(words) >= 2 else self.path

    def _path(self) -> str:
        """The path to route on, without the query string; HttpError 400 unless the target is a path (origin-form:
        not `http://host/...`, not `*`)."""
        if not self.path.startswith("/"):
            raise bad_request(
                f"the request-target must be a path such as /tasks/1 (origin-form), got {_shown(self._target())}"
            )
        return self.path.split("?", 1)[0]

    def _route(self, path: str) -> Answer:
        match = TASK_PATH_RE.fullmatch(path)
        allowed = "GET" if match else STATIC_ROUTES.get(path)
        if allowed is None:
            raise HttpError(404, f"no such route: {_shown(path)}")
        if self.command != allowed:
            raise HttpError(
                405, f"method {self.command} not allowed on {path}; use {allowed}", None, {"Allow": allowed}
            )
        if path == POST_CONFIRM:
            return self._confirm()
        if path == POST_CANCEL:
            return self.app.cancel(*self._signed_body(parse_cancel_body))
        if path == "/healthz":
            self._no_body()
            return self.app.health()
        if path == "/metrics":
            self._no_body()
            return self.app.metrics()
        assert match is not None
        self._no_body()
        self.app.verify(self.command, self._target(), "", self._webhook_headers())
        return self.app.task(parse_path_task_id(match.group(1)))

    def _no_body(self) -> None:
        if self._read_body():
            raise bad_request(f"{self.command} takes no body")

    def _webhook_headers(self) -> dict[str, str]:
        return {name: value for name in WEBHOOK_HEADERS if (value := self.headers.get(name)) is not None}

    def _confirm(self) -> Answer:
        body = self._read_body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("body is not UTF-8 text") from None
        msg_id = self.app.verify(self.command, self._target(), text, self._webhook_headers())
        request = parse_confirm_body(text)
        return self.app.confirm(request, msg_id, body)

    def _signed_body(self, parse: Callable[[str], T]) -> tuple[T, str]:
        """The request's body, signature checked, then parsed by *parse*; and its webhook-id."""
        try:
            text = self._read_body().decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("body is not UTF-8 text") from None
        msg_id = self.app.verify(self.command, self._target(), text, self._webhook_headers())
        return parse(text), msg_id


# -- entry points -------------------------------------------------------------------------------------


def make_server(settings: Settings, host: str, port: int) -> IntakeServer:
    """A bound intake server, not yet serving (call serve_forever; shutdown and server_close to stop).

    Raises ConfigError naming API_SECRET_KEY or DATABASE_URL when they are not set.
    """
    app = IntakeApp(settings)
    try:
        return IntakeServer((host, port), app)
    except BaseException:  # e.g. the port is taken: let go of the Redis client and the pool
        app.close()
        raise


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the intake until SIGTERM or SIGINT; then finish the requests in progress and stop."""
    server = make_server(settings, host, port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("intake: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="intake")
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log.info("intake listening on http://%s:%s", bound_host, bound_port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("intake bound to %s: put it behind TLS (requests and answers are not encrypted)", host)
    try:
        while not stop.wait(timeout=1.0):
            if not thread.is_alive():
                raise RuntimeError("the intake's server thread stopped unexpectedly")
    finally:
        server.app.stopping = True
        server.shutdown()
        thread.join()
        if not server.app.wait_idle(DRAIN_TIMEOUT):
            log.warning("intake: requests still in progress after %.0fs; stopping anyway", DRAIN_TIMEOUT)
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("intake stopped")
