"""The local HTTP servers a test runs (the dev content origin and webhook receiver), courses and paid
tasks on that origin, and what the receiver got."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dev.devservers import ContentOrigin, ReceivedWebhook, RequestLog, WebhookReceiver
from udemy_dl.store import TaskStore
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED

S = TypeVar("S", bound=ContentOrigin | WebhookReceiver)


def start_server(server: S) -> S:
    """Start a devservers server that checks for shutdown every 50 ms (the default 0.5 s slows each teardown)."""
    server.thread = threading.Thread(
        target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, name=type(server).__name__, daemon=True
    )
    server.start()
    return server


@contextlib.contextmanager
def serving(server: S) -> Iterator[S]:
    """*server* started (see start_server) for the block, then stopped (an origin unthrottled first)."""
    start_server(server)
    try:
        yield server
    finally:
        if isinstance(server, ContentOrigin):
            server.throttle = None
        server.stop()


@dataclass
class TimedRequestLog(RequestLog):
    """The origin's request log, plus the monotonic time of each request."""

    times: list[float] = field(default_factory=list)

    def add(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.entries.append((method, path, headers))
            self.times.append(time.monotonic())

    def for_path(self, path: str) -> list[tuple[float, dict[str, str]]]:
        """(time, headers) of every request for *path*, in order."""
        with self.lock:
            return [
                (at, headers) for at, (_, seen, headers) in zip(self.times, self.entries, strict=True) if seen == path
            ]


class Origin(ContentOrigin):
    """The dev content origin with time-stamped requests, and the lookups the tests use."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        super().__init__(root, token=token)
        self.timed = TimedRequestLog()
        self.requests = self.timed

    def file_path(self, url_path: str) -> Path:
        """The file on disk behind a /files/... URL path."""
        return self.root / url_path.lstrip("/")

    def count(self, url_path: str) -> int:
        """How many requests *url_path* got."""
        return sum(1 for path in self.requests.paths() if path == url_path)


@dataclass(frozen=True)
class CourseFile:
    rel: str
    url_path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Task:
    """One paid order of a scenario: its row id and the files its course holds."""

    id: int
    course_url: str
    files: tuple[CourseFile, ...]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.files)


def make_tasks(
    origin: ContentOrigin,
    store: TaskStore,
    count: int,
    size: int,
    prefix: str = "course",
    names: Sequence[str] = ("lecture.mp4",),
    email: str = "buyer-{slug}@example.com",
    base_url: str | None = None,
) -> list[Task]:
    """*count* courses on *origin* holding a file of *size* bytes under each of *names*, and a `pending`
    row for each (*email* formatted with the course's `slug` and number `n`); the course URLs name
    the origin as *base_url* (default: its own address)."""
    tasks = []
    for n in range(1, count + 1):
        slug = f"{prefix}-{n}"
        url = origin.add_course(slug, dict.fromkeys(names, size))
        if base_url is not None:
            url = f"{base_url}/courses/{slug}"
        files = tuple(
            CourseFile(entry["path"], entry["url"], entry["sha256"], entry["size"])
            for entry in origin.manifests[f"/courses/{slug}"]["files"]
        )
        tasks.append(Task(store.insert_task(email.format(slug=slug, n=n), url), url, files))
    return tasks


def event_ids(accepted: Iterable[ReceivedWebhook], event_type: str) -> dict[int, set[str]]:
    """taskId -> the distinct webhook ids of the verified events of *event_type* among *accepted*."""
    found: dict[int, set[str]] = {}
    for item in accepted:
        if item.event_type == event_type:
            found.setdefault(int(item.body["data"]["taskId"]), set()).add(item.webhook_id)
    return found


def completed_ids(receiver: WebhookReceiver) -> dict[int, set[str]]:
    """taskId -> the distinct webhook ids of the verified download.completed events *receiver* accepted."""
    return event_ids(receiver.accepted(), EVENT_COMPLETED)
