"""Process control: run one named RQ worker (start_workers.sh) or RQ's worker pool (systemd)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import InvalidJobOperation
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.scripts import release_lock
from rq.worker import BaseWorker
from rq.worker_pool import WorkerPool

from . import defaults
from .connection import redis_connection, worker_queues
from .process import die_with_parent, install_hand_back_handler, pid_alive
from .scheduler import ResilientScheduler
from .settings import Settings

log = logging.getLogger(__name__)


HAND_BACK_SIGNAL = getattr(signal, defaults.HAND_BACK_SIGNAL_NAME)


class DownloadWorker(Worker):
    """RQ's forking worker, with what a download service needs on top:

    - its work horse dies with it (no orphan keeps writing a staging folder);
    - a short worker TTL, so a dead worker on another host is noticed within about 90 s;
    - on a warm shutdown (SIGTERM/SIGINT) it asks the horse to hand its task back to the queue
      at once, instead of waiting for a download that may take an hour;
    - after Redis has lost its data, its next heartbeat registers it again (rq info shows it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("worker_ttl", defaults.WORKER_TTL)
        super().__init__(*args, **kwargs)
        self._high_in_a_row = 0
        self._preferred_order = list(self._ordered_queues)

    def reorder_queues(self, reference_queue: Queue) -> None:
        """VIP first, but never more than HIGH_PICKUPS_BEFORE_NORMAL VIP tasks in a row while
        normal ones wait: after that run the normal queue is asked first, once."""
        high = [q for q in self._preferred_order if q.name.endswith(defaults.HIGH_QUEUE_SUFFIX)]
        if not high or reference_queue.name not in (
            high[0].name,
            high[0].name.removesuffix(defaults.HIGH_QUEUE_SUFFIX),
        ):
            return  # a webhook delivery: neither a VIP pickup nor a normal one, the order stands
        if reference_queue.name == high[0].name:
            self._high_in_a_row += 1
        elif reference_queue.name + defaults.HIGH_QUEUE_SUFFIX == high[0].name:
            self._high_in_a_row = 0
        if self._high_in_a_row >= defaults.HIGH_PICKUPS_BEFORE_NORMAL:
            normal = [q for q in self._preferred_order if q.name + defaults.HIGH_QUEUE_SUFFIX == high[0].name]
            others = [q for q in self._preferred_order if q not in normal and q is not high[0]]
            self._ordered_queues = [*others, *normal, high[0]]
            self._high_in_a_row = 0
        else:
            self._ordered_queues = list(self._preferred_order)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        install_hand_back_handler(HAND_BACK_SIGNAL)
        die_with_parent()
        super().main_work_horse(job, queue)

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        if self.horse_pid:
            self.log.info("Worker %s: asking horse %s to hand its task back", self.name, self.horse_pid)
            try:
                os.kill(self.horse_pid, HAND_BACK_SIGNAL)
            except ProcessLookupError:
                pass
        else:
            # Idle, maybe blocked in a dequeue: Redis would hand that blocked connection the next
            # job pushed (a task another worker hands back, say), and this worker would never run
            # it. Dropping the connections cancels the pending dequeue; later calls reconnect.
            self.connection.connection_pool.disconnect()

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name in (defaults.DOWNLOAD_JOB_FUNCTION, defaults.DELIVER_JOB_FUNCTION):
            prepare_job_context()
        try:
            super().execute_job(job, queue)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # RQ would let this end the worker. The job's outcome is in the database (or the
            # reconciler will see it is missing); wait for Redis and go on working.
            self.log.warning("Worker %s: Redis unreachable around job %s: %s; waiting for it", self.name, job.id, exc)
            self._wait_for_redis()
            self._settle_after_outage(job, queue)

    def _settle_after_outage(self, job: Job, queue: Queue) -> None:
        """The job's end could not be recorded in Redis: unless it was, hand it to RQ's failure
        handling, which schedules its retry. A retry of a finished download only re-sends its event."""
        try:
            status = job.get_status(refresh=True)
            if status in (JobStatus.FINISHED, JobStatus.FAILED):
                return
            self.handle_job_failure(job, queue, exc_string="Redis was unreachable when the job ended")
        except (RedisConnectionError, RedisTimeoutError, InvalidJobOperation) as exc:
            self.log.warning("Worker %s: could not settle job %s after the outage: %s", self.name, job.id, exc)

    def _wait_for_redis(self) -> None:
        delay = 1.0
        while True:
            try:
                self.connection.ping()
                return
            except (RedisConnectionError, RedisTimeoutError):
                time.sleep(delay)  # backoff while Redis is away
                delay = min(delay * 2, 30.0)

    def set_current_job_working_time(self, current_job_working_time: float, pipeline: Pipeline | None = None) -> None:
        try:
            super().set_current_job_working_time(current_job_working_time, pipeline)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: could not record working time, Redis unreachable: %s", self.name, exc)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        if job.meta.get("handed_back") and job.args:
            # Only now is the job finished, so the enqueue below makes a fresh job rather than
            # finding this one live. At the front: it was already running once.
            from .producer import Producer, priority_of
            from .settings import get_settings

            outcome = Producer(get_settings(), connection=self.connection).add_download_job(
                job.args[0], priority=priority_of(job), at_front=True
            )
            self.log.info("Worker %s: task handed back as job %s", self.name, outcome.job.id)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        try:
            if self.birth_date is not None and not self.connection.hexists(self.key, "birth"):
                # Redis restarted without our registration: announce ourselves again.
                self.log.warning("Worker %s: registration lost (Redis restarted?); registering again", self.name)
                self.connection.delete(self.key)
                self.register_birth()  # type: ignore[no-untyped-call]
            super().heartbeat(timeout, pipeline)
            self._keep_scheduler_alive()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # RQ would let this end the worker (and its horse, mid-download); Redis coming back is
            # the usual outcome, so keep working and beat again next time.
            self.log.warning("Worker %s: heartbeat failed, Redis unreachable: %s", self.name, exc)

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """As RQ's, with a scheduler that outlives Redis outages (see udemy_dl.scheduler)."""
        self.scheduler = ResilientScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()  # type: ignore[no-untyped-call]
        if not self.scheduler.acquired_locks:
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
            finally:
                self.scheduler.release_locks()  # type: ignore[no-untyped-call]
                self.scheduler.register_death()
        else:
            self.scheduler.start()  # type: ignore[no-untyped-call]

    def _keep_scheduler_alive(self) -> None:
        """Restart a scheduler that died anyway (ours waits out Redis outages) at the next heartbeat,
        not at RQ's next maintenance pass ten minutes on: scheduled retries depend on it."""
        scheduler = self.scheduler
        if scheduler is None or self._stop_requested:
            return
        process = scheduler._process
        if process is None or not process.is_alive():
            if scheduler.acquire_locks(auto_start=True):
                self.log.info("Worker %s: scheduler (re)started", self.name)

    def maintain_heartbeats(self, job: Job) -> None:
        try:
            super().maintain_heartbeats(job)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: heartbeat for job %s failed, Redis unreachable: %s", self.name, job.id, exc)


def default_worker_name(index: int) -> str:
    return f"udemy-dl.{socket.gethostname()}.{index}"


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


def clear_stale_registration(connection: Redis, name: str) -> bool:
    """Retire a registration left by a dead worker of the same name on this host, so the name can be reused.

    RQ refuses to start a worker whose name is still registered; after a kill -9 the old key
    lives until its TTL runs out (minutes). Only a registration from this host whose PID is gone
    is retired; a live worker elsewhere keeps its name.
    """
    old = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if old is None or old.hostname != socket.gethostname() or not old.pid or pid_alive(old.pid):
        return False
    log.warning("worker %s: retiring the registration of dead pid %s", name, old.pid)
    old.register_death()
    return True


def release_dead_scheduler_locks(connection: Redis, queue_names: list[str]) -> list[str]:
    """Free scheduler locks held by a dead scheduler process of this host.

    RQ's scheduler lock outlives a killed worker for a minute, and a worker that cannot take it at
    start only tries again at its next maintenance pass (about 10 minutes): until then retries
    scheduled before the crash would not fire. Returns the queue names whose lock was freed.
    """
    freed = []
    for queue_name in queue_names:
        lock_key = RQScheduler.get_locking_key(queue_name)
        owner = connection.get(lock_key)
        if owner is None:
            continue
        owner_name = owner.decode() if isinstance(owner, bytes) else str(owner)
        data: dict[bytes, bytes] = connection.hgetall(SCHEDULER_KEY_TEMPLATE % owner_name)  # type: ignore[assignment]
        hostname = (data.get(b"hostname") or b"").decode()
        pid = int(data.get(b"pid") or 0)
        if hostname != socket.gethostname() or not pid or pid_alive(pid):
            continue
        if release_lock(connection, lock_key, owner_name):
            log.warning("queue %s: freed the scheduler lock of dead scheduler pid %s", queue_name, pid)
            freed.append(queue_name)
    return freed


def preload_job_modules() -> None:
    """Import the job modules (and the database driver) in the parent, so forked work horses do not
    import them per job."""
    import mysql.connector  # noqa: F401

    from . import webhooks, worker_rq  # noqa: F401


def prepare_job_context() -> None:
    """In the worker, before it forks a horse for a download or a delivery: settings parsed,
    database connection open and answering. The horse inherits both instead of setting them up
    again (a delivery records its acknowledgement in the task's row)."""
    from .context import get_context

    try:
        get_context().store.ensure_connected()
    except Exception as exc:  # the horse will try again, with retries, and report properly
        log.warning("could not prepare the database connection: %s", exc)


def run_worker(settings: Settings, name: str, burst: bool = False, logging_level: str = "INFO") -> bool:
    """Run one RQ worker (with the scheduler, so retry delays fire) until it is told to stop."""
    settings.require_worker_ready()
    preload_job_modules()
    connection = redis_connection(settings)
    clear_stale_registration(connection, name)
    queues = worker_queues(settings, connection)
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    worker = DownloadWorker(queues, connection=connection, name=name)
    return worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)


class DownloadPool(WorkerPool):
    """RQ's worker pool plus one reconciler process, each replaced if it dies."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reconciler: BaseProcess | None = None
        self._pool_pid = os.getpid()

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        if os.getpid() != self._pool_pid:
            # A worker process forked a moment ago still carries the pool's handler: the stop
            # meant for it arrived before it could install its own. It has nothing to finish.
            os._exit(0)
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO") -> BaseProcess:
        """Each worker builds its own Redis client from the settings (so Sentinel works too) and is
        named like the scripts' workers: udemy-dl.<host>.<id>."""
        return get_context("fork").Process(
            target=_run_pool_worker,
            args=(self.settings, f"udemy-dl.{socket.gethostname()}.{name[:8]}", burst, logging_level),
            name=f"Worker {name} (WorkerPool {self.name})",
        )

    def _ensure_reconciler(self) -> None:
        if self.reconciler is not None and self.reconciler.is_alive():
            return
        if self.reconciler is not None:
            self.log.warning("reconciler (pid %s) died; starting another", self.reconciler.pid)
        from .reconciler import run_reconciler

        self.reconciler = get_context("fork").Process(target=run_reconciler, args=(self.settings,), name="reconciler")
        self.reconciler.start()

    def check_workers(self, respawn: bool = True) -> None:
        super().check_workers(respawn)
        if respawn and self.status != self.Status.STOPPED:
            self._ensure_reconciler()

    def stop_workers(self) -> None:
        super().stop_workers()  # type: ignore[no-untyped-call]
        if self.reconciler is not None and self.reconciler.is_alive():
            self.reconciler.terminate()


def _run_pool_worker(settings: Settings, name: str, burst: bool, logging_level: str) -> None:
    connection = redis_connection(settings)
    queues = worker_queues(settings, connection)
    # Replacing a worker that died: its scheduler went with it, its lock need not wait a minute.
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    worker = DownloadWorker(queues, connection=connection, name=name)
    worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)


def run_pool(settings: Settings, count: int, logging_level: str = "INFO") -> None:
    """Run RQ's worker pool: *count* workers and a reconciler, each replaced if it dies;
    SIGTERM stops them warmly (a running download is handed back to the queue)."""
    settings.require_worker_ready()
    preload_job_modules()
    connection = redis_connection(settings)
    queues = worker_queues(settings, connection)
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    pool = DownloadPool(settings, queues, connection=connection, num_workers=count, worker_class=DownloadWorker)
    try:
        pool.start(logging_level=logging_level)
    finally:
        if pool.reconciler is not None:
            pool.reconciler.terminate()
            pool.reconciler.join(5)
