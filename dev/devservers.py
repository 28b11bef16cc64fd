"""Local stand-ins for the demo and the tests: a content origin and a webhook receiver.

Both run in a thread on 127.0.0.1 and record what they see, so a test can prove what reached
them (and what did not). Not used by the service itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class RequestLog:
    """Thread-safe list of (method, path, headers) the server received."""

    entries: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.entries.append((method, path, headers))

    def paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _ in self.entries]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that refuse our certificate or hang up (tests do both on purpose)."""
        if isinstance(sys.exc_info()[1], ssl.SSLError | ConnectionError):
            return
        super().handle_error(request, client_address)


class _Background:
    """Runs an HTTP server in a daemon thread; use as a context manager or call start/stop.

    With *tls* (a server-side SSLContext) it speaks HTTPS; the TLS handshake of each connection
    happens in that connection's own thread, so a client that connects and goes away (or never
    starts TLS) holds up nobody else.
    """

    server: _Server

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = _Server((host, port), handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.tls = tls
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host_port(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host_port}"

    def start(self) -> _Background:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> _Background:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sample_file(path: Path, size: int, seed: str) -> str:
    """Write *size* deterministic bytes to *path* and return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = hashlib.sha256(seed.encode()).digest() * 32768  # 1 MiB pattern
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            chunk = block[: min(remaining, len(block))]
            out.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


class ContentOrigin(_Background):
    """Serves files from *root* and JSON manifests registered with add_course().

    Faults for tests: fail_next(path, n) answers 500 n times; see the attributes set in __init__
    for cut connections, ignored Range or If-Range, redirects, padding, throttling, chunked bodies,
    validators, unsatisfiable ranges, lying Content-Range headers and bodies longer than announced.
    With *tls* (a server-side SSLContext) it serves HTTPS.
    """

    def __init__(
        self,
        root: Path,
        token: str | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = root
        self.token = token
        self.manifests: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, int] = {}
        self.requests = RequestLog()
        self.lock = threading.Lock()
        self.ignore_range = False
        """When set, Range headers are ignored and every file is sent whole (200)."""
        self.throttle: float | None = None
        """Bytes per second per response, to make transfers slow enough to interrupt."""
        self.truncate: dict[str, int] = {}
        """path -> bytes after which the connection is cut (Content-Length still announces the whole)."""
        self.redirects: dict[str, str] = {}
        """path -> Location answered with a 302."""
        self.padding: dict[str, int] = {}
        """path -> extra bytes appended to the file's body (more than the manifest declares)."""
        self.chunked = False
        """When set, files are sent with `Transfer-Encoding: chunked` (no Content-Length); a `truncate`
        cut at or past the end then leaves out only the final empty chunk."""
        self.honour_if_range = True
        """When cleared, a Range request is answered 206 even if its If-Range names another version."""
        self.send_etag = True
        """Whether file responses carry an ETag (size and mtime)."""
        self.send_last_modified = False
        """Whether file responses carry Last-Modified (the file's mtime); If-Range may then name it."""
        self.unsatisfiable: dict[str, int] = {}
        """path -> how many of the next Range requests are answered 416 `bytes */<size>`, whatever they ask."""
        self.content_range: dict[str, Callable[[int, int], str]] = {}
        """path -> f(start, size) giving the Content-Range sent on a 206 in place of the true one
        (the body is still the true range)."""
        self.overrun: dict[str, int] = {}
        """path -> extra bytes written after the body, beyond what Content-Length announced."""
        self.filenames: dict[str, str] = {}
        """path -> file name sent as `Content-Disposition: attachment; filename*=UTF-8''<name>`."""
        self.bytes_sent: dict[str, int] = {}
        self.block_size = 256 * 1024
        """Bytes of a file written to the client at a time (and noted in `sends`)."""
        self.send_buffer: int | None = None
        """SO_SNDBUF of each new connection, in bytes: small, what the origin has sent is close to what the
        client has read (the kernel otherwise grows the buffer to megabytes)."""
        self.sends: list[tuple[float, int]] = []
        """(monotonic time, bytes) of each block of a file written to a client, in order."""
        self.transfers: list[tuple[float, str, int]] = []
        """(monotonic time, path, +1 or -1) as each file response starts and ends, in order."""
        self.mounts: dict[str, Path] = {}
        """URL prefix (`/files/<slug>/`) -> a folder served as it is (see add_folder)."""
        super().__init__(_OriginHandler, host=host, port=port, tls=tls)

    def count_sent(self, path: str, count: int) -> None:
        with self.lock:
            self.bytes_sent[path] = self.bytes_sent.get(path, 0) + count
            self.sends.append((time.monotonic(), count))

    def note_transfer(self, path: str, step: int) -> None:
        with self.lock:
            self.transfers.append((time.monotonic(), path, step))

    def add_course(self, slug: str, files: dict[str, int], with_checksums: bool = True) -> str:
        """Create a course of files (path -> size) and return its manifest URL."""
        entries = []
        for rel, size in files.items():
            sha = write_sample_file(self.root / "files" / slug / rel, size, f"{slug}/{rel}")
            entry: dict[str, Any] = {"path": rel, "url": f"/files/{slug}/{rel}"}
            if with_checksums:
                entry.update(size=size, sha256=sha)
            entries.append(entry)
        self.manifests[f"/courses/{slug}"] = {"title": slug.replace("-", " ").title(), "files": entries}
        return f"{self.base_url}/courses/{slug}"

    def add_folder(self, slug: str, folder: Path, title: str | None = None) -> str:
        """Serve the regular files under *folder* as a course (symlinks and hidden files left out), with a
        manifest listing each one's path, size and sha256; return the manifest URL."""
        folder = folder.resolve()
        entries = []
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_symlink() or not path.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            rel = relative.as_posix()
            entries.append(
                {
                    "path": rel,
                    "url": f"/files/{slug}/{quote(rel)}",
                    "size": path.stat().st_size,
                    "sha256": sha256_of(path),
                }
            )
        self.mounts[f"/files/{slug}/"] = folder
        self.manifests[f"/courses/{slug}"] = {"title": title or folder.name, "files": entries}
        return f"{self.base_url}/courses/{slug}"

    def set_manifest(self, path: str, manifest: dict[str, Any]) -> str:
        self.manifests[path] = manifest
        return f"{self.base_url}{path}"

    def fail_next(self, path: str, times: int) -> None:
        with self.lock:
            self.failures[path] = times

    def _take_failure(self, path: str) -> bool:
        return self._take(self.failures, path)

    def _take(self, counts: dict[str, int], path: str) -> bool:
        with self.lock:
            left = counts.get(path, 0)
            if left > 0:
                counts[path] = left - 1
                return True
            return False


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    @property
    def origin(self) -> ContentOrigin:
        return self.server.owner  # type: ignore[attr-defined,no-any-return]

    def setup(self) -> None:
        if self.origin.send_buffer:
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.origin.send_buffer)
        super().setup()

    def do_GET(self) -> None:
        origin = self.origin
        path = self.path.split("?", 1)[0]
        origin.requests.add("GET", path, dict(self.headers.items()))
        if origin.token and self.headers.get("Authorization") != f"Bearer {origin.token}":
            self._send(401, b"missing or wrong bearer token\n", "text/plain")
            return
        if origin._take_failure(path):
            self._send(500, b"injected failure\n", "text/plain")
            return
        if path in origin.redirects:
            self.send_response(302)
            self.send_header("Location", origin.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in origin.manifests:
            self._send(200, json.dumps(origin.manifests[path]).encode(), "application/json")
            return
        for prefix, folder in origin.mounts.items():
            if path.startswith(prefix):
                target = (folder / unquote(path[len(prefix) :])).resolve()
                if folder in target.parents and target.is_file():
                    self._send_counted(path, target)
                    return
        if path.startswith("/files/"):
            target = (origin.root / path.lstrip("/")).resolve()
            if origin.root.resolve() in target.parents and target.is_file():
                self._send_counted(path, target)
                return
        self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_counted(self, path: str, target: Path) -> None:
        """_send_file, noted in the origin's transfers as it starts and ends."""
        self.origin.note_transfer(path, 1)
        try:
            self._send_file(path, target)
        finally:
            self.origin.note_transfer(path, -1)

    def _send_file(self, path: str, target: Path) -> None:
        origin = self.origin
        stat = target.stat()
        padding = origin.padding.get(path, 0)
        size = stat.st_size + padding
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        last_modified = formatdate(stat.st_mtime, usegmt=True)
        validators = ([etag] if origin.send_etag else []) + ([last_modified] if origin.send_last_modified else [])
        start = 0
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        current = if_range is None or not origin.honour_if_range or if_range in validators
        if match and not origin.ignore_range and current:
            start = int(match.group(1))
            if start >= size or origin._take(origin.unsatisfiable, path):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            lie = origin.content_range.get(path)
            self.send_header("Content-Range", lie(start, size) if lie else f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if origin.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size - start))
        if origin.send_etag:
            self.send_header("ETag", etag)
        if origin.send_last_modified:
            self.send_header("Last-Modified", last_modified)
        if path in origin.filenames:
            self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(origin.filenames[path])}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = origin.truncate.get(path)
        position = start
        chunk_size = origin.block_size
        started = time.monotonic()
        sent = 0
        with open(target, "rb") as handle:
            handle.seek(min(start, stat.st_size))
            while position < size:
                if cut is not None and position >= cut:
                    self.close_connection = True
                    return
                want = chunk_size if cut is None else min(chunk_size, cut - position)
                chunk = handle.read(want) if position < stat.st_size else b""
                if not chunk:
                    chunk = b"\0" * min(want, size - position)
                try:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if origin.chunked else chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                finally:
                    origin.count_sent(path, len(chunk))
                position += len(chunk)
                sent += len(chunk)
                if origin.throttle and position < size:  # after the last block, the transfer is over
                    ahead = sent / origin.throttle - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the transfer rate, not synchronisation
        try:
            if origin.chunked:
                if cut is not None and position >= cut:
                    self.close_connection = True  # every byte sent, but not the final empty chunk
                    return
                self.wfile.write(b"0\r\n\r\n")
            elif origin.overrun.get(path):
                self.wfile.write(b"X" * origin.overrun[path])
        except (BrokenPipeError, ConnectionResetError):
            return


@dataclass(frozen=True)
class ReceivedWebhook:
    webhook_id: str
    event_type: str
    body: dict[str, Any]
    verified: bool


class WebhookReceiver(_Background):
    """Verifies Standard Webhooks signatures and records each delivery.

    `status_for` decides the HTTP answer per delivery (default: 204), so a test can make the
    receiver fail for a while.
    """

    def __init__(self, secret: str, port: int = 0) -> None:
        self.webhook = Webhook(secret)
        self.received: list[ReceivedWebhook] = []
        self.attempts = 0
        self.lock = threading.Lock()
        self.status_for: Callable[[int], int] = lambda attempt: 204
        super().__init__(_ReceiverHandler, port=port)

    @property
    def url(self) -> str:
        return f"{self.base_url}/webhooks/downloads"

    def accepted(self) -> list[ReceivedWebhook]:
        with self.lock:
            return [item for item in self.received if item.verified]

    def unique_ids(self) -> set[str]:
        return {item.webhook_id for item in self.accepted()}

    def outcomes(self) -> list[ReceivedWebhook]:
        """Verified final events: download.completed / .failed / .cancelled (not the live started/progress ones)."""
        final = ("download.completed", "download.failed", "download.cancelled")
        return [item for item in self.accepted() if item.event_type in final]

    def of_type(self, event_type: str) -> list[ReceivedWebhook]:
        return [item for item in self.accepted() if item.event_type == event_type]


class _ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        receiver: WebhookReceiver = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with receiver.lock:
            receiver.attempts += 1
            attempt = receiver.attempts
        status = receiver.status_for(attempt)
        if status >= 300:
            self._answer(status)
            return
        try:
            payload = receiver.webhook.verify(body, dict(self.headers.items()))
            verified = True
        except WebhookVerificationError:
            payload, verified = json.loads(body or b"{}"), False
        with receiver.lock:
            receiver.received.append(
                ReceivedWebhook(self.headers.get("webhook-id", ""), str(payload.get("type")), payload, verified)
            )
        self._answer(204 if verified else 401)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def env_for(origin: ContentOrigin, receiver: WebhookReceiver | None, secret: str) -> dict[str, str]:
    """Environment variables pointing a worker at these servers."""
    env = {"ALLOWED_HOSTS": origin.host_port, "API_SECRET_KEY": secret}
    if receiver is not None:
        env["WEBHOOK_URL"] = receiver.url
    if origin.token:
        env["CONTENT_TOKEN"] = origin.token
    return env


__all__ = ["ContentOrigin", "ReceivedWebhook", "WebhookReceiver", "env_for", "write_sample_file"]
