"""The web front (`udemy-dl serve`): one Starlette application on uvicorn (docs/INTAKE.md, docs/STATUS.md).

    POST /orders/confirm            signed (intake.IntakeApp.confirm)
    POST /orders/cancel             signed (IntakeApp.cancel)
    GET  /tasks/<id>                signed (IntakeApp.task)
    GET  /metrics, /healthz         no signature
    GET  /tasks/<id>/events?token=  Server-Sent Events: the task's live status (status token)
    GET  /status/<id>?token=        the status page; GET /static/status.js its script

This module is the HTTP adapter only. What a route does lives in intake.IntakeApp (framework-free: verification,
parsing, the answers), so a new route is one line of ROUTES. IntakeApp's methods block (Redis, the database):
they run in worker threads, never on the event loop. The event stream's bytes come from event_feed; the server
under all this (uvicorn's settings, its h11 protocol, the access log, the socket) is http_server's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

from .connection import async_redis_connection
from .errors import StoreError, TransientError
from .event_feed import KEEPALIVE_SECONDS, EventFeed
from .http_server import (
    DRAIN_TIMEOUT,
    SECURITY_HEADERS,
    AccessLog,
    listening_socket,
    log_listening,
    printable,
    raw_target,
    request_target,
    serve_config,
    stop_signals_logged,
)
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
from .store import TaskRow
from .stream_hub import StreamHub, StreamReads
from .tokens import TokenError, verify_status_token

log = logging.getLogger(__name__)

T = TypeVar("T")

INTAKE_THREADS = 16
"""Worker threads for the intake's blocking calls (Redis, the database), per process."""

LOOKUP_THREADS = 4
"""Worker threads for the event streams' task lookups (snapshots), per process: their own, so a burst of
reconnecting browsers never starves the intake."""

EVENT_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LAST_EVENT_ID_RE = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
STATUS_PAGE = "status.html"
STATUS_SCRIPT = "status.js"


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
        assert front.feed is not None  # started with the application
        plan = await front.feed.plan(task_id, last_event_id(request))
    except HttpError as exc:
        response = _error(exc)
        response.headers.update(cors)
        return response
    if plan is None:  # the client has seen the final event: 204 tells an EventSource to stop reconnecting
        return Response(status_code=204, headers={**EVENT_STREAM_HEADERS, **cors})
    return StreamingResponse(
        front.feed.stream(task_id, plan), media_type="text/event-stream", headers={**EVENT_STREAM_HEADERS, **cors}
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


class WebFront:
    """What the routes share in one process: the intake, the event feed, the thread limits."""

    def __init__(self, settings: Settings, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.settings = settings
        self.keepalive = keepalive
        self.intake = IntakeApp(settings)
        self.feed: EventFeed | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._intake_threads = anyio.CapacityLimiter(INTAKE_THREADS)
        self._lookup_threads = anyio.CapacityLimiter(LOOKUP_THREADS)

    # -- lifecycle (the application's lifespan)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        hub = StreamHub(async_redis_connection(self.settings))
        hub.start()
        reads = StreamReads(async_redis_connection(self.settings))
        self.feed = EventFeed(hub, reads, self._row, self.keepalive)
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
        if self.feed is not None:
            await self.feed.close()
        await anyio.to_thread.run_sync(self.intake.close)

    def begin_shutdown(self) -> None:
        """From any thread: close every event stream now (clients reconnect elsewhere or after the restart)."""
        if self.loop is not None and self.feed is not None:
            self.loop.call_soon_threadsafe(self.feed.close_all)

    # -- requests

    async def blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(function, *args), limiter=self._intake_threads)

    async def dispatch(self, request: Request) -> Response:
        path, _ = raw_target(request.scope)
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
            log.warning("%s %s: database unavailable: %s", request.method, printable(path), exc)
            return _error(HttpError(503, "database unavailable; retry", None, {"Retry-After": "5"}))
        except RedisError as exc:
            log.warning("%s %s: redis unavailable: %s", request.method, printable(path), type(exc).__name__)
            return _error(HttpError(503, "redis unavailable; retry", None, {"Retry-After": "5"}))
        except TransientError as exc:
            log.warning("%s %s: %s", request.method, printable(path), exc)
            return _error(HttpError(503, "busy; retry", None, {"Retry-After": "1"}))
        except Exception:
            log.exception("%s %s: unexpected error", request.method, printable(path))
            return _error(HttpError(500, "internal error"))

    async def _row(self, task_id: int) -> TaskRow | None:
        def lookup() -> TaskRow | None:
            with self.intake.stores.borrow() as store:
                return store.get(task_id)

        return await anyio.to_thread.run_sync(lookup, limiter=self._lookup_threads)


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


class WebServer:
    """A bound web front, not yet serving: `start()` serves in a thread (tests), `run()` in the calling one."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.app = app
        self.config = serve_config(app, host, port)
        self.socket = listening_socket(self.config)
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
        sock = listening_socket(config)
        log_listening(sock, host, workers)
        with stop_signals_logged():
            Multiprocess(config, sockets=[sock]).run()
        log.info("intake stopped")
        return
    server = make_server(settings, host, port)
    log_listening(server.socket, host, 1)
    try:
        with stop_signals_logged():
            server.run()
    finally:
        server.socket.close()
    log.info("intake stopped")
