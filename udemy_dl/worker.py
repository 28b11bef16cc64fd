"""Process control: run one named RQ worker (start_workers.sh) or RQ's worker pool (systemd)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import sys

from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.scripts import release_lock
from rq.worker_pool import WorkerPool

from .connection import redis_connection, worker_queues
from .settings import Settings

log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere).

    A work horse outliving its worker (kill -9, OOM killer) would go on writing a staging folder
    while the task is handed to another worker; with this, it cannot.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


class DownloadWorker(Worker):
    """RQ's forking worker, except that its work horse dies with it."""

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        die_with_parent()
        super().main_work_horse(job, queue)


def default_worker_name(index: int) -> str:
    return f"udemy-dl.{socket.gethostname()}.{index}"


def _pid_alive(pid: int) -> bool:
    """True if *pid* runs; a zombie (dead, not yet reaped by a slow PID 1) counts as dead."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(0) is all we can know
    return state not in ("Z", "X")


def worker_is_running(connection: Redis, name: str | None, job_id: str) -> bool:
    """True while worker *name* is registered, alive, and busy with *job_id*.

    A worker killed with SIGKILL keeps its key until the TTL runs out; on its own host the PID
    check sees through that at once. On other hosts the key's TTL (heartbeat) decides. A new
    worker that reuses a dead one's name is not busy with the dead one's job.
    """
    if not name:
        return False
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if worker is None or worker.death_date is not None:
        return False
    if worker.hostname == socket.gethostname() and worker.pid and not _pid_alive(worker.pid):
        return False
    return worker.get_current_job_id() == job_id


def clear_stale_registration(connection: Redis, name: str) -> bool:
    """Retire a registration left by a dead worker of the same name on this host, so the name can be reused.

    RQ refuses to start a worker whose name is still registered; after a kill -9 the old key
    lives until its TTL runs out (minutes). Only a registration from this host whose PID is gone
    is retired; a live worker elsewhere keeps its name.
    """
    old = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if old is None or old.hostname != socket.gethostname() or not old.pid or _pid_alive(old.pid):
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
        if hostname != socket.gethostname() or not pid or _pid_alive(pid):
            continue
        if release_lock(connection, lock_key, owner_name):
            log.warning("queue %s: freed the scheduler lock of dead scheduler pid %s", queue_name, pid)
            freed.append(queue_name)
    return freed


def preload_job_modules() -> None:
    """Import the job modules in the parent, so forked work horses do not import them per job."""
    from . import webhooks, worker_rq  # noqa: F401


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


def run_pool(settings: Settings, count: int, logging_level: str = "INFO") -> None:
    """Run RQ's worker pool: *count* workers, each replaced if it dies; SIGTERM stops them warmly."""
    settings.require_worker_ready()
    preload_job_modules()
    connection = redis_connection(settings)
    queues = worker_queues(settings, connection)
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    pool = WorkerPool(queues, connection=connection, num_workers=count, worker_class=DownloadWorker)
    pool.start(logging_level=logging_level)
