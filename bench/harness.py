"""The run's shared state: sizes, folders, services, origins and the workers the parts start."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis
from rq import Worker
from rq.job import Job

from udemy_dl.producer import Producer
from udemy_dl.settings import Settings, load_settings
from udemy_dl.store import COMPLETED, FAILED, PROCESSING, TaskRow, TaskStore, open_store

from .origins import NginxOrigin, PythonOrigin
from .services import BenchMariaDB, BenchRedis
from .support import BIN, REPO, BenchError, Child, Children, clean_env, wait_until

RETRY_DELAY = 1
"""Seconds before RQ retries a failed attempt in the bench (the service's default is 20)."""


@dataclass(frozen=True)
class Profile:
    """How big each part is: the full run, or --quick for a smoke test."""

    name: str
    course_files: int
    course_bytes: int
    rounds: int
    resume_bytes: int
    resume_rounds: int
    queue_jobs: int
    idle_seconds: float
    flash_orders: int


FULL = Profile(
    "full",
    course_files=40,
    course_bytes=2**30,
    rounds=7,
    resume_bytes=200 * 10**6,
    resume_rounds=3,
    queue_jobs=200,
    idle_seconds=60,
    flash_orders=1000,
)
QUICK = Profile(
    "quick",
    course_files=40,
    course_bytes=40 * 2**20,
    rounds=1,
    resume_bytes=20 * 10**6,
    resume_rounds=1,
    queue_jobs=30,
    idle_seconds=12,
    flash_orders=100,
)


def split_evenly(total: int, count: int) -> list[int]:
    """*count* sizes adding up to *total* exactly (the first ones one byte larger when it does not divide)."""
    base, extra = divmod(total, count)
    return [base + (1 if index < extra else 0) for index in range(count)]


def row_time(value: datetime | None) -> float | None:
    """A naive-UTC time from download_tasks as a Unix timestamp."""
    return value.replace(tzinfo=UTC).timestamp() if value is not None else None


@dataclass
class Bench:
    profile: Profile
    workdir: Path
    children: Children
    redis: BenchRedis
    db: BenchMariaDB
    origin: NginxOrigin | PythonOrigin
    cutting_origin: PythonOrigin
    """ContentOrigin on its own port: the one origin that can cut a connection at a given byte."""
    data: Path
    _store: TaskStore | None = None
    _producer: Producer | None = None
    _seq: int = 0

    # -- configuration ------------------------------------------------------------------------

    @property
    def service_dir(self) -> Path:
        return self.workdir / "service"

    @property
    def download_dir(self) -> Path:
        return self.service_dir / "downloads"

    @property
    def allowed_hosts(self) -> str:
        return ",".join(sorted({self.origin.host_port, self.cutting_origin.host_port}))

    def service_env(self, **extra: str) -> dict[str, str]:
        """The service's variables for the bench (and nothing from the caller's environment or a .env)."""
        values = {
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": self.db.worker_url,
            "ALLOWED_HOSTS": self.allowed_hosts,
            "DOWNLOAD_DIR": str(self.download_dir),
            "FAILED_DIR": str(self.service_dir / "failed"),
            "LOG_DIR": str(self.service_dir / "logs"),
            "PID_DIR": str(self.service_dir / "run"),
            "RETRY_DELAY": str(RETRY_DELAY),
        }
        values.update(extra)
        return values

    def settings(self) -> Settings:
        return load_settings(self.service_env(), env_file=None)

    @property
    def store(self) -> TaskStore:
        """The bench's own view of download_tasks, as the admin user (not counted as the workers' SQL)."""
        if self._store is None:
            self._store = open_store(self.db.admin_db_url)
        return self._store

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.settings())
        return self._producer

    @property
    def connection(self) -> Redis:
        return self.producer.connection

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- workers ------------------------------------------------------------------------------

    def unique(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq}"

    def start_worker(self, name: str, **settings: str) -> Child:
        """One of our workers, exactly as start_workers.sh runs it (`udemy-dl worker --name ...`)."""
        self.service_dir.mkdir(parents=True, exist_ok=True)
        return self.children.start(
            name,
            [str(BIN / "udemy-dl"), "worker", "--name", name],
            self.workdir / "logs" / f"{name}.log",
            env=clean_env(**self.service_env(**settings)),
            cwd=self.service_dir,
        )

    def start_reconciler(self, name: str, **settings: str) -> Child:
        """The reconciler beside the workers, as start_workers.sh runs it (`udemy-dl reconciler`)."""
        self.service_dir.mkdir(parents=True, exist_ok=True)
        return self.children.start(
            name,
            [str(BIN / "udemy-dl"), "reconciler"],
            self.workdir / "logs" / f"{name}.log",
            env=clean_env(**self.service_env(**settings)),
            cwd=self.service_dir,
        )

    def start_rq_worker(self, name: str, queue: str) -> Child:
        """Plain `rq worker` on the same Redis, importing jobs from the checkout (bench.noop)."""
        self.service_dir.mkdir(parents=True, exist_ok=True)
        return self.children.start(
            name,
            [str(BIN / "rq"), "worker", "--url", self.redis.url, "--path", str(REPO), "--name", name, queue],
            self.workdir / "logs" / f"{name}.log",
            env=clean_env(),
            cwd=self.service_dir,
        )

    def wait_registered(self, workers: list[Child], timeout: float = 30) -> None:
        """Until every worker has registered in Redis (and so is about to wait on its queues)."""

        def ready() -> bool:
            for child in workers:
                if not child.alive():
                    raise BenchError(f"worker {child.name} exited ({child.popen.returncode}):\n{child.tail()}")
                key = Worker.redis_worker_namespace_prefix + child.name
                if not self.connection.exists(key):
                    return False
            return True

        wait_until(ready, timeout=timeout, what=f"{len(workers)} worker(s) to register", interval=0.05)
        time.sleep(0.3)  # let each reach its blocking pop after registering; not a synchronisation of results

    # -- tasks --------------------------------------------------------------------------------

    def new_task(self, course_url: str) -> int:
        """A paid task, as the shop leaves it: a row in `processing`."""
        self.service_dir.mkdir(parents=True, exist_ok=True)
        return self.store.insert_task("bench@example.com", course_url, status=PROCESSING)

    def enqueue(self, task_id: int, course_url: str) -> Job:
        """Hand the task to the queue as the payment service does (Producer.add_download_job)."""
        job: Job = self.producer.add_download_job(
            {"taskId": task_id, "email": "bench@example.com", "courseUrl": course_url}
        ).job
        return job

    def wait_settled(self, task_id: int, timeout: float, logs: list[Child], interval: float = 0.02) -> TaskRow:
        """Until the task's row is completed (returned) or failed (BenchError naming the reason)."""

        def settled() -> TaskRow | None:
            row = self.store.get(task_id)
            return row if row is not None and row.status in (COMPLETED, FAILED) else None

        row = wait_until(
            settled,
            timeout=timeout,
            what=f"task {task_id} to complete",
            interval=interval,
            on_timeout=lambda: "\n".join(child.tail() for child in logs),
        )
        if row.status != COMPLETED:
            tails = "\n".join(child.tail() for child in logs)
            raise BenchError(f"task {task_id} failed: {row.error_message}\n{tails}")
        return row


def make_origin(children: Children, nginx: str | None, data: Path, workdir: Path) -> NginxOrigin | PythonOrigin:
    if nginx is not None:
        return NginxOrigin(children, nginx, data, workdir / "nginx").start()
    return PythonOrigin(data).start()
