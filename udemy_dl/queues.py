"""Queue knowledge, in one place: which queues there are, a task's job id and priority, whether a
job is live, and enqueuing a download once per task. The producer, the worker class and the
reconciler all use it.

A download job's id is `download-<taskId>`. While that job is queued, scheduled, started or
deferred, asking again returns it; once it has finished or failed, asking again enqueues anew.
The check and the enqueue happen under a short per-task Redis lock, so twenty concurrent
confirmations of one task make exactly one job.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from redis import Redis
from redis.exceptions import LockError
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import BaseWorker

from . import defaults
from .errors import InvalidTaskError, TransientError
from .payload import TaskPayload, parse_task
from .process_control import pid_alive
from .settings import Settings

log = logging.getLogger(__name__)

WAITING_STATUSES = frozenset({JobStatus.SCHEDULED, JobStatus.DEFERRED})


def download_queue(settings: Settings, connection: Redis, priority: str = "normal") -> Queue:
    return Queue(settings.queue_for(priority), connection=connection)


def download_queues(settings: Settings, connection: Redis) -> list[Queue]:
    """The VIP queue, then the normal one."""
    return [download_queue(settings, connection, "high"), download_queue(settings, connection)]


def webhook_queue(settings: Settings, connection: Redis) -> Queue:
    return Queue(settings.webhook_queue_name, connection=connection)


def worker_queues(settings: Settings, connection: Redis) -> list[Queue]:
    """Queues a worker listens to, in order: webhook deliveries are short, so they go first; then
    VIP downloads, then normal ones (DownloadWorker bounds the VIP run so normal ones still move)."""
    return [webhook_queue(settings, connection), *download_queues(settings, connection)]


def parse_priority(value: object) -> str:
    """`normal` or `high`; anything else is bad input named in the error."""
    if value is None:
        return "normal"
    if value not in defaults.PRIORITIES:
        raise InvalidTaskError(f"priority must be one of {', '.join(defaults.PRIORITIES)}, got {value!r}")
    return str(value)


def priority_of(job: Job) -> str:
    """The priority a job was enqueued with, read from the queue it came from."""
    return "high" if job.origin.endswith(defaults.HIGH_QUEUE_SUFFIX) else "normal"


def job_id_for(task_id: int) -> str:
    return f"download-{task_id}"


def retry_intervals(settings: Settings, rng: random.Random | None = None) -> list[int]:
    """Exponential backoff from RETRY_DELAY, doubling, each stretched by random jitter."""
    rng = rng or random.Random()
    return [
        round(settings.retry_delay * 2**n * (1 + rng.uniform(0, defaults.RETRY_JITTER)))
        for n in range(settings.max_attempts - 1)
    ]


@dataclass
class EnqueueResult:
    job: Job
    created: bool


def live_worker(connection: Redis, name: str | None) -> BaseWorker | None:
    """Worker *name* if it is registered and alive, else None.

    A worker killed with SIGKILL keeps its key until the TTL runs out; on its own host the PID
    check sees through that at once. On other hosts the key's TTL (heartbeat) decides.
    """
    if not name:
        return None
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if worker is None or worker.death_date is not None:
        return None
    if worker.hostname == socket.gethostname() and worker.pid and not pid_alive(worker.pid):
        return None
    return worker


def job_is_running(connection: Redis, job: Job) -> bool:
    """True while a live worker has *job* in hand: some execution of it in the started registry
    belongs to a worker that is alive and was born before the execution began (a new worker that
    took a dead one's name is not running the dead one's job).

    RQ records the execution before the work horse marks the job started, so this also sees a
    job in the moment between its dequeue and its start.
    """
    registry = StartedJobRegistry(job.origin, connection=connection)
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        if job_id != job.id:
            continue
        try:
            execution = Execution.fetch(execution_id, job_id, connection)
        except ValueError:  # the execution ended meanwhile
            continue
        worker = live_worker(connection, execution.worker_name)
        if worker is not None and (worker.birth_date is None or worker.birth_date <= execution.created_at):
            return True
    return False


class DownloadQueues:
    """The download queues of one Redis: find a task's job, tell whether it is live, enqueue it once."""

    def __init__(self, settings: Settings, connection: Redis) -> None:
        self.settings = settings
        self.connection = connection

    def job_is_live(self, job: Job) -> bool:
        """Waiting where a worker will find it (queued in its queue, scheduled, deferred), or in
        the hands of a live worker (see worker.job_is_running).

        A job whose status says queued but which sits in no queue list and no live worker's hands
        was popped by a worker that died at once (RQ's multi-queue dequeue keeps no safety copy).
        """
        status = job.get_status(refresh=False)
        if status == JobStatus.QUEUED:
            queue = Queue(job.origin, connection=self.connection)
            if any(self.connection.lpos(key, job.id) is not None for key in (queue.key, queue.intermediate_queue_key)):
                return True
            return job_is_running(self.connection, job)
        if status in WAITING_STATUSES:
            return True
        return status == JobStatus.STARTED and job_is_running(self.connection, job)

    def fetch_job(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def live_job(self, task_id: int) -> Job | None:
        """The task's job if it is live (see job_is_live); else None."""
        job = self.fetch_job(job_id_for(task_id))
        return job if job is not None and self.job_is_live(job) else None

    def enqueue(
        self,
        task_data: Mapping[str, Any] | TaskPayload,
        priority: str = "normal",
        at_front: bool = False,
        delay: float = 0,
    ) -> EnqueueResult:
        """Enqueue *task_data* once: an existing live job for the same taskId is returned instead.

        *priority* `high` puts it on the VIP queue, served before the normal one. With *delay*
        (seconds), the job is scheduled: RQ's scheduler queues it once the delay has passed.
        """
        task = task_data if isinstance(task_data, TaskPayload) else parse_task(task_data)
        queue = download_queue(self.settings, self.connection, parse_priority(priority))
        job_id = job_id_for(task.task_id)
        lock = self.connection.lock(
            f"udemy_dl:lock:enqueue:{task.task_id}",
            timeout=defaults.ENQUEUE_LOCK_TIMEOUT,
            blocking_timeout=defaults.ENQUEUE_LOCK_TIMEOUT,
        )
        try:
            with lock:
                try:
                    existing: Job | None = Job.fetch(job_id, connection=self.connection)
                except NoSuchJobError:
                    existing = None
                if existing is not None:
                    status = existing.get_status(refresh=False)
                    if self.job_is_live(existing):
                        log.info("task %s: job %s already %s", task.task_id, job_id, status)
                        return EnqueueResult(existing, created=False)
                    # Finished, failed, or started by a dead worker: its record makes way for the new run.
                    log.info("task %s: job %s was %s, enqueuing anew", task.task_id, job_id, status)
                    existing.delete(remove_from_queue=True)
                retries = retry_intervals(self.settings)
                put = queue.enqueue if delay <= 0 else partial(queue.enqueue_in, timedelta(seconds=delay))
                job = put(
                    defaults.DOWNLOAD_JOB_FUNCTION,
                    task.to_payload(),
                    job_id=job_id,
                    retry=Retry(max=len(retries), interval=retries) if retries else None,
                    job_timeout=self.settings.job_timeout,
                    result_ttl=self.settings.result_ttl,
                    failure_ttl=self.settings.failure_ttl,
                    description=f"download task {task.task_id}",
                    at_front=at_front,
                )
        except LockError as exc:
            raise TransientError(f"task {task.task_id}: enqueue lock busy: {exc}") from exc
        log.info("task %s: enqueued job %s on %s", task.task_id, job_id, queue.name)
        return EnqueueResult(job, created=True)
