"""Shared fixtures: real Redis (DB 15) and MariaDB (`udemy_dl_test`), local origin and receiver, isolated settings.

A missing Redis or MariaDB skips the tests that need it with the reason shown, except under
CI (CI=true, =1, =yes...: see tests/ci.py), where it is a failure. Every test runs in its own
empty folder with the service's settings variables cleared, so neither the caller's environment
nor a `.env` in the checkout can leak in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from dev.devservers import ContentOrigin, WebhookReceiver
from tests.ci import in_ci as in_ci  # re-exported: test modules import it from here
from udemy_dl import context, producer
from udemy_dl.queues import worker_queues
from udemy_dl.settings import VARIABLES, Settings, get_settings
from udemy_dl.store import MySQLStore, SQLiteStore, TaskStore
from udemy_dl.webhooks import generate_secret

collect_ignore = [] if os.environ.get("UDEMY_DL_FAULTS") else ["faults", "hosts"]
"""The fault-injection suite is long: `make test-faults` runs it (UDEMY_DL_FAULTS=1), `make test` does not."""

T = TypeVar("T")
S = TypeVar("S", ContentOrigin, WebhookReceiver)

REDIS_TEST_URL = os.environ.get("UDEMY_DL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
"""Redis database the tests own: flushed before and after every test that uses it."""

MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
MYSQL_USER = "root"
MYSQL_TEST_DB = os.environ.get("UDEMY_DL_TEST_MYSQL_DB", "udemy_dl_test")
MYSQL_TEST_URL = f"mysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_TEST_DB}"

SETTING_VARIABLES = VARIABLES
"""Every variable the service reads; cleared before each test."""


# -- helpers ------------------------------------------------------------------------------------


def service_unavailable(service: str, detail: str) -> NoReturn:
    """Skip (laptop) or fail (CI=true) because *service* cannot be reached."""
    message = f"{service} not reachable: {detail}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(f"{message} (start it, or run with CI=true to make this a failure)")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> T:
    """Poll *predicate* until it returns something truthy, and return that; fail after *timeout* seconds.

    *what* describes the wait in the failure message; a callable is asked only on timeout (e.g. a worker log).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {description or predicate!r}")
        time.sleep(interval)


def reset_process_state() -> None:
    """Forget cached settings, the job context and the module-level producer."""
    producer.close()
    context.reset_context()


def cli_command() -> list[str]:
    """The installed `udemy-dl` script next to this interpreter, or `python -m udemy_dl`."""
    script = Path(sys.executable).with_name("udemy-dl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "udemy_dl"]


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


# -- environment --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Clear the service's variables, point folders into tmp_path, use Redis DB 15, run in tmp_path."""
    for name in SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", REDIS_TEST_URL)
    for variable, folder in (
        ("DOWNLOAD_DIR", "downloads"),
        ("FAILED_DIR", "failed"),
        ("LOG_DIR", "logs"),
        ("PID_DIR", "run"),
    ):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.chdir(tmp_path)
    reset_process_state()
    yield tmp_path
    reset_process_state()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Set environment variables for this test and return the settings the job code will now see."""

    def apply(**variables: str) -> Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        reset_process_state()
        return get_settings()

    return apply


# -- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    connection = Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        connection.ping()
    except Exception as exc:
        service_unavailable("Redis", f"{REDIS_TEST_URL}: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return REDIS_TEST_URL


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Redis]:
    """A client on Redis DB 15, flushed before and after the test."""
    connection = Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


# -- MariaDB / SQLite ---------------------------------------------------------------------------


def mysql_admin(statement: str) -> None:
    """Run one statement as the MariaDB root user (no database selected)."""
    import mysql.connector

    conn = mysql.connector.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="", connection_timeout=5, autocommit=True
    )
    try:
        cursor = conn.cursor()
        cursor.execute(statement)
        cursor.close()
    finally:
        conn.close()


def mysql_query(statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one query in the test database and return its rows."""
    import mysql.connector

    conn = mysql.connector.connect(
        host=MYSQL_HOST,
        port=MYSQL_PORT,
        user=MYSQL_USER,
        password="",
        database=MYSQL_TEST_DB,
        connection_timeout=5,
        autocommit=True,
    )
    try:
        cursor = conn.cursor()
        cursor.execute(statement, params)
        fetched: Any = cursor.fetchall() if cursor.description else []
        cursor.close()
        return [tuple(row) for row in fetched]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The test database `udemy_dl_test`, created once per session."""
    try:
        mysql_admin(f"CREATE DATABASE IF NOT EXISTS {MYSQL_TEST_DB} CHARACTER SET utf8mb4")
    except Exception as exc:
        service_unavailable("MariaDB", f"{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}: {type(exc).__name__}: {exc}")
    return MYSQL_TEST_URL


def drop_tasks_table() -> None:
    mysql_admin(f"DROP TABLE IF EXISTS {MYSQL_TEST_DB}.download_tasks")


@pytest.fixture
def mysql_store(mysql_url: str) -> Iterator[MySQLStore]:
    """A MySQLStore on a freshly created download_tasks table."""
    drop_tasks_table()
    store = MySQLStore(mysql_url)
    store.init_schema()
    yield store
    store.close()
    drop_tasks_table()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "x.db")
    store.init_schema()
    yield store
    store.close()


@dataclass
class Backend:
    """One status store under test, with the DATABASE_URL that names it."""

    name: str
    url: str
    store: TaskStore


@pytest.fixture(params=["mysql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each shared behaviour runs against MariaDB and against SQLite."""
    if request.param == "mysql":
        store: TaskStore = request.getfixturevalue("mysql_store")
        return Backend("mysql", MYSQL_TEST_URL, store)
    sqlite: SQLiteStore = request.getfixturevalue("sqlite_store")
    return Backend("sqlite", f"sqlite:///{sqlite.path}", sqlite)


# -- local HTTP servers -------------------------------------------------------------------------


def start_server(server: S) -> S:
    """Start a devservers server that checks for shutdown every 50 ms (the default 0.5 s slows each teardown)."""
    server.thread = threading.Thread(
        target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, name=type(server).__name__, daemon=True
    )
    server.start()
    return server


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[ContentOrigin]:
    server = start_server(ContentOrigin(tmp_path / "origin-root"))
    yield server
    server.stop()


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[ContentOrigin]:
    """A second origin, on a port ALLOWED_HOSTS does not list."""
    server = start_server(ContentOrigin(tmp_path / "other-root"))
    yield server
    server.stop()


@pytest.fixture
def webhook_secret() -> str:
    return generate_secret()


@pytest.fixture
def receiver(webhook_secret: str) -> Iterator[WebhookReceiver]:
    server = start_server(WebhookReceiver(webhook_secret))
    yield server
    server.stop()


# -- worker processes ---------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """PIDs whose parent is *pid*, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by *pid* (a work horse and anything it ran), or *pid* alone."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class WorkerProcess:
    """A `udemy-dl worker` subprocess started by a test."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: Any = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for a burst worker to finish; return its exit code."""
        return self.process.wait(timeout=timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """PIDs of the worker's live children: its work horse (own process group) and its scheduler."""
        return child_pids(self.process.pid)

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (horses run in their own process groups)."""
        children = self.children()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        for child in children:
            kill_group(child)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to its process group if it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def start_worker(tmp_path: Path, redis_conn: Redis) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real forking workers (`udemy-dl worker`) with this test's environment; stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(burst: bool = False) -> WorkerProcess:
        name = f"test-{uuid.uuid4().hex[:8]}"
        log_path = tmp_path / f"{name}.log"
        log = open(log_path, "wb")  # closed by WorkerProcess.stop
        command = [*cli_command(), "--log-level", "DEBUG", "worker", "--name", name]
        if burst:
            command.append("--burst")
        process = subprocess.Popen(
            command,
            env=dict(os.environ),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = WorkerProcess(name, process, log_path, log)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


# -- a Redis of a test's own ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PrivateRedis:
    """A redis-server of this test's own (no persistence), so it can be restarted without disturbing anyone."""

    binary: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(probe.ping())
            except RedisError:
                return False

        try:
            wait_for(answers, timeout=10, what=f"redis-server on port {self.port}")
        finally:
            probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        service_unavailable("redis-server", "not on PATH (needed to restart a Redis of the test's own)")
    server = PrivateRedis(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
