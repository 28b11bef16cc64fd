"""The service in this process, for the main suite: its settings and module state, RQ workers run
here or started as `udemy-dl worker`, and the objects a test drives it through (a store, Redis,
the origin and the receiver)."""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from dev.devservers import ContentOrigin, ReceivedWebhook, WebhookReceiver
from udemy_dl import context, producer
from udemy_dl.fetch import PARTS_DIRNAME
from udemy_dl.producer import Producer
from udemy_dl.queues import EnqueueResult, job_id_for, worker_queues
from udemy_dl.reconciler import Reconciler
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, FAILED, PENDING, PROCESSING, TaskRow, TaskStore, utcnow

from .processes import LoggedProcess, start_logged
from .scripts import cli_command
from .waiting import wait_for

EMAIL = "buyer@shop.example"


def reset_process_state() -> None:
    """Forget cached settings, the job context and the module-level producer."""
    producer.close()
    context.reset_context()


LOGGERS = ("udemy_dl", "rq.worker", "rq.job")
"""The loggers the command line and RQ's worker set up (each with a handler on the stderr of that moment)."""


@contextmanager
def logging_kept() -> Iterator[None]:
    """Put the loggers' handlers and levels back afterwards: a test that runs the command line or a worker
    in-process points them at its own captured stderr, which is closed when it ends, and a server thread
    still running would then log into a closed file."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def run_burst_worker(connection: Redis, settings: Settings) -> bool:
    """Run a real (forking) RQ worker in this process until its queues are empty.

    With the scheduler, so retries whose delay has passed are enqueued first. RQ installs its
    own SIGINT/SIGTERM handlers; pytest's are put back afterwards.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = Worker(
            worker_queues(settings, connection),
            connection=connection,
            name=f"test-inproc-{uuid.uuid4().hex[:8]}",
        )
        return bool(worker.work(burst=True, with_scheduler=True, logging_level="WARNING"))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def start_worker_process(folder: Path, burst: bool = False) -> LoggedProcess:
    """`udemy-dl worker` (real, forking) with this process's environment, its log in *folder*."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    command = [*cli_command(), "--log-level", "DEBUG", "worker", "--name", name]
    if burst:
        command.append("--burst")
    return start_logged(command, dict(os.environ), folder, folder / f"{name}.log", name)


@dataclass
class Backend:
    """One status store under test, with the DATABASE_URL that names it."""

    name: str
    url: str
    store: TaskStore


@dataclass
class Rig:
    """Settings, a store and Redis for one test: its tasks' rows and jobs, producers and reconcilers
    (one per simulated host)."""

    settings: Settings
    store: TaskStore
    redis: Redis

    def producer(self) -> Producer:
        return Producer(self.settings, connection=self.redis, store=self.store)

    def reconciler(self) -> Reconciler:
        return Reconciler(self.settings, self.producer())

    def task(self, status: str = PROCESSING, attempts: int = 0) -> int:
        """A task row in *status* that has used *attempts* attempts."""
        paid = status in (PROCESSING, COMPLETED, FAILED)
        task_id = self.store.insert_task(EMAIL, "https://cdn.example/courses/c", PROCESSING if paid else status)
        for _ in range(attempts):
            assert self.store.begin_attempt(task_id, 3)
        if status == COMPLETED:
            assert self.store.mark_completed(task_id, "/done", 1, utcnow())
        elif status == FAILED:
            assert self.store.mark_failed(task_id, "earlier failure", None, utcnow())
        return task_id

    def row(self, task_id: int) -> TaskRow:
        row = self.store.get(task_id)
        assert row is not None
        return row

    def payload(self, task_id: int) -> dict[str, Any]:
        row = self.row(task_id)
        return {"taskId": row.id, "email": row.email, "courseUrl": row.course_url}

    def enqueue(self, task_id: int) -> Job:
        return self.producer().add_download_job(self.payload(task_id)).job

    def job(self, task_id: int) -> Job:
        return Job.fetch(job_id_for(task_id), connection=self.redis)

    @property
    def queue(self) -> Queue:
        return Queue(self.settings.queue_name, connection=self.redis)

    def queued(self) -> list[str]:
        return list(self.queue.job_ids)

    def run_jobs(self) -> None:
        """Run a forking RQ worker in this process until the download and webhook queues are empty."""
        run_burst_worker(self.redis, self.settings)


@dataclass
class Service(Rig):
    """Everything one download needs, wired to this test's servers and databases."""

    origin: ContentOrigin
    receiver: WebhookReceiver
    configure: Callable[..., Settings]

    def reconfigure(self, **variables: str) -> None:
        """Change settings for this test (the job code sees them from its next run)."""
        self.settings = self.configure(**variables)

    def paid_task(self, course_url: str, email: str = EMAIL) -> int:
        """A task row the payment service has confirmed (status processing), not yet enqueued."""
        return self.store.insert_task(email, course_url, PROCESSING)

    def confirm(self, course_url: str) -> int:
        """Insert an unpaid task and confirm its payment (row -> processing, job enqueued)."""
        task_id = self.store.insert_task(EMAIL, course_url, PENDING)
        result = self.producer().confirm_payment([task_id])
        assert result.enqueued == [task_id], result
        return task_id

    def webhooks(self) -> list[ReceivedWebhook]:
        """The outcome events (completed/failed); live started/progress events have tests of their own."""
        return self.receiver.outcomes()

    def partial_bytes(self, task_id: int) -> int:
        """Bytes kept in the task's staging folder for files not finished yet."""
        parts = self.settings.staging_dir / str(task_id) / PARTS_DIRNAME
        return sum(p.stat().st_size for p in parts.glob("*.part")) if parts.is_dir() else 0

    def file_requests(self, path: str) -> list[dict[str, str]]:
        """Headers (lower-cased names) of each GET of *path* the origin saw."""
        return [
            {name.lower(): value for name, value in headers.items()}
            for _, seen, headers in self.origin.requests.entries
            if seen == path
        ]


def make_service(
    configure: Callable[..., Settings],
    redis: Redis,
    origin: ContentOrigin,
    receiver: WebhookReceiver,
    secret: str,
    backend: Backend,
    **variables: str,
) -> Service:
    """The service on *backend*, wired to *origin* and *receiver* (and any other *variables* set)."""
    settings = configure(
        DATABASE_URL=backend.url,
        ALLOWED_HOSTS=origin.host_port,
        API_SECRET_KEY=secret,
        WEBHOOK_URL=receiver.url,
        **variables,
    )
    return Service(settings, backend.store, redis, origin, receiver, configure)


@dataclass
class BusyWorker:
    """A real worker (`udemy-dl worker`) busy downloading a paid task: the origin sends the course's 2 MB
    file at 50 kB/s, so the job stays started long enough to kill the worker."""

    rig: Rig
    task_id: int
    worker: LoggedProcess

    @classmethod
    def start(cls, rig: Rig, origin: ContentOrigin, start_worker: Callable[[], LoggedProcess]) -> BusyWorker:
        origin.throttle = 50_000  # bytes/s
        task_id = rig.store.insert_task(EMAIL, origin.add_course("slow", {"a.bin": 2_000_000}), PROCESSING)
        job = rig.enqueue(task_id)
        worker = start_worker()
        wait_for(lambda: job.get_status(refresh=True) == JobStatus.STARTED, timeout=20, what=worker.log)
        return cls(rig, task_id, worker)

    def add_job(self) -> EnqueueResult:
        """Ask for the task's download job again."""
        return self.rig.producer().add_download_job(self.rig.payload(self.task_id))
