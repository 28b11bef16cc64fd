"""A Server-Sent Events client written from the format (docs/STATUS.md, the WHATWG event-stream rules), not from
the server's code; status tokens minted with plain hmac from the documented format."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

STATUS_SECRET = "status-secret-for-tests-0123456789abcdef"


def plain_status_token(task_id: int, expires: int | None = None, secret: str = STATUS_SECRET) -> str:
    """`v1.<taskId>.<expires>.<base64url, no padding, of HMAC-SHA256(secret, "v1.<taskId>.<expires>")>`."""
    expires = int(time.time()) + 300 if expires is None else expires
    message = f"v1.{task_id}.{expires}"
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return message + "." + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class Event:
    id: str | None
    event: str | None
    data: dict[str, Any]


@dataclass
class EventStream:
    """One open `GET /tasks/<id>/events` and what it has delivered so far (read by a thread of its own)."""

    status: int
    headers: dict[str, str]
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    closed: bool = False
    connection: http.client.HTTPConnection | None = None

    def statuses(self) -> list[str]:
        return [event.data["status"] for event in self.events]

    def close(self) -> None:
        """Hang up, as a browser leaving the page does (the reading thread still holds the socket: shut it down)."""
        if self.connection is not None:
            if self.connection.sock is not None:
                try:
                    self.connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connection.close()


def open_stream(port: int, target: str, headers: dict[str, str] | None = None, timeout: float = 30) -> EventStream:
    """Open the stream and read it in a daemon thread until the server closes it (or *timeout* passes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("GET", target, headers={"Accept": "text/event-stream", **(headers or {})})
    response = connection.getresponse()
    stream = EventStream(response.status, {k.lower(): v for k, v in response.getheaders()}, connection=connection)
    if response.status != 200:
        stream.events.append(Event(None, None, {"body": response.read().decode(errors="replace")}))
        stream.closed = True
        connection.close()
        return stream
    threading.Thread(target=_read, args=(stream, response), daemon=True).start()
    return stream


def _read(stream: EventStream, response: http.client.HTTPResponse) -> None:
    fields: dict[str, str] = {}
    data: list[str] = []
    try:
        while True:
            raw = response.readline()
            if not raw:
                break
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    stream.events.append(Event(fields.get("id"), fields.get("event"), json.loads("\n".join(data))))
                fields, data = {}, []
            elif line.startswith(":"):
                stream.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value
    except (OSError, http.client.HTTPException, AttributeError, ValueError):  # closed by the test meanwhile
        pass
    finally:
        stream.closed = True
