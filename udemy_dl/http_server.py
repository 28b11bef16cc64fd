"""The HTTP server under the web front: uvicorn's settings, its h11 protocol with JSON 400s and a
request-head timeout, the access log, and the listening socket.

Connection limits, slow-client timeouts and graceful shutdown are uvicorn's (`serve_config`); the one addition
is IntakeProtocol: h11's own 400s answered as JSON, a request head with ambiguous Content-Length framing refused,
the raw request-target kept for signatures, and the keep-alive timeout armed from the first byte, so a client
that never finishes its request head is cut off after HEAD_TIMEOUT seconds.

The access log names method, path, status and time; the query string is logged with `token=` redacted, and no
header is ever logged (signatures and tokens stay out of logs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any
from urllib.parse import unquote_plus

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .intake import Answer, bad_request

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 15
"""Seconds a connection may take to send its request head, and may stay idle between keep-alive requests."""

DRAIN_TIMEOUT = 10
"""Seconds `serve` waits on shutdown for requests in progress (uvicorn's timeout_graceful_shutdown)."""

LIMIT_CONCURRENCY = 4096
"""Open connections and tasks one serve process takes before answering 503 (uvicorn's limit_concurrency);
each open event stream is one. Keep the process's open-file limit (ulimit -n) above it."""

QUIET_PATHS = frozenset({"/metrics", "/healthz"})
"""Logged at DEBUG when they answer 200: monitoring polls them."""

SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
"""On every answer but the event stream's."""


# -- logging ---------------------------------------------------------------------------------------------------


def printable(text: str, limit: int = 200) -> str:
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


def raw_target(scope: Scope) -> tuple[str, str]:
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

        path, query = raw_target(scope)
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
                printable(scope.get("method", "-")),
                printable(logged_target(path, query)),
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


@contextmanager
def stop_signals_logged() -> Iterator[None]:
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


def listening_socket(config: uvicorn.Config) -> socket.socket:
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


def log_listening(sock: socket.socket, host: str, workers: int) -> None:
    bound_host, bound_port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("intake bound to %s: put it behind TLS (requests and answers are not encrypted)", host)
    log.info("intake (%d process%s) listening on http://%s:%s", workers, "es" * (workers > 1), bound_host, bound_port)
