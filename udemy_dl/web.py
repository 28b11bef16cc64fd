"""The web front (`udemy-dl serve`): one Starlette application on uvicorn (docs/INTAKE.md, docs/STATUS.md).

    POST /orders/confirm            signed (intake.IntakeApp.confirm)
    POST /orders/cancel             signed (IntakeApp.cancel)
    GET  /tasks/<id>                signed (IntakeApp.task)
    GET  /metrics, /healthz         no signature
    GET  /tasks/<id>/events?token=  Server-Sent Events: the task's live status (status token)
    GET  /status/<id>?token=        the status page; GET /static/status.js its script

This module is the HTTP adapter only. What a route does lives in intake.IntakeApp (framework-free: verification,
parsing, the answers), so a new route is one line of ROUTES. IntakeApp's methods block (Redis, the database):
they run in worker threads, never on the event loop. Connection limits, slow-client timeouts and graceful
shutdown are uvicorn's (`serve_config`); the one addition is IntakeProtocol: h11's own 400s answered as JSON,
and the keep-alive timeout armed from the first byte, so a client that never finishes its request head is cut
off after HEAD_TIMEOUT seconds.

The access log names method, path, status and time; the query string is logged with `token=` redacted, and no
header is ever logged (signatures and tokens stay out of logs).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_plus

import anyio
import anyio.to_thread
import h11
import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from . import status_stream
from .connection import async_redis_connection
from .errors import StoreError, TransientError
from .intake import (
    CONTENT_LENGTH_RE,
    DRAIN_BODY_BYTES,
    MAX_BODY_BYTES,
    WEBHOOK_HEADERS,
    Answer,
    HttpError,
    IntakeApp,
    bad_request,
    parse_cancel_body,
    parse_confirm_body,
    parse_path_task_id,
)
from .logs import setup_logging
from .settings import Settings, load_settings
from .store import TaskRow, utcnow
from .stream_hub import Entry, StreamHub, StreamReads, Watcher, id_key
from .tokens import TokenError, verify_status_token

log = logging.getLogger(__name__)

T = TypeVar("T")

HEAD_TIMEOUT = 15
"""Seconds a connection may take to send its request head, and may stay idle between keep-alive requests."""

DRAIN_TIMEOUT = 10
"""Seconds `serve` waits on shutdown for requests in progress (uvicorn's timeout_graceful_shutdown)."""

LIMIT_CONCURRENCY = 4096
"""Open connections and tasks one serve process takes before answering 503 (uvicorn's limit_concurrency);
each open event stream is one. Keep the process's open-file limit (ulimit -n) above it."""

KEEPALIVE_SECONDS = 15.0
"""Seconds between `: keep-alive` comments on an idle event stream (proxies drop silent connections)."""

ROW_CHECK_EVERY = 4
"""An event stream quiet for this many keep-alive intervals (a minute) reads its task's row once: a task settled
while Redis refused its final entry still ends the stream."""

SETTLED_GRACE = timedelta(seconds=30)
"""How long after a task settled its final entry may still be on its way (the row is written first)."""

INTAKE_THREADS = 16
"""Worker threads for the intake's blocking calls (Redis, the database), per process."""

LOOKUP_THREADS = 4
"""Worker threads for the event streams' task lookups (snapshots), per process: their own, so a burst of
reconnecting browsers never starves the intake."""

QUIET_PATHS = frozenset({"/metrics", "/healthz"})
"""Logged at DEBUG when they answer 200: monitoring polls them."""

SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
EVENT_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LAST_EVENT_ID_RE = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
STATUS_PAGE = "status.html"
STATUS_SCRIPT = "status.js"


# -- logging ---------------------------------------------------------------------------------------------------


def _printable(text: str, limit: int = 200) -> str:
    """*text* for a log line: control characters escaped, shortened."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


def logged_target(path: str, query: str) -> str:
    """The path and query string for the access log, with the value of every `token` parameter replaced."""
    if not query:
        return path
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        secret = unquote_plus(name).lower() in ("token", "access_token")  # as parse_qsl reads the name
        items.append(f"{name}=***" if equals and secret else item)
    return f"{path}?{'&'.join(items)}"


TARGET_SCOPE_KEY = "udemy_dl.request_target"


def request_target(scope: Scope) -> str:
    """The request-target exactly as sent on the request line (percent-encoding untouched, a bare `?` kept): what
    a signature covers. IntakeProtocol records it; another server's scope is rebuilt from its parts."""
    raw = scope.get(TARGET_SCOPE_KEY)
    if raw is None:
        query = scope.get("query_string", b"")
        raw = (scope.get("raw_path") or scope["path"].encode("latin-1", "replace")) + (b"?" + query if query else b"")
    return bytes(raw).decode("latin-1")


def _raw_target(scope: Scope) -> tuple[str, str]:
    """The request-target's path and query string, as sent."""
    path, _, query = request_target(scope).partition("?")
    return path, query


class AccessLog:
    """One log line per answer, and a 400 for a request-target that is not a path (origin-form)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        path, query = _raw_target(scope)
        try:
            if not path.startswith("/"):
                target = f"{path}?{query}" if query else path
                error = bad_request(
                    f"the request-target must be a path such as /tasks/1 (origin-form), got {json.dumps(target)[:40]}"
                )
                await _send_answer(Answer.of_json(error.status, error.body()), logging_send)
            else:
                await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client") or ("-", 0)
            quiet = status == 200 and path in QUIET_PATHS
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s -> %s (%.1f ms) from %s",
                _printable(scope.get("method", "-")),
                _printable(logged_target(path, query)),
                status or "-",
                (time.monotonic() - started) * 1000,
                client[0],
            )


async def _send_answer(answer: Answer, send: Send) -> None:
    extra = {**SECURITY_HEADERS, **answer.headers}
    headers = [(b"content-type", answer.content_type.encode()), (b"content-length", str(len(answer.body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


# -- the HTTP protocol: uvicorn's h11, with JSON 400s and a request-head timeout -----------------------------------


_CONTENT_LENGTH_LINE = re.compile(rb"\r?\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


def content_length_problem(head: bytes) -> str | None:
    """Why a request head's Content-Length framing is refused: two Content-Length lines, or a list in one (h11
    would take `5,5` or two equal lines as 5, as RFC 9110 allows; a proxy in front may read them otherwise)."""
    values = _CONTENT_LENGTH_LINE.findall(head)
    if len(values) > 1:
        return f"{len(values)} Content-Length headers: send exactly one"
    if values and b"," in values[0]:
        return "Content-Length is not a number of bytes in ASCII digits"
    return None


class _TargetRecorder(h11.Connection):
    """h11's connection, remembering the raw request-target of the request it parsed last, and refusing a
    request head whose Content-Length framing is ambiguous (content_length_problem)."""

    last_target: bytes | None = None

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE:
            buffered = bytes(self._receive_buffer)
            end = buffered.find(b"\r\n\r\n")
            problem = content_length_problem(buffered[: end + 2]) if end >= 0 else None
            if problem is not None:
                self._process_error(self.their_role)  # what h11 does with a head it cannot parse
                raise h11.RemoteProtocolError(problem, error_status_hint=400)
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.last_target = bytes(event.target)
        return event


class IntakeProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: the raw request-target in the scope (uvicorn splits off the query string, and
    with it a bare `?`, which a signature covers); a request h11 cannot parse gets a JSON 400 naming h11's reason
    (`bad Content-Length`); a connection must send its request head within HEAD_TIMEOUT seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _TargetRecorder(h11.SERVER, self.conn._max_incomplete_event_size)

    def handle_events(self) -> None:
        super().handle_events()
        conn = self.conn
        if conn.their_state is not h11.IDLE:
            self._head_started = None
        if isinstance(conn, _TargetRecorder) and conn.last_target is not None:
            # The request's scope was built just now, and its application task has not run yet.
            self.scope[TARGET_SCOPE_KEY] = conn.last_target  # type: ignore[literal-required]
            conn.last_target = None

    _head_started: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # uvicorn disarms its timer on any data
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_head_timer()  # still no whole request head: the clock runs from its first byte
        else:
            self._head_started = None

    def _arm_head_timer(self) -> None:
        """Close the connection unless a whole request head arrives within HEAD_TIMEOUT seconds of the first
        byte of it (uvicorn's own timer, armed between requests, covers an idle keep-alive connection)."""
        now = self.loop.time()
        if self._head_started is None:
            self._head_started = now
        self._unset_keepalive_if_required()
        remaining = max(0.0, self._head_started + HEAD_TIMEOUT - now)
        self.timeout_keep_alive_task = self.loop.call_later(remaining, self.timeout_keep_alive_handler)

    def send_400_response(self, msg: str) -> None:
        error = sys.exc_info()[1]  # called while uvicorn handles h11's RemoteProtocolError
        reason = str(error) if isinstance(error, h11.ProtocolError) and str(error) else msg
        body = json.dumps({"error": f"invalid HTTP request: {reason}"[:200]}).encode()
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# -- the application ---------------------------------------------------------------------------------------------


Handler = Callable[["WebFront", Request, "re.Match[str]"], Awaitable[Response]]


@dataclass(frozen=True)
class WebRoute:
    """A path pattern, the methods it answers, and its handler."""

    pattern: re.Pattern[str]
    methods: tuple[str, ...]
    handler: Handler


def _answer(answer: Answer) -> Response:
    return Response(answer.body, answer.status, {**SECURITY_HEADERS, **answer.headers}, media_type=answer.content_type)


def _error(exc: HttpError, close: bool = False) -> Response:
    headers = {**exc.headers, **({"Connection": "close"} if close else {})}
    return _answer(Answer.of_json(exc.status, exc.body(), headers))


class BodyPending(HttpError):
    """An HttpError answered before the request's body was read: the connection is closed after it."""


async def read_body(request: Request) -> bytes:
    """The request body (Content-Length only, at most MAX_BODY_BYTES); HttpError 411/413/400 otherwise."""
    if request.headers.get("transfer-encoding"):
        raise BodyPending(411, "chunked bodies are not supported: send Content-Length")
    values = request.headers.getlist("content-length")
    if not values:
        if request.method == "POST":
            raise HttpError(411, "Content-Length is required")
        return b""
    if len(values) > 1 or not CONTENT_LENGTH_RE.fullmatch(values[0].strip(" \t")):
        raise BodyPending(400, f"Content-Length must be one number of bytes in ASCII digits, got {values!r:.60}")
    length = int(values[0].strip(" \t"))
    if length > MAX_BODY_BYTES:
        message = f"body is {length} bytes; at most {MAX_BODY_BYTES}"
        if length > DRAIN_BODY_BYTES:
            raise BodyPending(413, message)
        try:
            async for _ in request.stream():  # read and dropped, so the client sees the answer, not a reset
                pass
        except ClientDisconnect:
            raise BodyPending(413, message) from None
        raise HttpError(413, message)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
    except ClientDisconnect:  # the client stopped sending (and may be gone): answered, if anyone listens
        raise BodyPending(400, f"body ended after {len(body)} of {length} bytes") from None
    if len(body) != length:
        raise bad_request(f"body ended after {len(body)} of {length} bytes")
    return bytes(body)


async def no_body(request: Request) -> None:
    if await read_body(request):
        raise bad_request(f"{request.method} takes no body")


def webhook_headers(request: Request) -> dict[str, str]:
    return {name: value for name in WEBHOOK_HEADERS if (value := request.headers.get(name)) is not None}


def signed_target(request: Request) -> str:
    return request_target(request.scope)


def signed_post(parse: Callable[[str], Any], action: str, with_body: bool = False) -> Handler:
    """A signed POST route: read the body, verify the signature over it, parse it, then
    `IntakeApp.<action>(parsed, webhook-id)` in a worker thread (with the raw body too when *with_body*)."""

    async def handle(front: WebFront, request: Request, match: re.Match[str]) -> Response:
        body = await read_body(request)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("body is not UTF-8 text") from None
        msg_id = front.intake.verify(request.method, signed_target(request), text, webhook_headers(request))
        parsed = parse(text)
        method = getattr(front.intake, action)
        return _answer(await front.blocking(method, parsed, msg_id, *([body] if with_body else [])))

    return handle


async def task_status(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    await no_body(request)
    front.intake.verify(request.method, signed_target(request), "", webhook_headers(request))
    return _answer(await front.blocking(front.intake.task, parse_path_task_id(match.group(1))))


async def healthz(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    await no_body(request)
    return _answer(await front.blocking(front.intake.health))


async def metrics(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    await no_body(request)
    return _answer(await front.blocking(front.intake.metrics))


# -- live status: tokens, the event stream, the page ----------------------------------------------------------------


def query_value(request: Request, name: str) -> str | None:
    """The one value of query parameter *name* (None if absent; HttpError 401/400 if given twice)."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    values = [value for key, value in parse_qsl(query) if key == name]
    if len(values) > 1:
        raise HttpError(401 if name == "token" else 400, f"{name} given {len(values)} times")
    return values[0] if values else None


def check_token(front: WebFront, request: Request, task_id: int) -> None:
    """401 for a missing, malformed, expired or wrongly signed token, 403 for another task's; nothing opened."""
    secret = front.settings.status_token_secret
    if not secret:
        raise HttpError(503, "live status is not configured on this server (STATUS_TOKEN_SECRET)")
    try:
        verify_status_token(query_value(request, "token"), task_id, secret)
    except TokenError as exc:
        raise HttpError(exc.status, str(exc)) from None


def cors_headers(front: WebFront, request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    if origin is None or origin not in front.settings.cors_origins:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def sse_event(entry_id: str | None, data: Mapping[str, Any]) -> bytes:
    head = f"id: {entry_id}\n" if entry_id is not None else ""
    return f"{head}event: status\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


KEEPALIVE_COMMENT = b": keep-alive\n\n"


def last_event_id(request: Request) -> str | None:
    """The id a reconnecting client saw last (Last-Event-ID header, else ?lastEventId=); None when absent or not
    a stream entry id (a fresh snapshot follows)."""
    raw = request.headers.get("last-event-id") or query_value(request, "lastEventId")
    return raw.strip() if raw and LAST_EVENT_ID_RE.fullmatch(raw.strip()) else None


async def events(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    task_id = parse_path_task_id(match.group(1))
    cors = cors_headers(front, request)
    if request.method == "OPTIONS":  # a CORS preflight (a cross-origin EventSource that sends Last-Event-ID)
        preflight = {"Access-Control-Allow-Methods": "GET", "Access-Control-Allow-Headers": "Last-Event-ID"}
        return Response(status_code=204, headers={**cors, **preflight, "Access-Control-Max-Age": "600"})
    try:
        await no_body(request)
        check_token(front, request, task_id)
        plan = await front.plan_stream(task_id, last_event_id(request))
    except HttpError as exc:
        response = _error(exc)
        response.headers.update(cors)
        return response
    if plan is None:  # the client has seen the final event: 204 tells an EventSource to stop reconnecting
        return Response(status_code=204, headers={**EVENT_STREAM_HEADERS, **cors})
    return StreamingResponse(
        front.stream(task_id, plan), media_type="text/event-stream", headers={**EVENT_STREAM_HEADERS, **cors}
    )


def _static_file(name: str) -> bytes | None:
    try:
        return resources.files(__package__).joinpath("static", name).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


async def status_page(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    await no_body(request)
    check_token(front, request, parse_path_task_id(match.group(1)))
    page = _static_file(STATUS_PAGE)
    if page is None:
        raise HttpError(404, "status.html is not in this build")
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    return Response(page, 200, headers, media_type="text/html")


async def status_script(front: WebFront, request: Request, match: re.Match[str]) -> Response:
    await no_body(request)
    script = _static_file(STATUS_SCRIPT)
    if script is None:
        raise HttpError(404, "status.js is not in this build")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return Response(script, 200, headers, media_type="text/javascript")


ROUTES: tuple[WebRoute, ...] = (
    WebRoute(re.compile(r"/orders/confirm"), ("POST",), signed_post(parse_confirm_body, "confirm", with_body=True)),
    WebRoute(re.compile(r"/orders/cancel"), ("POST",), signed_post(parse_cancel_body, "cancel")),
    WebRoute(re.compile(r"/tasks/([^/]*)"), ("GET",), task_status),
    WebRoute(re.compile(r"/tasks/([^/]*)/events"), ("GET", "OPTIONS"), events),
    WebRoute(re.compile(r"/status/([^/]*)"), ("GET",), status_page),
    WebRoute(re.compile(r"/static/status\.js"), ("GET",), status_script),
    WebRoute(re.compile(r"/metrics"), ("GET",), metrics),
    WebRoute(re.compile(r"/healthz"), ("GET",), healthz),
)
"""Every route: a new one is one line here (and its IntakeApp method)."""


@dataclass(frozen=True)
class StreamPlan:
    """How an event stream starts: a snapshot (or none, on a resume), the entries after it, and the watch."""

    watcher: Watcher
    after: str
    snapshot: dict[str, Any] | None
    backlog: list[Entry]


class WebFront:
    """What the routes share in one process: the intake, the status-stream hub, the thread limits."""

    def __init__(self, settings: Settings, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.settings = settings
        self.keepalive = keepalive
        self.intake = IntakeApp(settings)
        self.hub: StreamHub | None = None
        self.reads: StreamReads | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._intake_threads = anyio.CapacityLimiter(INTAKE_THREADS)
        self._lookup_threads = anyio.CapacityLimiter(LOOKUP_THREADS)

    # -- lifecycle (the application's lifespan)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.hub = StreamHub(async_redis_connection(self.settings))
        self.hub.start()
        self.reads = StreamReads(async_redis_connection(self.settings))
        if threading.current_thread() is threading.main_thread():
            self._chain_stop_signals()

    def _chain_stop_signals(self) -> None:
        """Close the event streams as soon as a stop signal arrives, then let uvicorn's handler (installed before
        the application starts) begin its graceful shutdown: open streams would otherwise hold it up until
        DRAIN_TIMEOUT, and browsers reconnect on their own."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def on_signal(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
                self.begin_shutdown()
                previous(signum, frame)

            signal.signal(sig, on_signal)

    async def stop(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
        if self.reads is not None:
            await self.reads.close()
        await anyio.to_thread.run_sync(self.intake.close)

    def begin_shutdown(self) -> None:
        """From any thread: close every event stream now (clients reconnect elsewhere or after the restart)."""
        if self.loop is not None and self.hub is not None:
            self.loop.call_soon_threadsafe(self.hub.close_all)

    # -- requests

    async def blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(function, *args), limiter=self._intake_threads)

    async def dispatch(self, request: Request) -> Response:
        path, _ = _raw_target(request.scope)
        try:
            for route in ROUTES:
                found = route.pattern.fullmatch(path)
                if found is None:
                    continue
                if request.method not in route.methods:
                    allowed = route.methods[0]
                    raise HttpError(
                        405, f"method {request.method} not allowed on {path}; use {allowed}", None, {"Allow": allowed}
                    )
                return await route.handler(self, request, found)
            raise HttpError(404, f"no such route: {json.dumps(path)[:40]}")
        except BodyPending as exc:
            return _error(exc, close=True)
        except HttpError as exc:
            return _error(exc)
        except StoreError as exc:
            log.warning("%s %s: database unavailable: %s", request.method, _printable(path), exc)
            return _error(HttpError(503, "database unavailable; retry", None, {"Retry-After": "5"}))
        except RedisError as exc:
            log.warning("%s %s: redis unavailable: %s", request.method, _printable(path), type(exc).__name__)
            return _error(HttpError(503, "redis unavailable; retry", None, {"Retry-After": "5"}))
        except TransientError as exc:
            log.warning("%s %s: %s", request.method, _printable(path), exc)
            return _error(HttpError(503, "busy; retry", None, {"Retry-After": "1"}))
        except Exception:
            log.exception("%s %s: unexpected error", request.method, _printable(path))
            return _error(HttpError(500, "internal error"))

    # -- the event stream

    async def _row(self, task_id: int) -> TaskRow | None:
        def lookup() -> TaskRow | None:
            with self.intake.stores.borrow() as store:
                return store.get(task_id)

        return await anyio.to_thread.run_sync(lookup, limiter=self._lookup_threads)

    async def plan_stream(self, task_id: int, resume: str | None) -> StreamPlan | None:
        """Open the watch first, then read: an entry added meanwhile arrives twice at worst (and is dropped once),
        never not at all. None: a resume after the final event (nothing more will come)."""
        assert self.hub is not None and self.reads is not None
        key = status_stream.stream_key(task_id)
        if resume is not None and resume != "0-0":
            seen = await self.reads.entry(key, resume)
            if seen is None:
                resume = None  # trimmed, expired, or never ours: start again from a snapshot
            elif status_stream.is_final(status_stream.event_data(task_id, seen[1])):
                if await self._row(task_id) is None:
                    raise HttpError(404, "no such task", None)
                return None
        if resume is None:
            latest = await self.reads.latest(key)
            after = latest[0] if latest else "0-0"
        else:
            latest, after = None, resume
        watcher = self.hub.watch(key, after)
        try:
            row = await self._row(task_id)
            if row is None:
                raise HttpError(404, "no such task")
            backlog = await self.reads.after(key, after)
            snapshot = None
            if resume is None:
                snapshot = status_stream.snapshot_data(task_id, row, latest[1] if latest else None)
            elif status_stream.is_final(status_stream.snapshot_data(task_id, row, None)) and not any(
                status_stream.is_final(status_stream.event_data(task_id, fields)) for _, fields in backlog
            ):
                # settled, but its final entry is not in the stream (Redis refused it): say it from the row
                snapshot, backlog = status_stream.snapshot_data(task_id, row, None), []
        except BaseException:
            self.hub.unwatch(watcher)
            raise
        return StreamPlan(watcher, after, snapshot, backlog)

    async def _settled_without_event(self, task_id: int) -> dict[str, Any] | None:
        """The row's final snapshot when the task settled over SETTLED_GRACE seconds ago, yet its stream (still
        quiet) never said so: Redis refused the final entry. The record has the last word."""
        row = await self._row(task_id)
        if row is None or row.finished_at is None or utcnow() - row.finished_at < SETTLED_GRACE:
            return None
        snapshot = status_stream.snapshot_data(task_id, row, None)
        return snapshot if status_stream.is_final(snapshot) else None

    async def stream(self, task_id: int, plan: StreamPlan) -> AsyncIterator[bytes]:
        assert self.hub is not None
        last = id_key(plan.after)
        try:
            if plan.snapshot is not None:
                yield sse_event(plan.after, plan.snapshot)
                if status_stream.is_final(plan.snapshot):
                    return
            for entry_id, fields in plan.backlog:
                if id_key(entry_id) <= last:
                    continue
                last = id_key(entry_id)
                data = status_stream.event_data(task_id, fields)
                yield sse_event(entry_id, data)
                if status_stream.is_final(data):
                    return
            quiet = 0
            while True:
                try:
                    item = await asyncio.wait_for(plan.watcher.queue.get(), timeout=self.keepalive)
                except TimeoutError:
                    yield KEEPALIVE_COMMENT
                    quiet += 1
                    if quiet % ROW_CHECK_EVERY == 0:
                        settled = await self._settled_without_event(task_id)
                        if settled is not None:
                            yield sse_event(None, settled)
                            return
                    continue
                quiet = 0
                if item is None:
                    return  # stopping, or this client fell behind: it reconnects with its Last-Event-ID
                entry_id, fields = item
                if id_key(entry_id) <= last:
                    continue
                last = id_key(entry_id)
                data = status_stream.event_data(task_id, fields)
                yield sse_event(entry_id, data)
                if status_stream.is_final(data):
                    return
        finally:
            self.hub.unwatch(plan.watcher)


class _Dispatch:
    """The ASGI endpoint that hands every request to WebFront.dispatch."""

    def __init__(self, front: WebFront) -> None:
        self.front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.front.dispatch(Request(scope, receive))
        await response(scope, receive, send)


def create_app(settings: Settings, keepalive: float = KEEPALIVE_SECONDS) -> Starlette:
    """The ASGI application for *settings*. Raises ConfigError naming API_SECRET_KEY or DATABASE_URL when unset."""
    front = WebFront(settings, keepalive)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await front.start()
        try:
            yield
        finally:
            await front.stop()

    # One Starlette route takes every path and method (an ASGI endpoint, so Starlette does not limit it to GET):
    # ROUTES decides, so that odd methods and paths get our 404/405 with a reason.
    app = Starlette(routes=[Route("/{path:path}", _Dispatch(front), methods=None)], lifespan=lifespan)
    app.add_middleware(AccessLog)
    app.state.front = front
    return app


def app_from_environment() -> Starlette:
    """The application of one `serve --workers N` process: settings and logging from its environment."""
    setup_logging(os.environ.get("UDEMY_DL_LOG_LEVEL", "INFO"))
    return create_app(load_settings())


# -- the server ---------------------------------------------------------------------------------------------------


def serve_config(app: Any, host: str, port: int, workers: int = 1, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the web front: the limits, timeouts and shutdown come from here."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=workers,
        http=IntakeProtocol,
        lifespan="on",
        access_log=False,  # ours (AccessLog) never logs a token
        log_config=None,  # logging is set up by the command line
        server_header=False,
        limit_concurrency=options.pop("limit_concurrency", LIMIT_CONCURRENCY),
        timeout_keep_alive=HEAD_TIMEOUT,
        timeout_graceful_shutdown=DRAIN_TIMEOUT,
        backlog=options.pop("backlog", 2048),
        **options,
    )


class WebServer:
    """A bound web front, not yet serving: `start()` serves in a thread (tests), `run()` in the calling one."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.app = app
        self.config = serve_config(app, host, port)
        self.socket = _listening(self.config)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def front(self) -> WebFront:
        front: WebFront = self.app.state.front
        return front

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web front did not start")
            time.sleep(0.01)  # polling uvicorn's started flag: it offers no event to wait on

    def stop(self) -> None:
        self.front.begin_shutdown()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=DRAIN_TIMEOUT + 10)
        self.socket.close()


def make_server(settings: Settings, host: str, port: int, keepalive: float = KEEPALIVE_SECONDS) -> WebServer:
    """A bound web front, not yet serving. Raises ConfigError naming API_SECRET_KEY or DATABASE_URL when unset."""
    app = create_app(settings, keepalive)
    try:
        return WebServer(app, host, port)
    except BaseException:  # e.g. the port is taken: let go of the Redis client and the pool
        app.state.front.intake.close()
        raise


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    """Serve until SIGTERM or SIGINT; then finish the requests in progress (up to DRAIN_TIMEOUT s) and stop.
    With *workers* > 1, that many processes share the listening socket (uvicorn's supervisor)."""
    if workers > 1:
        create_app(settings).state.front.intake.close()  # check the settings here, before any process starts
        os.environ["UDEMY_DL_LOG_LEVEL"] = logging.getLevelName(log.getEffectiveLevel())
        config = serve_config("udemy_dl.web:app_from_environment", host, port, workers, factory=True)
        sock = _listening(config)
        _log_listening(sock, host, workers)
        with _stop_signals_logged():
            Multiprocess(config, sockets=[sock]).run()
        log.info("intake stopped")
        return
    server = make_server(settings, host, port)
    _log_listening(server.socket, host, 1)
    try:
        with _stop_signals_logged():
            server.run()
    finally:
        server.socket.close()
    log.info("intake stopped")


@contextmanager
def _stop_signals_logged() -> Iterator[None]:
    """SIGTERM and SIGINT logged, and nothing more, while uvicorn runs: uvicorn handles them itself and raises
    the signal again once it has stopped, which then lands here and `serve` returns (exit 0), not the default
    action of the signal."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("intake: %s received, stopping", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _listening(config: uvicorn.Config) -> socket.socket:
    """The bound socket, listening already: connections made from now on wait in its backlog for the server.
    Bound here, not by uvicorn's bind_socket (which exits the process): a taken port raises OSError, and
    `udemy-dl serve` exits 4 naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(config.backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)  # --workers: the processes uvicorn starts share it
    return sock


def _log_listening(sock: socket.socket, host: str, workers: int) -> None:
    bound_host, bound_port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("intake bound to %s: put it behind TLS (requests and answers are not encrypted)", host)
    log.info("intake (%d process%s) listening on http://%s:%s", workers, "es" * (workers > 1), bound_host, bound_port)
