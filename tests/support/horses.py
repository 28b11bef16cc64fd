"""Work horses seen from outside: which process ran each attempt at a task (the job's log lines name
their process), the horse a worker keeps between downloads, a worker with its paid one-file courses,
and a webhook receiver that never finishes its answer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from rq import Queue, Retry
from rq.job import Job
from rq.timeouts import HorseMonitorTimeoutException

from udemy_dl import defaults
from udemy_dl.download_worker import HORSE_READY
from udemy_dl.queues import job_id_for, webhook_queue
from udemy_dl.store import COMPLETED
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED

from .http_servers import completed_ids
from .processes import LoggedProcess, pid_running, work_horses
from .relay import accepted
from .rq_state import live_workers
from .service import Service
from .waiting import wait_for

if TYPE_CHECKING:
    from _typeshed import TraceFunction

TASK_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+ \[(\d+)\]: task (\d+): (.*)$", re.MULTILINE
)
"""A job-side log line about a task: time, process id, task id, message."""

ATTEMPT_BEGUN = re.compile(r"attempt \d+ of \d+: ")
"""The message with which a run begins an attempt."""

DELIVERED_LINE = re.compile(r"\[(\d+)\]: (?:task \d+: )?webhook (\S+) delivered \(HTTP", re.MULTILINE)
"""The log line of a webhook delivery that reached its receiver: process id, webhook id."""

HORSE_ENDED = "work horse finished for job {job_id}:"
"""What RQ's worker logs (at DEBUG) once the horse has ended a job: reported ready, or died."""

WEBHOOK_ID_HEADER = re.compile(rb"^webhook-id: *(\S+)\r$", re.MULTILINE | re.IGNORECASE)


def attempt_pids(log_text: str, task_id: int) -> list[int]:
    """The process that ran each attempt at *task_id* (`task N: attempt A of M: <url>`), in order."""
    return [
        int(pid)
        for _, pid, task, message in TASK_LOG_LINE.findall(log_text)
        if int(task) == task_id and ATTEMPT_BEGUN.match(message)
    ]


def delivery_pids(log_text: str) -> dict[str, int]:
    """webhook id -> the process that delivered it."""
    return {webhook_id: int(pid) for pid, webhook_id in DELIVERED_LINE.findall(log_text)}


@dataclass
class HorseWorld:
    """A real `udemy-dl worker` (one at a time) on this test's service, and paid one-file courses for it."""

    svc: Service
    start_worker: Callable[[], LoggedProcess]
    workers: list[LoggedProcess] = field(default_factory=list)

    def start(self) -> LoggedProcess:
        """Start a worker and wait until it has registered."""
        worker = self.start_worker()
        self.workers.append(worker)
        wait_for(
            lambda: worker.name in live_workers(self.svc.redis), timeout=30, interval=0.05, what=lambda: worker.log()
        )
        return worker

    def log(self) -> str:
        """Every worker's log so far (horses write to their worker's)."""
        return "\n".join(worker.log() for worker in self.workers)

    def courses(self, count: int, size: int = 1024, prefix: str = "course") -> list[int]:
        """*count* paid tasks (rows `processing`), each a course of one file of *size* bytes; not enqueued."""
        return [
            self.svc.paid_task(self.svc.origin.add_course(f"{prefix}-{n}", {"lecture.mp4": size}))
            for n in range(1, count + 1)
        ]

    def run(self, task_ids: Sequence[int], timeout: float = 60) -> None:
        """Enqueue *task_ids* and wait until each is completed."""
        for task_id in task_ids:
            self.svc.enqueue(task_id)
        self.wait_completed(task_ids, timeout)

    def wait_completed(self, task_ids: Sequence[int], timeout: float = 60) -> None:
        """Until each task is `completed` and its horse has ended each attempt's job (RQ's bookkeeping
        runs on after the row is written; the worker logs the end of each)."""

        def done() -> bool:
            rows = [self.svc.row(task_id) for task_id in task_ids]
            log = self.log()
            return all(
                row.status == COMPLETED and log.count(HORSE_ENDED.format(job_id=job_id_for(row.id))) >= row.attempts
                for row in rows
            )

        wait_for(
            done,
            timeout=timeout,
            interval=0.05,
            what=lambda: f"tasks {list(task_ids)} completed: {[self.svc.row(t) for t in task_ids]}\n{self.log()}",
        )

    def file_requests(self, task_id: int) -> list[dict[str, str]]:
        """Headers of each GET of the task's one file."""
        row = self.svc.row(task_id)
        slug = row.course_url.rsplit("/", 1)[1]
        return self.svc.file_requests(f"/files/{slug}/lecture.mp4")

    def assert_completed_once(self, task_ids: Sequence[int], attempts: int = 1, refused: int = 0) -> None:
        """Each task `completed` after *attempts* attempts, its file fetched in full once (any request
        after the first that the origin answered resumes with a Range; the first *refused* it failed),
        and one download.completed webhook id each."""
        for task_id in task_ids:
            row = self.svc.row(task_id)
            assert row.status == COMPLETED and row.attempts == attempts, row
            requests = self.file_requests(task_id)[refused:]
            assert requests and all("range" in headers for headers in requests[1:]), (task_id, requests)
        wait_for(
            lambda: all(task_id in completed_ids(self.svc.receiver) for task_id in task_ids),
            timeout=30,
            interval=0.05,
            what=lambda: f"a {EVENT_COMPLETED} event for each of {list(task_ids)}\n{self.log()}",
        )
        ids = completed_ids(self.svc.receiver)
        assert all(len(ids[task_id]) == 1 for task_id in task_ids), ids

    def assert_retried_in_a_fresh_horse(
        self, worker: LoggedProcess, kept: int, retried: int, after: int, refused: int = 0
    ) -> None:
        """Task *retried*, whose first attempt ran in horse *kept* and failed (or died), completed at its
        second attempt in a fresh horse (its file fetched in full once, after *refused* failed requests);
        *after*, run now, completes in that fresh horse too, and *worker* lives on."""
        self.run([after])
        self.assert_completed_once([after])
        self.assert_completed_once([retried], attempts=2, refused=refused)
        log = self.log()
        first, second = attempt_pids(log, retried)
        assert first == kept and second not in (kept, worker.pid), log
        assert attempt_pids(log, after) == [second], log
        assert worker.process.poll() is None, log

    def stop_warmly(self, worker: LoggedProcess, horse: int) -> None:
        """SIGTERM to *worker*: it exits cleanly (0) within a generous deadline, and its *horse* is gone too."""
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker.log()
        assert not pid_running(horse), f"the kept horse {horse} outlived its worker\n{worker.log()}"

    def horse(self, worker: LoggedProcess) -> int:
        """The one work horse *worker* has now (kept between downloads)."""
        found = wait_for(
            lambda: work_horses(worker.pid), timeout=10, interval=0.05, what=lambda: f"a horse\n{worker.log()}"
        )
        assert len(found) == 1, found
        return found[0]

    def enqueue_delivery(self, msg_id: str, job_timeout: int, retry_after: int = 1) -> Job:
        """A webhook delivery of an empty event, as webhooks.enqueue_webhook queues one, but with its own
        (short) job timeout and one retry."""
        queue: Queue = webhook_queue(self.svc.settings, self.svc.redis)
        return queue.enqueue(
            defaults.DELIVER_JOB_FUNCTION,
            msg_id,
            "{}",
            job_id=f"webhook-{msg_id}",
            retry=Retry(max=1, interval=[retry_after]),
            job_timeout=job_timeout,
        )


class TricklingReceiver:
    """A webhook receiver that answers the first delivery of each webhook id in *hang* one byte every
    0.2 s, never finished (a receiver that hangs while keeping the connection busy, so no read timeout
    of the client ends it); any other delivery gets a 204 at once. Notes the webhook id of each hung
    delivery whose client closed the connection."""

    def __init__(self, hang: set[str]) -> None:
        self.hang = set(hang)
        self.closed_by_client: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="trickling-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}/webhooks/downloads"

    def start(self) -> TricklingReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        for connection in accepted(self._listener, lambda: not self._stop.is_set()):
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                request += chunk
            found = WEBHOOK_ID_HEADER.search(request)
            webhook_id = found.group(1).decode() if found else ""
            with self.lock:
                hung = webhook_id in self.hang
                self.hang.discard(webhook_id)
            if not hung:
                connection.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            for byte in b"HTTP/1.1 200 OK\r\nX-Never-Ending: " + b"." * 100_000:
                if self._stop.wait(0.2):  # the pace of the trickle
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    with self.lock:
                        self.closed_by_client.append(webhook_id)
                    return


# -- a kept horse's report, and the worker's wait for it interrupted ----------------------------------


def standing_horse() -> tuple[int, int, int]:
    """Fork a stand-in for a kept horse that has ended its job: it reports HORSE_READY on its pipe, then
    waits for its next order until its worker lets it go (end of file). Returns (pid, the worker's end
    of the orders pipe, the worker's end of the ready pipe), as DownloadWorker keeps them."""
    orders_in, orders_out = os.pipe()
    ready_in, ready_out = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stand-in: nothing of the test runs here
        try:
            os.close(orders_out)
            os.close(ready_in)
            os.write(ready_out, HORSE_READY)
            while os.read(orders_in, 64):
                pass
        finally:
            os._exit(0)
    os.close(orders_in)
    os.close(ready_out)
    return pid, orders_out, ready_in


def interrupted_at_line(code: CodeType, position: int, call: Callable[[], object]) -> bool:
    """Run *call*, raising HorseMonitorTimeoutException (what RQ's monitor raises from its SIGALRM handler
    to heartbeat) in the frame of *code* as it reaches its *position*-th line. True if it did; False
    if *call* returned before reaching it."""
    seen = 0

    def in_frame(frame: FrameType, event: str, arg: Any) -> TraceFunction:
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == position:
                raise HorseMonitorTimeoutException(f"interrupted at line {frame.f_lineno} of the frame")
        return in_frame

    def tracer(frame: FrameType, event: str, arg: Any) -> TraceFunction | None:
        return in_frame if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        call()
    except HorseMonitorTimeoutException:
        return True
    finally:
        sys.settrace(None)
    return False


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail with *what* if the block blocks for longer than *seconds* (SIGALRM; main thread only)."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise AssertionError(f"still blocked after {seconds:g}s: {what}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
