"""What RQ holds in Redis about the service's work: live workers, a task's download job, the queues."""

from __future__ import annotations

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


def finish_after_registry_read(monkeypatch: pytest.MonkeyPatch, worker: Worker, job: Job, queue: Queue) -> list[str]:
    """From now on, the first read of a started registry that lists *job* is followed at once by
    *worker* finishing it as RQ's worker does (status finished and the job out of the registry, in one
    transaction): the moment between a reconciler's look at the registry and its liveness check.
    Returns the list that names the job once that has happened."""
    read: Callable[..., list[str]] = StartedJobRegistry.get_job_ids
    finished: list[str] = []

    def get_job_ids(registry: StartedJobRegistry, *args: Any, **kwargs: Any) -> list[str]:
        ids = read(registry, *args, **kwargs)
        if not finished and job.id in ids:
            job.ended_at = now()
            job._status = JobStatus.FINISHED  # as RQ's perform_job, before it records the success
            worker.handle_job_success(job, queue, queue.started_job_registry)
            finished.append(job.id)
        return ids

    monkeypatch.setattr(StartedJobRegistry, "get_job_ids", get_job_ids)
    return finished
