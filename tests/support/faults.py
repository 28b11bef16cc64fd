"""The fault-injection suite's world: its own `redis-server` the test can stop, kill and restart;
its database reached by the workers through a relay the test can cut; the content origin and the
webhook receiver; workers started as operators start them (start_workers.sh / stop_workers.sh, or
`udemy-dl pool` as the systemd unit runs it); and the checks every scenario ends with.

Every process a test starts carries FAULTS_RUN_ID=<uuid> in its environment; cleanup kills
whatever is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rq import Worker
from rq.job import Job

from dev.devservers import ReceivedWebhook, WebhookReceiver
from udemy_dl.store import COMPLETED, FAILED, PROCESSING, MySQLStore, TaskRow
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED

from .deployment import Deployment, leftovers, served_by, site_environ
from .files import sha256_of
from .horses import TASK_LOG_LINE
from .http_servers import Origin, Task, event_ids, make_tasks
from .mariadb import database_url
from .processes import LoggedProcess, descendants, kill_marked, work_horses
from .redis_servers import RedisServer
from .relay import Relay
from .rq_state import download_job, live_workers, queued_job_ids
from .scripts import STOP_SCRIPT, rq_info_workers
from .waiting import wait_for

MARKER = "FAULTS_RUN_ID"
"""Environment variable carried by every process a test starts (value: the test's uuid)."""

OUTAGE_SECONDS = max(20.0, float(os.environ.get("FAULTS_OUTAGE_SECONDS", "60")))
"""How long the Redis and MySQL outages last (the issue says 60 s; FAULTS_OUTAGE_SECONDS scales it, at least 20)."""


class Faults(Deployment):
    """One scenario's world: services, tasks, workers, and the checks every scenario ends with."""

    def __init__(
        self,
        tmp: Path,
        redis: RedisServer,
        proxy: Relay,
        origin: Origin,
        receiver: WebhookReceiver,
        secret: str,
        database: str,
        store: MySQLStore,
        run_id: str,
    ) -> None:
        super().__init__(
            tmp,
            site_environ(
                MARKER,
                run_id,
                tmp,
                REDIS_URL=redis.url,
                DATABASE_URL=database_url(database, proxy.port),
                WORKER_COUNT="2",
                MAX_ATTEMPTS="3",
                **served_by(origin, receiver, secret),
            ),
        )
        self.redis_server = redis
        self.proxy = proxy
        self.origin = origin
        self.receivers = [receiver]
        self.secret = secret
        self.store = store
        self.run_id = run_id
        self.redis = redis.client()
        self.pools: list[LoggedProcess] = []
        self.scripts_used = False

    def use_fetch_command(self, script: str, **settings: str) -> None:
        """From now on, fetch with the Python *script* (FETCH_COMMAND `python <script> {url} {dest}`); set
        *settings* too."""
        fetcher = self.tmp / "fetch_command.py"
        fetcher.write_text(script)
        self.set_env(FETCH_COMMAND=f"{sys.executable} {fetcher} {{url}} {{dest}}", **settings)

    # -- tasks ------------------------------------------------------------------------------

    def make_tasks(self, count: int, size: int, prefix: str = "course", files: int = 1) -> list[Task]:
        """*count* courses of *files* files of *size* bytes each, and a `pending` row per course."""
        names = [f"lecture-{k + 1}.mp4" for k in range(files)]
        return make_tasks(self.origin, self.store, count, size, prefix, names, email="buyer{n}@example.com")

    def pay(self, tasks: Sequence[Task]) -> None:
        """`udemy-dl confirm-payment`: rows become processing, one job each is enqueued."""
        done = self.cli("confirm-payment", "--json", *(str(task.id) for task in tasks))
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["enqueued"] == [task.id for task in tasks], done.stdout

    # -- commands ---------------------------------------------------------------------------

    def health(self) -> subprocess.CompletedProcess[str]:
        return self.cli("health", timeout=60)

    def rq_info_workers(self) -> dict[str, int]:
        """The workers `rq info` lists: name -> pid."""
        return {name: pid for name, _, pid in rq_info_workers(self.rq_info())}

    # -- start_workers.sh / stop_workers.sh -------------------------------------------------

    def start_workers(self, count: int, timeout: float = 90) -> dict[int, int]:
        self.scripts_used = True
        return super().start_workers(count, timeout)

    def stop_workers(self) -> tuple[subprocess.CompletedProcess[str], float]:
        """stop_workers.sh; returns its result and how long it took."""
        began = time.monotonic()
        done = self.stop_script(timeout=90)
        return done, time.monotonic() - began

    def stop_workers_in_background(self) -> subprocess.Popen[bytes]:
        """stop_workers.sh, not waited for (the test does something while it runs)."""
        return subprocess.Popen(
            [str(STOP_SCRIPT)], env=self.vars, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    # -- the pool (systemd's way) -----------------------------------------------------------

    def start_pool(self, count: int, wait: bool = True) -> LoggedProcess:
        """`udemy-dl pool --count N` (the unit's ExecStart), then `udemy-dl reconcile` (its ExecStartPost)."""
        pool = self.launch_pool(count, self.tmp / f"pool-{len(self.pools) + 1}.log")
        self.pools.append(pool)
        if wait:
            self.wait_pool_workers(pool, count)
        self.cli("reconcile")
        return pool

    def pool_workers(self, pool: LoggedProcess) -> dict[str, int]:
        """The pool's registered live workers: name -> pid."""
        family = set(descendants(pool.pid))
        return {name: pid for name, pid in self.live_workers().items() if pid in family}

    def wait_pool_workers(self, pool: LoggedProcess, count: int, timeout: float = 60) -> dict[str, int]:
        def ready() -> dict[str, int]:
            assert pool.process.poll() is None, f"the pool exited with {pool.process.returncode}:\n{pool.log(6000)}"
            workers = self.pool_workers(pool)
            return workers if len(workers) == count else {}

        return wait_for(ready, timeout=timeout, interval=0.2, what=lambda: f"{count} pool workers\n{pool.log(6000)}")

    # -- what runs where --------------------------------------------------------------------

    def queued_job_ids(self, queue: str = "downloads") -> list[str]:
        """Job ids waiting in RQ queue *queue*, in order."""
        return queued_job_ids(self.redis, queue)

    def redis_state(self, task: Task) -> str:
        """The task's job and every queue, for assertion messages."""
        job = self.job(task)
        described = "no job" if job is None else f"job {job.id}: {job.get_status(refresh=False)} on {job.origin!r}"
        queues = {key.decode(): self.redis.lrange(key, 0, -1) for key in self.redis.keys("rq:queue:*")}  # type: ignore[union-attr]
        return f"{described}; queues {queues}"

    def blocked_clients(self) -> int:
        """Redis clients blocked in a command (a worker waiting in its BLPOP dequeue)."""
        info: dict[str, Any] = self.redis.info("clients")  # type: ignore[assignment]
        return int(info["blocked_clients"])

    def redis_run_id(self) -> str:
        info: dict[str, Any] = self.redis.info("server")  # type: ignore[assignment]
        return str(info["run_id"])

    def live_workers(self) -> dict[str, int]:
        """Registered, not dead, with a running process: name -> pid."""
        return live_workers(self.redis)

    def job(self, task: Task) -> Job | None:
        return download_job(self.redis, task.id)

    def runner(self, task: Task) -> tuple[int, int]:
        """(worker pid, work horse pid) of the run downloading *task* right now."""
        job = self.job(task)
        assert job is not None and job.worker_name, f"task {task.id} is not running"
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=self.redis)
        assert worker is not None and worker.pid, f"worker {job.worker_name} is not registered"
        horses = work_horses(worker.pid)
        assert len(horses) == 1, f"worker {worker.pid} has horses {horses}"
        return worker.pid, horses[0]

    def part_bytes(self, task: Task) -> int:
        parts = self.download_dir / ".staging" / str(task.id) / ".parts"
        return sum(path.stat().st_size for path in parts.glob("*.part")) if parts.is_dir() else 0

    def wait_under_way(self, task: Task, fraction: float = 0.0, timeout: float = 60) -> None:
        """Wait until *task*'s run has written more than *fraction* of its bytes (and at least one chunk)."""

        def under_way() -> bool:
            done = self.part_bytes(task)
            return done > max(fraction * task.size, 0) and self.job_started(task)

        wait_for(under_way, timeout=timeout, interval=0.05, what=lambda: f"task {task.id} under way\n{self.logs()}")

    def job_started(self, task: Task) -> bool:
        job = self.job(task)
        return job is not None and job.get_status(refresh=False) == "started" and bool(job.worker_name)

    def wait_resumed(self, task: Task, after: float, timeout: float = 150) -> float:
        """The time of the first request after *after* for one of *task*'s files (the run going again)."""

        def resumed() -> float:
            for item in task.files:
                for at, _ in self.origin.timed.for_path(item.url_path):
                    if at > after:
                        return at
            return 0.0

        return wait_for(
            resumed, timeout=timeout, interval=0.05, what=lambda: f"task {task.id} to run again\n{self.logs()}"
        )

    def row(self, task: Task) -> TaskRow:
        row = self.store.get(task.id)
        assert row is not None, f"task {task.id}: no row"
        return row

    def wait_settled(self, tasks: Sequence[Task], timeout: float) -> None:
        """Wait until none of *tasks* is `processing` any more."""

        def settled() -> bool:
            return all(row.status != PROCESSING for row in self.store.get_many([task.id for task in tasks]))

        def describe() -> str:
            rows = "\n".join(f"  {row}" for row in self.store.get_many([task.id for task in tasks]))
            return f"every task to settle\n{rows}\n{self.logs()}"

        wait_for(settled, timeout=timeout, interval=0.2, what=describe)

    # -- the common outcome -------------------------------------------------------------------

    def accepted(self) -> list[ReceivedWebhook]:
        return [item for receiver in self.receivers for item in receiver.accepted()]

    def event_ids(self, event_type: str) -> dict[int, set[str]]:
        """taskId -> distinct webhook ids of verified events of *event_type*."""
        return event_ids(self.accepted(), event_type)

    def assert_outcome(
        self,
        completed: Sequence[Task],
        failed: Sequence[Task] = (),
        settle_timeout: float = 90,
        webhook_timeout: float = 60,
    ) -> None:
        """Every paid task ends as it should; files verified; one webhook id per task; nothing
        fetched twice in full; no task left processing."""
        self.wait_settled([*completed, *failed], settle_timeout)
        for task in completed:
            row = self.row(task)
            assert row.status == COMPLETED, (row, self.logs())
            folder = self.download_dir / str(task.id)
            assert row.output_path == str(folder), row
            assert row.bytes == task.size, row
            for item in task.files:
                assert sha256_of(folder / item.rel) == item.sha256, f"task {task.id}: {item.rel} differs"
            assert not (self.download_dir / ".staging" / str(task.id)).exists(), f"task {task.id}: staging left"
        for task in failed:
            row = self.row(task)
            assert row.status == FAILED, (row, self.logs())
        assert self.store.ids_with_status(PROCESSING) == [], "a task was left processing"
        if "WEBHOOK_URL" in self.vars:
            self._assert_one_event_each(completed, failed, webhook_timeout)
        for task in [*completed, *failed]:
            for item in task.files:
                requests = self.origin.timed.for_path(item.url_path)
                again = [headers for _, headers in requests[1:] if "Range" not in headers]
                assert not again, f"task {task.id}: {item.rel} fetched in full {len(again) + 1} times"

    def _assert_one_event_each(self, completed: Sequence[Task], failed: Sequence[Task], timeout: float) -> None:
        """Exactly one verified download.completed (or .failed) webhook id per task, and not the other."""

        def delivered() -> bool:
            done = self.event_ids(EVENT_COMPLETED)
            gone = self.event_ids(EVENT_FAILED)
            return all(task.id in done for task in completed) and all(task.id in gone for task in failed)

        wait_for(delivered, timeout=timeout, interval=0.2, what=lambda: f"the webhooks\n{self.logs()}")
        completed_ids = self.event_ids(EVENT_COMPLETED)
        failed_ids = self.event_ids(EVENT_FAILED)
        for task in completed:
            assert len(completed_ids[task.id]) == 1, f"task {task.id}: completed ids {completed_ids[task.id]}"
            assert task.id not in failed_ids, f"task {task.id}: completed, yet a download.failed was sent"
        for task in failed:
            assert len(failed_ids[task.id]) == 1, f"task {task.id}: failed ids {failed_ids[task.id]}"
            assert task.id not in completed_ids, f"task {task.id}: failed, yet a download.completed was sent"

    # -- diagnostics and teardown ---------------------------------------------------------------

    def logs(self, tail: int = 3000) -> str:
        pools = [f"== {pool.log_path.name}\n{pool.log(4000)}" for pool in self.pools]
        return "\n".join([super().logs(tail), *pools])

    def log_text(self) -> str:
        """Every worker, reconciler and pool log, whole (for searching)."""
        texts = []
        if self.log_dir.is_dir():
            texts += [p.read_text(errors="replace") for p in sorted(self.log_dir.iterdir())]
        texts += [pool.log() for pool in self.pools]
        return "\n".join(texts)

    def run_spans(self, task: Task) -> list[tuple[int, float, float]]:
        """Each run of *task* the logs show: (horse pid, first and last time that process logged about
        the task), ordered by start. A run is a process that logged `task N: attempt ...`."""
        spans: dict[int, tuple[float, float]] = {}
        attempted: set[int] = set()
        for stamp, pid_text, task_text, message in TASK_LOG_LINE.findall(self.log_text()):
            if int(task_text) != task.id:
                continue
            pid = int(pid_text)
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            first, last = spans.get(pid, (at, at))
            spans[pid] = (min(first, at), max(last, at))
            if message.startswith("attempt "):
                attempted.add(pid)
        return sorted(((pid, *spans[pid]) for pid in attempted), key=lambda span: span[1])

    def leftovers(self, exclude: Sequence[int] = ()) -> list[tuple[int, str]]:
        return leftovers(MARKER, self.run_id, exclude)

    def cleanup(self) -> None:
        if self.scripts_used:
            try:
                self.stop_script(timeout=60)
            except (subprocess.SubprocessError, OSError):
                pass
        for pool in self.pools:
            pool.stop(timeout=15)
        server_pid = self.redis_server.process.pid if self.redis_server.process else 0
        kill_marked(MARKER, self.run_id, keep=[server_pid])
        self.redis.close()
