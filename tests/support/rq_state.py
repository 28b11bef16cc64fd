"""What RQ holds in Redis about the service's work: live workers, a task's download job, the queues."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import now

from .processes import pid_running


def live_workers(connection: Redis) -> dict[str, int]:
    """Registered, not dead, with a running process: name -> pid."""
    return {
        worker.name: worker.pid
        for worker in Worker.all(connection=connection)
        if worker.death_date is None and worker.pid and pid_running(worker.pid)
    }


def download_job(connection: Redis, task_id: int) -> Job | None:
    """The download job of task *task_id*, if Redis has it."""
    try:
        return Job.fetch(f"download-{task_id}", connection=connection)
    except NoSuchJobError:
        return None


def queued_job_ids(connection: Redis, queue: str = "downloads") -> list[str]:
    """Job ids waiting in RQ queue *queue*, in order."""
    raw: list[bytes] = connection.lrange(f"rq:queue:{queue}", 0, -1)  # type: ignore[assignment]
    return [item.decode() for item in raw]


def live_worker(
    connection: Redis, queue: Queue, workers: list[Worker], job: Job | None = None, horse_started: bool = True
) -> Worker:
    """Register a worker in this process (so its PID is alive), noted in *workers*, and, if given, have it
    take *job*: RQ's worker pops it and records the execution (started registry) before it forks; the
    horse then marks the job started."""
    worker = Worker([queue], connection=connection, name=f"test-live-{uuid.uuid4().hex[:8]}")
    worker.register_birth()
    workers.append(worker)
    if job is not None:
        queue.remove(job)
        worker.prepare_execution(job)
        if horse_started:
            worker.prepare_job_execution(job)
    return worker


def _finish_as_rq_does(worker: Worker, job: Job, queue: Queue) -> None:
    """*worker* ends *job* successfully as RQ's does: status finished and the job out of the started
    registry, in one transaction."""
    job.ended_at = now()
    job._status = JobStatus.FINISHED  # as RQ's perform_job, before it records the success
    worker.handle_job_success(job, queue, queue.started_job_registry)


def _finish_after_fetch(monkeypatch: pytest.MonkeyPatch, worker: Worker, job: Job, queue: Queue) -> list[str]:
    """From now on, the first fetch of *job* from Redis is followed at once by *worker* finishing it:
    the caller holds the job as it was (started) while it has already ended. Returns the list that
    names the job once that has happened."""
    fetch = Job.fetch
    finished: list[str] = []

    def fetch_then_finish(cls: type[Job], job_id: str, *args: Any, **kwargs: Any) -> Job:
        fetched = fetch(job_id, *args, **kwargs)
        if not finished and job_id == job.id:
            _finish_as_rq_does(worker, job, queue)
            finished.append(job.id)
        return fetched

    monkeypatch.setattr(Job, "fetch", classmethod(fetch_then_finish))
    return finished


def _finish_after_registry_read(monkeypatch: pytest.MonkeyPatch, worker: Worker, job: Job, queue: Queue) -> list[str]:
    """From now on, the first read of a started registry that lists *job* is followed at once by
    *worker* finishing it as RQ's worker does (status finished and the job out of the registry, in one
    transaction): the moment between a reconciler's look at the registry and its liveness check.
    Returns the list that names the job once that has happened."""
    read: Callable[..., list[str]] = StartedJobRegistry.get_job_ids
    finished: list[str] = []

    def get_job_ids(registry: StartedJobRegistry, *args: Any, **kwargs: Any) -> list[str]:
        ids = read(registry, *args, **kwargs)
        if not finished and job.id in ids:
            _finish_as_rq_does(worker, job, queue)
            finished.append(job.id)
        return ids

    monkeypatch.setattr(StartedJobRegistry, "get_job_ids", get_job_ids)
    return finished


def ends_while_the_reconciler_looks(
    monkeypatch: pytest.MonkeyPatch, queue: Queue, workers: list[Worker], job: Job, after: str
) -> list[str]:
    """A live worker of this process (noted in *workers*) takes *job* from *queue*, and ends it right
    *after* the reconciler's first look at it: `registry` (its read of the started registry) or `fetch`
    (its fetch of the job). Returns the list that names the job once it has ended there."""
    worker = live_worker(queue.connection, queue, workers, job)
    hook = {"registry": _finish_after_registry_read, "fetch": _finish_after_fetch}[after]
    return hook(monkeypatch, worker, job, queue)
