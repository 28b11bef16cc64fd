"""What RQ holds in Redis about the service's work: live workers, a task's download job, the queues."""

from __future__ import annotations

from redis import Redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job

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
