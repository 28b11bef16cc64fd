"""Fixtures for the end-to-end tests: real Redis (DB 14), real MariaDB (`udemy_dl_e2e`), the real scripts.

Every process a test starts carries `E2E_RUN_ID=<uuid>` in its environment, so teardown can find
and kill whatever is left (workers, work horses, schedulers) even when the scripts misbehave,
and a test can prove that nothing of its own outlived a stop.

A missing Redis or MariaDB skips these tests with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest
from redis import Redis

from dev.devservers import ContentOrigin, WebhookReceiver
from tests.ci import in_ci
from udemy_dl.settings import VARIABLES
from udemy_dl.store import MySQLStore
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import generate_secret

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO_ROOT / "start_workers.sh"
STOP_SCRIPT = REPO_ROOT / "stop_workers.sh"
UNIT_FILE = REPO_ROOT / "udemy-worker-rq.service"

E2E_REDIS_URL = os.environ.get("UDEMY_DL_E2E_REDIS_URL", "redis://127.0.0.1:6379/14")
E2E_MYSQL_HOST = "127.0.0.1"
E2E_MYSQL_PORT = 3306
E2E_DB_NAME = os.environ.get("UDEMY_DL_E2E_MYSQL_DB", "udemy_dl_e2e")
E2E_DATABASE_URL = f"mysql://root@{E2E_MYSQL_HOST}:{E2E_MYSQL_PORT}/{E2E_DB_NAME}"
E2E_HOSTNAME = socket.gethostname()
E2E_MARKER = "E2E_RUN_ID"

E2E_SETTING_VARIABLES = VARIABLES
"""Variables the service and its scripts read: never inherited from the caller, only set by the test."""


# -- small helpers ------------------------------------------------------------------------------


def e2e_unavailable(what: str, detail: str) -> NoReturn:
    """Skip (a developer's machine) or fail (CI=true) because *what* is missing."""
    message = f"{what} not available: {detail}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing service or tool is a failure)", pytrace=False)
    pytest.skip(f"{message} (start it, or run with CI=true to make this a failure)")


def e2e_wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll *predicate* until it returns something truthy and return that; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def e2e_bin(name: str) -> Path:
    """A console script of the repo's venv (what the scripts use), else the one next to this Python."""
    candidate = REPO_ROOT / ".venv" / "bin" / name
    return candidate if candidate.is_file() else Path(sys.executable).with_name(name)


def e2e_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


# -- processes (read from /proc: no third-party dependency) ------------------------------------


def e2e_proc_state(pid: int) -> str | None:
    """The state letter of *pid* (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def e2e_pid_running(pid: int) -> bool:
    """True while *pid* exists and is not a zombie waiting to be reaped."""
    state = e2e_proc_state(pid)
    return state is not None and state != "Z"


def e2e_pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[2])


def e2e_work_horses(worker_pid: int) -> list[int]:
    """The worker's running work horses: RQ forks each into its own process group (its scheduler child is not)."""
    return [pid for pid in e2e_children(worker_pid) if e2e_pgid(pid) == pid and e2e_pid_running(pid)]


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def e2e_parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def e2e_children(pid: int) -> list[int]:
    return [candidate for candidate in _all_pids() if e2e_parent(candidate) == pid]


def e2e_descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in e2e_children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def e2e_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def e2e_marked_pids(run_id: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries this test's marker."""
    needle = f"{E2E_MARKER}={run_id}".encode()
    found = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and e2e_pid_running(pid):
            found.append(pid)
    return found


def e2e_kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def e2e_kill_tree(pid: int) -> list[int]:
    """SIGKILL *pid*, then everything it had started (listed before the kill); return them all.

    The parent goes first, as in a crash: a worker must not get to see its work horse die.
    """
    family = [pid, *e2e_descendants(pid)]
    for member in family:
        e2e_kill(member)
    return family


PR_SET_CHILD_SUBREAPER = 36


def e2e_set_child_subreaper(enabled: bool) -> None:
    """Make this process adopt orphaned descendants (Linux prctl), as the PID 1 of a container does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


# -- services -----------------------------------------------------------------------------------


def _mysql_admin(statement: str) -> None:
    import mysql.connector

    conn = mysql.connector.connect(
        host=E2E_MYSQL_HOST, port=E2E_MYSQL_PORT, user="root", password="", connection_timeout=5, autocommit=True
    )
    try:
        cursor = conn.cursor()
        cursor.execute(statement)
        cursor.close()
    finally:
        conn.close()


@pytest.fixture(scope="session")
def e2e_services() -> None:
    """Redis and MariaDB answer, and the e2e database exists (skip or, under CI=true, fail)."""
    connection = Redis.from_url(E2E_REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        connection.ping()
    except Exception as exc:
        e2e_unavailable("Redis", f"{E2E_REDIS_URL}: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    try:
        _mysql_admin(f"CREATE DATABASE IF NOT EXISTS {E2E_DB_NAME} CHARACTER SET utf8mb4")
    except Exception as exc:
        e2e_unavailable("MariaDB", f"root@{E2E_MYSQL_HOST}:{E2E_MYSQL_PORT}: {type(exc).__name__}: {exc}")
    if not Path("/proc/self/stat").is_file():
        e2e_unavailable("/proc", "these tests read process state from /proc (Linux)")
    if not e2e_bin("udemy-dl").is_file():
        e2e_unavailable("udemy-dl", f"no console script at {e2e_bin('udemy-dl')} (run 'make install')")


@pytest.fixture
def e2e_redis(e2e_services: None) -> Iterator[Redis]:
    """A client on Redis DB 14, flushed before and after the test."""
    connection = Redis.from_url(E2E_REDIS_URL)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def e2e_store(e2e_services: None, tmp_path: Path) -> Iterator[MySQLStore]:
    """A fresh download_tasks table in `udemy_dl_e2e`, created by `udemy-dl db init`."""
    _mysql_admin(f"DROP TABLE IF EXISTS {E2E_DB_NAME}.download_tasks")
    env = _clean_environ()
    env["DATABASE_URL"] = E2E_DATABASE_URL
    done = subprocess.run(
        [str(e2e_bin("udemy-dl")), "db", "init"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"udemy-dl db init failed: {done.stdout}{done.stderr}"
    store = MySQLStore(E2E_DATABASE_URL)
    yield store
    store.close()
    _mysql_admin(f"DROP TABLE IF EXISTS {E2E_DB_NAME}.download_tasks")


# -- local HTTP servers -------------------------------------------------------------------------


class E2EOrigin(ContentOrigin):
    """The dev content origin (bearer token required), with two lookups the tests use."""

    def file_path(self, url_path: str) -> Path:
        """The file on disk behind a /files/... URL path."""
        return self.root / url_path.lstrip("/")

    def count(self, url_path: str) -> int:
        return sum(1 for path in self.requests.paths() if path == url_path)


@pytest.fixture
def e2e_origin(tmp_path: Path) -> Iterator[E2EOrigin]:
    origin = E2EOrigin(tmp_path / "origin", token=secrets.token_urlsafe(24))
    origin.start()
    yield origin
    origin.throttle = None
    origin.stop()


@pytest.fixture
def e2e_secret() -> str:
    return generate_secret()


@pytest.fixture
def e2e_receiver(e2e_secret: str) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(e2e_secret)
    receiver.start()
    yield receiver
    receiver.stop()


def e2e_completed_ids(receiver: WebhookReceiver) -> dict[int, set[str]]:
    """taskId -> the distinct webhook ids of verified download.completed events."""
    found: dict[int, set[str]] = {}
    for item in receiver.accepted():
        if item.event_type == EVENT_COMPLETED:
            found.setdefault(int(item.body["data"]["taskId"]), set()).add(item.webhook_id)
    return found


# -- the environment the scripts and workers run with ------------------------------------------


def _clean_environ() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in E2E_SETTING_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class E2EEnv:
    """The environment one test's scripts and workers run with (environment variables win over .env)."""

    tmp: Path
    run_id: str
    vars: dict[str, str]

    @property
    def download_dir(self) -> Path:
        return Path(self.vars["DOWNLOAD_DIR"])

    @property
    def pid_dir(self) -> Path:
        return Path(self.vars["PID_DIR"])

    @property
    def log_dir(self) -> Path:
        return Path(self.vars["LOG_DIR"])

    def with_vars(self, **extra: str) -> dict[str, str]:
        return {**self.vars, **extra}

    def cli(self, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run `udemy-dl ARGS` (the venv's console script) with this environment."""
        return subprocess.run(
            [str(e2e_bin("udemy-dl")), *args],
            env=self.with_vars(**extra),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

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

    def logs(self) -> str:
        """Every worker log, for assertion messages."""
        if not self.log_dir.is_dir():
            return "(no logs)"
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.log_dir.iterdir())
        )

    def leftover_processes(self) -> list[int]:
        return e2e_marked_pids(self.run_id)


@pytest.fixture
def e2e_env(
    tmp_path: Path,
    e2e_redis: Redis,
    e2e_store: MySQLStore,
    e2e_origin: E2EOrigin,
    e2e_receiver: WebhookReceiver,
    e2e_secret: str,
) -> Iterator[E2EEnv]:
    """Settings for this test, all folders in tmp_path; at teardown, anything still running is killed."""
    run_id = uuid.uuid4().hex
    env = _clean_environ()
    env.update(
        {
            E2E_MARKER: run_id,
            "REDIS_URL": E2E_REDIS_URL,
            "DATABASE_URL": E2E_DATABASE_URL,
            "ALLOWED_HOSTS": e2e_origin.host_port,
            "CONTENT_TOKEN": e2e_origin.token or "",
            "API_SECRET_KEY": e2e_secret,
            "WEBHOOK_URL": e2e_receiver.url,
            "WORKER_COUNT": "2",
            "STOP_TIMEOUT": "10",
            "RETRY_DELAY": "1",
            "DOWNLOAD_DIR": str(tmp_path / "downloads"),
            "FAILED_DIR": str(tmp_path / "failed"),
            "LOG_DIR": str(tmp_path / "logs"),
            "PID_DIR": str(tmp_path / "run"),
        }
    )
    if not (REPO_ROOT / ".venv" / "bin" / "udemy-dl").is_file():
        env["UDEMY_DL_BIN"] = str(e2e_bin("udemy-dl"))
    e2e = E2EEnv(tmp=tmp_path, run_id=run_id, vars=env)
    yield e2e
    # Last resort: whatever this test started and is still alive goes now.
    for _ in range(3):
        left = e2e.leftover_processes()
        if not left:
            break
        for pid in left:
            e2e_kill_tree(pid)
        e2e_wait_for(lambda: not e2e.leftover_processes(), timeout=10, what="leftover processes to die")


@dataclass
class E2EScripts:
    """start_workers.sh / stop_workers.sh, run from the repo root with a test's environment."""

    env: E2EEnv
    seen_pids: set[int] = field(default_factory=set)
    adopted: set[int] = field(default_factory=set)

    def _run(self, script: Path, timeout: float, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script)],
            env=self.env.with_vars(**extra),
            cwd=self.env.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 60, adopt: bool = False, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run start_workers.sh. With *adopt*, the workers it leaves behind become this process's children
        (as they would be a container PID 1's), so the test decides when a killed one is reaped."""
        if adopt:
            e2e_set_child_subreaper(True)
        try:
            return self._run(START_SCRIPT, timeout, extra)
        finally:
            if adopt:
                e2e_set_child_subreaper(False)
            for pid in self.pids().values():
                self.seen_pids.add(pid)
                if adopt and e2e_parent(pid) == os.getpid():
                    self.adopted.add(pid)

    def stop(self, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        return self._run(STOP_SCRIPT, timeout, extra)

    def reap(self, pid: int) -> None:
        """Collect an adopted worker that has died (blocks until it has)."""
        if pid in self.adopted:
            self.adopted.discard(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def pid_files(self) -> list[Path]:
        pid_dir = self.env.pid_dir
        return sorted(pid_dir.glob("rq_worker_*.pid")) if pid_dir.is_dir() else []

    def pids(self) -> dict[int, int]:
        """Worker number -> pid, from the PID files."""
        found = {}
        for pid_file in self.pid_files():
            text = pid_file.read_text().strip()
            if text.isdigit():
                found[int(pid_file.stem.rsplit("_", 1)[1])] = int(text)
        return found

    def cleanup(self) -> None:
        """Stop the workers however it takes: the stop script, then SIGKILL to what the PID files named."""
        try:
            self.stop(timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        for pid in {*self.seen_pids, *self.pids().values()}:
            if e2e_pid_running(pid) and "udemy" in e2e_cmdline(pid):
                e2e_kill_tree(pid)
        for pid in list(self.adopted):
            self.reap(pid)
        for pid_file in self.pid_files():
            pid_file.unlink(missing_ok=True)


@pytest.fixture
def e2e_scripts(e2e_env: E2EEnv) -> Iterator[E2EScripts]:
    scripts = E2EScripts(e2e_env)
    yield scripts
    scripts.cleanup()


def e2e_rq_info_workers(rq_info: str) -> dict[str, int]:
    """This host's udemy-dl workers in `rq info` output: name -> pid.

    A worker line reads `udemy-dl.<host>.<n> (<host> <ip:port> <pid>): idle webhooks, downloads. ...`.
    """
    pattern = re.compile(rf"^(udemy-dl\.{re.escape(E2E_HOSTNAME)}\.\d+) \(\S+ \S+ (\d+)\): ", re.MULTILINE)
    return {name: int(pid) for name, pid in pattern.findall(rq_info)}


def e2e_worker_pids_by_name(run_id: str) -> dict[str, list[int]]:
    """`pgrep -f "udemy-dl worker"` restricted to this test's processes: worker name -> pids (horses included)."""
    done = subprocess.run(["pgrep", "-f", "udemy-dl worker --name"], capture_output=True, text=True, timeout=10)
    mine = set(e2e_marked_pids(run_id))
    found: dict[str, list[int]] = {}
    for raw in done.stdout.split():
        pid = int(raw)
        if pid not in mine:
            continue
        parts = e2e_cmdline(pid).split()
        if "--name" in parts:
            found.setdefault(parts[parts.index("--name") + 1], []).append(pid)
    return found
