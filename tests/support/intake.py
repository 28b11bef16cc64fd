"""The intake (`udemy-dl serve`) in a thread of the test process, and a client that signs as the
payment service does (written from docs/INTAKE.md, not from the server's code); raw requests on the
wire; what a confirmation could change; the intake's log."""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from redis import Redis
from rq import Queue

from udemy_dl.settings import Settings
from udemy_dl.store import PENDING, TaskStore
from udemy_dl.web import WebServer, make_server
from udemy_dl.webhooks import sign_headers

EMAIL = "buyer@shop.example"
CONFIRM = "/orders/confirm"
CANCEL = "/orders/cancel"
COURSE = "https://cdn.example/courses/1"

NOT_PLAIN_DIGITS = ["+1", "%2B1", "1_000", "0x1", "01", "1" * 4301]
"""Task ids that Python's int() would take, which are not a plain run of ASCII digits."""

_ids = iter(range(1, 1_000_000))


def new_msg_id() -> str:
    return f"msg_test_{next(_ids)}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def error(self) -> str:
        return str(self.json()["error"])


@dataclass
class Intake:
    """A running intake server and a client that signs like the payment service would."""

    server: WebServer
    settings: Settings
    secret: str

    @property
    def port(self) -> int:
        return self.server.port

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body or None, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def signed(
        self, method: str, target: str, body: str = "", msg_id: str | None = None, at: datetime | None = None
    ) -> dict[str, str]:
        return signed_request(self.secret, method, target, body, msg_id=msg_id, at=at)

    def confirm(self, payload: object, **sign: Any) -> Reply:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        return self.request("POST", CONFIRM, body.encode(), self.signed("POST", CONFIRM, body, **sign))

    def cancel(self, payload: object, **sign: Any) -> Reply:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        return self.request("POST", CANCEL, body.encode(), self.signed("POST", CANCEL, body, **sign))

    def task(self, task_id: int | str, signed: bool = True) -> Reply:
        target = f"/tasks/{task_id}"
        return self.request("GET", target, headers=self.signed("GET", target) if signed else {})


def signed_request(
    secret: str, method: str, target: str, body: str = "", msg_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for one intake request, written from docs/INTAKE.md and not from the server's
    code: the signed content is `<METHOD> <request-target>\\n<body>`."""
    return sign_headers(secret, msg_id or new_msg_id(), f"{method} {target}\n{body}", now=at)


def start_intake(settings: Settings, secret: str, **options: Any) -> Iterator[Intake]:
    """The web front (`udemy-dl serve`) on a free port, uvicorn in a thread of the test process."""
    server = make_server(settings, "127.0.0.1", 0, **options)
    server.start()
    try:
        yield Intake(server, settings, secret)
    finally:
        server.stop()


def pending_tasks(store: TaskStore, count: int) -> list[int]:
    return [store.insert_task(EMAIL, COURSE, PENDING) for _ in range(count)]


def queued(redis_conn: Redis, queue: str = "downloads") -> list[str]:
    return list(Queue(queue, connection=redis_conn).job_ids)


def snapshot(redis_conn: Redis, store: TaskStore, ids: list[int], replay_keys: bool = True) -> tuple[Any, ...]:
    """Everything a confirmation could change: the rows, and every Redis key with its type.

    *replay_keys* False leaves out the intake's own webhook-id records (a new one per accepted request).
    """
    rows = [(r.id, r.status, r.priority, r.attempts, r.progress, r.updated_at) for r in store.get_many(ids)]
    names = cast(list[bytes], redis_conn.keys("*"))
    keys = sorted(
        (key.decode(), cast(bytes, redis_conn.type(key)).decode())
        for key in names
        if replay_keys or not key.startswith(b"udemy_dl:intake:msg:")
    )
    return rows, keys, queued(redis_conn), queued(redis_conn, "downloads-high")


class LogRecords(logging.Handler):
    """Every record the intake logs while a test runs (whatever other tests did to propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        """Records at ERROR or above, or that carry an exception: what a request must never cause."""
        return [
            f"{record.levelname} {record.getMessage()} {record.exc_info!r}"
            for record in self.records
            if record.levelno >= logging.ERROR or record.exc_info or "Traceback" in record.getMessage()
        ]


def capture_intake_log() -> Iterator[LogRecords]:
    handler = LogRecords()
    logger = logging.getLogger("udemy_dl")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> Reply | None:
    """Send *data* as is on a new connection, end the sending side, and read the first answer (None if the server
    closed without one, e.g. with a reset after refusing a body it did not read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # a broken pipe, a reset: refused before the whole body was read, the answer is there
            pass
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            raw = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, raw)


def wire(line: str) -> bytes:
    """A request or header line as a client would put it on the wire: ISO-8859-1 (what HTTP parsers decode) where
    it can be, else UTF-8 (whose bytes the server then reads as ISO-8859-1)."""
    try:
        return line.encode("iso-8859-1")
    except UnicodeEncodeError:
        return line.encode("utf-8")


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: intake", *(f"{name}: {value}" for name, value in headers)]
    return b"".join(wire(line) + b"\r\n" for line in lines) + b"\r\n" + body
