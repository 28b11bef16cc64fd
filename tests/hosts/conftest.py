"""Fixtures for the multi-host suite: two "hosts" on one Redis and one MariaDB, and a Redis
Sentinel group that fails over.

Two hosts (`two_hosts`, module scope):

- network namespaces `udl-host-a` and `udl-host-b`, each joined to the root namespace by a veth
  pair (10.213.1.0/24 and 10.213.2.0/24). Inside each, the root side of its own link answers to
  the names redis.internal, db.internal, origin.internal and hooks.internal
  (/etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts): both hosts run with one
  configuration, as the servers of one site do, and each reaches the services over its own link;
- in the root namespace: a redis-server bound to the two root-side addresses (and loopback, for
  the test itself), and TCP relays on those addresses to MariaDB (127.0.0.1:3306), the content
  origin and the webhook receiver (both on loopback);
- each host runs the real start_workers.sh through
  `ip netns exec <ns> unshare --uts sh -c 'hostname host-x && exec start_workers.sh'`, so it has
  its own hostname (workers `udemy-dl.host-a.N`, one reconciler per host) and its own PID_DIR,
  LOG_DIR and DOWNLOAD_DIR.

Sentinel (`sentinel_group`, per test): a master, one replica (`--replicaof`) and three Sentinels
(`redis-server sentinel.conf --sentinel`, quorum 2, down-after 1 s) on loopback ports, each with
its folder (Sentinels rewrite their config file) in the test's tmp dir.

Every process a test starts carries HOSTS_RUN_ID=<uuid> in its environment; teardown kills every
process in the namespaces and every marked process, then removes the veths, the namespaces and
/etc/netns/<ns>, also when the test failed. The suite holds a file lock while it runs (namespace
names and subnets are machine-wide) and first clears what an earlier run killed mid-way left.

Only collected with UDEMY_DL_FAULTS set (the suite is slow: `make test-faults`). A missing tool
(`ip`, `unshare`, redis-server), not being root, or no MariaDB skips, except under CI=true, where
it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from dev.devservers import WebhookReceiver
from tests.conftest import mysql_admin, start_server, wait_for
from tests.e2e.conftest import (
    E2E_SETTING_VARIABLES,
    REPO_ROOT,
    START_SCRIPT,
    STOP_SCRIPT,
    e2e_bin,
    e2e_cmdline,
    e2e_pid_running,
    e2e_sha256,
    e2e_unavailable,
)
from tests.faults.conftest import CourseFile, FaultOrigin, Task, free_port
from udemy_dl.store import PROCESSING, MySQLStore, TaskRow
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import generate_secret

collect_ignore_glob = [] if os.environ.get("UDEMY_DL_FAULTS") else ["test_*.py"]
"""Slow (network namespaces, Sentinel failover, a host's workers expiring): only with UDEMY_DL_FAULTS=1."""

MARKER = "HOSTS_RUN_ID"
"""Environment variable carried by every process the suite starts (value: a uuid per world)."""

HOSTS_DB = os.environ.get("UDEMY_DL_HOSTS_MYSQL_DB", "udemy_dl_hosts")
MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
DIRECT_DATABASE_URL = f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{HOSTS_DB}"
"""The test's own view of the database (hosts reach it through the relay)."""

LOCK_FILE = Path(tempfile.gettempdir()) / "udemy-dl-hosts.lock"
LOCK_WAIT = 900.0
"""Seconds to wait for another run of this suite on the machine to finish."""

NETNS_ETC = Path("/etc/netns")
SERVICE_NAMES = ("redis.internal", "db.internal", "origin.internal", "hooks.internal")
"""Names each host resolves to the root side of its own link."""

MASTER_NAME = "mymaster"

CLEARED_VARIABLES = (
    *E2E_SETTING_VARIABLES,
    "WEBHOOK_RETRY_INTERVALS",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_SENTINEL_PASSWORD",
    "RQ_REDIS_URL",
    "RQ_CONFIG",
    "E2E_RUN_ID",
    "FAULTS_RUN_ID",
    MARKER,
)
"""Never inherited from the caller: only what a test sets reaches the service."""

RQ_INFO_WORKER = re.compile(r"^(udemy-dl\.\S+) \((\S+) \S+ (\d+)\): ", re.MULTILINE)
"""A worker line of `rq info`: `<name> (<hostname> <ip:port> <pid>): <state> <queues>...`."""


# -- small helpers ------------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    if not (REPO_ROOT / ".venv" / "bin" / "udemy-dl").is_file():
        env["UDEMY_DL_BIN"] = str(e2e_bin("udemy-dl"))
    return env


def run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a system command (ip, ...); with *check*, fail with its output."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def marked_pids(run_id: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries *run_id* under MARKER."""
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


def kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill_marked(run_id: str, keep: Sequence[int] = (), timeout: float = 15) -> None:
    """SIGKILL every process of *run_id* (but *keep*) until none is left."""
    deadline = time.monotonic() + timeout
    while left := [pid for pid in marked_pids(run_id) if pid not in keep]:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes survive SIGKILL: {[(pid, e2e_cmdline(pid)) for pid in left]}")
        kill_pids(left)
        time.sleep(0.1)


def sentinel_command(client: Redis, *args: str) -> Any:
    """`SENTINEL <args>` (raw reply: redis-py's sentinel helpers are untyped)."""
    return client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]


def sha256_file(path: Path) -> str:
    return e2e_sha256(path)


# -- measurements, printed at the end of the session ---------------------------------------------


@dataclass(frozen=True)
class Measurement:
    scenario: str
    metric: str
    seconds: float
    note: str = ""


MEASUREMENTS = pytest.StashKey[list[Measurement]]()


def record(config: pytest.Config, scenario: str, metric: str, seconds: float, note: str = "") -> float:
    """Print a measured time and keep it for the table at the end of the session."""
    config.stash.setdefault(MEASUREMENTS, []).append(Measurement(scenario, metric, seconds, note))
    print(f"[hosts] {scenario}: {metric} = {seconds:.1f} s{' - ' + note if note else ''}")
    return seconds


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    items = config.stash.get(MEASUREMENTS, [])
    if not items:
        return
    terminalreporter.write_sep("=", "several hosts: measured times")
    width = max(len(item.scenario) for item in items)
    metric_width = max(len(item.metric) for item in items)
    for item in items:
        terminalreporter.write_line(
            f"{item.scenario:<{width}}  {item.metric:<{metric_width}}  {item.seconds:>7.1f} s  {item.note}"
        )


# -- capabilities -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hosts_lock() -> Iterator[None]:
    """One run of this suite per machine at a time (namespace names and subnets are machine-wide)."""
    with open(LOCK_FILE, "a") as handle:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run of tests/hosts holds {LOCK_FILE} for more than {LOCK_WAIT:g} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """redis-server 7 from PATH (it runs the Sentinels too, with --sentinel)."""
    binary = shutil.which("redis-server")
    if binary is None:
        e2e_unavailable("redis-server", "not on PATH")
    if not e2e_bin("udemy-dl").is_file():
        e2e_unavailable("udemy-dl", f"no console script at {e2e_bin('udemy-dl')} (run 'make install')")
    return binary


@pytest.fixture(scope="session")
def hosts_database(hosts_lock: None) -> Iterator[str]:
    """The database `udemy_dl_hosts` on the machine's MariaDB, dropped at the end of the session."""
    try:
        mysql_admin(f"CREATE DATABASE IF NOT EXISTS {HOSTS_DB} CHARACTER SET utf8mb4")
    except Exception as exc:
        e2e_unavailable("MariaDB", f"root@{MYSQL_HOST}:{MYSQL_PORT}: {type(exc).__name__}: {exc}")
    yield HOSTS_DB
    with contextlib.suppress(Exception):
        mysql_admin(f"DROP DATABASE IF EXISTS {HOSTS_DB}")


def fresh_store() -> Iterator[MySQLStore]:
    """A fresh download_tasks table in `udemy_dl_hosts` (the test's direct connection), dropped after."""
    mysql_admin(f"DROP TABLE IF EXISTS {HOSTS_DB}.download_tasks")
    store = MySQLStore(DIRECT_DATABASE_URL)
    store.init_schema()
    try:
        yield store
    finally:
        store.close()
        mysql_admin(f"DROP TABLE IF EXISTS {HOSTS_DB}.download_tasks")


@pytest.fixture(scope="session")
def netns_tools(hosts_lock: None) -> None:
    """Root, Linux, `ip` (iproute2) and `unshare`, and `ip netns add` works here."""
    if not sys.platform.startswith("linux"):
        e2e_unavailable("network namespaces", f"Linux only, this is {sys.platform}")
    if os.geteuid() != 0:
        e2e_unavailable("root", "network namespaces and veth pairs need root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            e2e_unavailable(tool, "not on PATH (install iproute2 / util-linux)")
    probe = f"udl-probe-{os.getpid()}"
    done = run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        e2e_unavailable("ip netns", f"cannot create a network namespace: {done.stderr.strip()}")
    run(["ip", "netns", "del", probe], check=False)
    for net in HOST_NETS:  # left by a run killed before its teardown
        net.remove()


# -- Redis processes ------------------------------------------------------------------------------


class RedisProcess:
    """One redis-server (a server or a Sentinel) child process, its output in `<folder>/log`."""

    def __init__(self, argv: Sequence[str], port: int, folder: Path, env: dict[str, str]) -> None:
        self.argv = list(argv)
        self.port = port
        self.folder = folder
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def server(
        cls, binary: str, folder: Path, env: dict[str, str], bind: Sequence[str] = ("127.0.0.1",), *extra: str
    ) -> RedisProcess:
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", *bind, "--protected-mode", "no"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(folder), *extra]
        return cls(argv, port, folder, env)

    @classmethod
    def sentinel(cls, binary: str, folder: Path, env: dict[str, str], master_port: int) -> RedisProcess:
        port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {folder}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        return cls([binary, str(conf), "--sentinel"], port, folder, env)

    def client(self, timeout: float = 5) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=timeout)

    def start(self, timeout: float = 15) -> None:
        with open(self.folder / "log", "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
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

        wait_for(answers, timeout=timeout, interval=0.05, what=lambda: f"redis on port {self.port}\n{self.log()}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else "(no log)"


# -- TCP relays from the hosts' links to services on loopback ------------------------------------


class Relay:
    """Listens on the same port of each of *addresses* and forwards every connection to *target*.

    Counts connections per address they arrived on, so a test can show each host used its own link.
    """

    def __init__(self, name: str, addresses: Sequence[str], target: tuple[str, int]) -> None:
        self.name = name
        self.addresses = list(addresses)
        self.target = target
        self.port = 0
        self.arrivals: Counter[str] = Counter()
        self._listeners: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> Relay:
        for _ in range(50):
            port = free_port()
            listeners: list[socket.socket] = []
            try:
                for address in self.addresses:
                    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    listeners.append(listener)
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind((address, port))
                    listener.listen(128)
                    listener.settimeout(0.1)
            except OSError:
                for listener in listeners:
                    listener.close()
                continue
            self.port = port
            self._listeners = listeners
            break
        else:
            raise RuntimeError(f"relay {self.name}: no port free on all of {self.addresses}")
        for listener in self._listeners:
            threading.Thread(target=self._accept_loop, args=(listener,), name=f"relay-{self.name}", daemon=True).start()
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        address = str(listener.getsockname()[0])
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
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
                if self._stopped.is_set():
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
                self.arrivals[address] += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name=f"relay-{self.name}", daemon=True).start()

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
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def stop(self) -> None:
        self._stopped.set()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            self._drop(sock)


# -- the hosts' network -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostNet:
    """One host's network namespace and its veth link to the root namespace."""

    letter: str
    subnet: int

    @property
    def netns(self) -> str:
        return f"udl-host-{self.letter}"

    @property
    def hostname(self) -> str:
        return f"host-{self.letter}"

    @property
    def veth_root(self) -> str:
        return f"udl-{self.letter}-root"

    @property
    def veth_host(self) -> str:
        return f"udl-{self.letter}-host"

    @property
    def root_ip(self) -> str:
        """The root namespace's side of the link: where this host finds Redis, MariaDB, the origin..."""
        return f"10.213.{self.subnet}.1"

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.subnet}.2"

    def exists(self) -> bool:
        return self.netns in run(["ip", "netns", "list"], check=False).stdout.split()

    def pids(self) -> list[int]:
        """Every process in the namespace (`ip netns pids`)."""
        if not self.exists():
            return []
        done = run(["ip", "netns", "pids", self.netns], check=False)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def kill_everything(self, timeout: float = 15) -> list[int]:
        """SIGKILL every process in the namespace until none is left (a worker may fork meanwhile)."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.netns}: processes survive SIGKILL: {pids}")
            kill_pids(pids)
            killed += [pid for pid in pids if pid not in killed]
            time.sleep(0.05)
        return killed

    def create(self) -> None:
        commands = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.veth_root, "type", "veth", "peer", "name", self.veth_host, "netns", self.netns],
            ["ip", "addr", "add", f"{self.root_ip}/24", "dev", self.veth_root],
            ["ip", "link", "set", self.veth_root, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.host_ip}/24", "dev", self.veth_host],
            ["ip", "-n", self.netns, "link", "set", self.veth_host, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]
        for command in commands:
            run(command)
        folder = NETNS_ETC / self.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {self.hostname}\n{self.root_ip} {' '.join(SERVICE_NAMES)}\n"
        )

    def remove(self) -> None:
        """Kill what runs in the namespace, delete the veth pair and the namespace, and /etc/netns/<ns>."""
        with contextlib.suppress(AssertionError):
            self.kill_everything()
        run(["ip", "link", "del", self.veth_root], check=False)
        if self.exists():
            run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(NETNS_ETC / self.netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty: someone else's namespaces keep theirs


HOST_NETS = (HostNet("a", 1), HostNet("b", 2))


@dataclass
class Host:
    """A server of the site: a namespace with its own hostname, folders and start_workers.sh."""

    net: HostNet
    folder: Path
    env: dict[str, str]

    @property
    def hostname(self) -> str:
        return self.net.hostname

    @property
    def worker_prefix(self) -> str:
        return f"udemy-dl.{self.hostname}."

    @property
    def download_dir(self) -> Path:
        return Path(self.env["DOWNLOAD_DIR"])

    @property
    def log_dir(self) -> Path:
        return Path(self.env["LOG_DIR"])

    @property
    def pid_dir(self) -> Path:
        return Path(self.env["PID_DIR"])

    def command(self, *argv: str) -> list[str]:
        """*argv* run on this host: in its network namespace, with its own hostname."""
        inner = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.net.netns, "unshare", "--uts", "sh", "-c", inner, self.hostname, *argv]

    def run(self, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv), env=self.env, cwd=self.folder, capture_output=True, text=True, timeout=timeout
        )

    def start_workers(self, count: int) -> dict[int, int]:
        """start_workers.sh on this host with WORKER_COUNT=*count*; returns worker number -> pid."""
        self.env["WORKER_COUNT"] = str(count)
        done = self.run(str(START_SCRIPT))
        assert done.returncode == 0, f"{self.hostname}: start_workers.sh: {done.stdout}{done.stderr}\n{self.logs()}"
        pids = {}
        for pid_file in sorted(self.pid_dir.glob("rq_worker_*.pid")):
            pids[int(pid_file.stem.rsplit("_", 1)[1])] = int(pid_file.read_text().strip())
        assert len(pids) == count, (pids, done.stdout)
        return pids

    def stop_workers(self) -> subprocess.CompletedProcess[str]:
        return self.run(str(STOP_SCRIPT), timeout=60)

    def logs(self) -> str:
        if not self.log_dir.is_dir():
            return f"== {self.hostname}: (no logs)"
        return "\n".join(
            f"== {self.hostname}/{p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.iterdir())
        )


class TwoHosts:
    """Hosts A and B on one Redis and one MariaDB, with the content origin and the webhook receiver."""

    def __init__(
        self,
        tmp: Path,
        run_id: str,
        redis: RedisProcess,
        relays: dict[str, Relay],
        origin: FaultOrigin,
        receiver: WebhookReceiver,
        secret: str,
        store: MySQLStore,
    ) -> None:
        self.tmp = tmp
        self.run_id = run_id
        self.redis_server = redis
        self.relays = relays
        self.origin = origin
        self.receiver = receiver
        self.secret = secret
        self.store = store
        self.redis = redis.client(timeout=10)
        shared = {
            MARKER: run_id,
            "REDIS_URL": f"redis://redis.internal:{redis.port}/0",
            "DATABASE_URL": f"mysql://root@db.internal:{relays['db'].port}/{HOSTS_DB}",
            "ALLOWED_HOSTS": f"origin.internal:{relays['origin'].port}",
            "CONTENT_TOKEN": origin.token or "",
            "API_SECRET_KEY": secret,
            "WEBHOOK_URL": f"http://hooks.internal:{relays['hooks'].port}/webhooks/downloads",
            "STOP_TIMEOUT": "10",
            "RETRY_DELAY": "1",
            "MAX_ATTEMPTS": "3",
        }
        self.hosts: dict[str, Host] = {}
        for net in HOST_NETS:
            folder = tmp / net.hostname
            folder.mkdir(parents=True, exist_ok=True)
            env = {**clean_environ(), **shared}
            for variable, name in (
                ("DOWNLOAD_DIR", "downloads"),
                ("FAILED_DIR", "failed"),
                ("LOG_DIR", "logs"),
                ("PID_DIR", "run"),
            ):
                env[variable] = str(folder / name)
            self.hosts[net.letter] = Host(net, folder, env)
        self.root_env = {
            **clean_environ(),
            **shared,
            "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
            "DATABASE_URL": DIRECT_DATABASE_URL,
        }
        """The payment service's view, from the root namespace."""

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    @property
    def origin_base(self) -> str:
        """The content origin as every host names it."""
        return f"http://origin.internal:{self.relays['origin'].port}"

    # -- tasks ------------------------------------------------------------------------------

    def make_tasks(self, count: int, size: int, prefix: str = "course") -> list[Task]:
        """*count* one-file courses of *size* bytes, and a `pending` row per course."""
        tasks = []
        for n in range(count):
            slug = f"{prefix}-{n + 1}"
            self.origin.add_course(slug, {"lecture.mp4": size})
            url = f"{self.origin_base}/courses/{slug}"
            entry = self.origin.manifests[f"/courses/{slug}"]["files"][0]
            files = (CourseFile(entry["path"], entry["url"], entry["sha256"], entry["size"]),)
            tasks.append(Task(self.store.insert_task(f"buyer-{prefix}-{n + 1}@example.com", url), url, files))
        return tasks

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`udemy-dl ARGS` from the root namespace (the payment service's side)."""
        return subprocess.run(
            [str(e2e_bin("udemy-dl")), *args],
            env=self.root_env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pay(self, tasks: Sequence[Task], priority: str = "normal") -> None:
        done = self.cli("confirm-payment", "--json", "--priority", priority, *(str(task.id) for task in tasks))
        assert done.returncode == 0, done.stdout + done.stderr

    def rows(self, tasks: Sequence[Task]) -> dict[int, TaskRow]:
        return {row.id: row for row in self.store.get_many([task.id for task in tasks])}

    def job(self, task: Task) -> Job | None:
        try:
            return Job.fetch(f"download-{task.id}", connection=self.redis)
        except NoSuchJobError:
            return None

    def rq_info(self) -> str:
        """`rq info --url` from the root namespace, through host A's link address."""
        url = f"redis://{self.a.net.root_ip}:{self.redis_server.port}/0"
        done = subprocess.run(
            [str(e2e_bin("rq")), "info", "--url", url], env=clean_environ(), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"rq info failed: {done.stdout}{done.stderr}"
        return done.stdout

    def rq_info_workers(self) -> dict[str, str]:
        """The udemy-dl workers `rq info` lists: name -> hostname."""
        return {name: host for name, host, _ in RQ_INFO_WORKER.findall(self.rq_info())}

    def completed_ids(self) -> dict[int, set[str]]:
        """taskId -> distinct webhook ids of verified download.completed events."""
        found: dict[int, set[str]] = {}
        for item in self.receiver.accepted():
            if item.event_type == EVENT_COMPLETED:
                found.setdefault(int(item.body["data"]["taskId"]), set()).add(item.webhook_id)
        return found

    def processing_ids(self) -> list[int]:
        return self.store.ids_with_status(PROCESSING)

    def logs(self) -> str:
        return "\n".join(host.logs() for host in self.hosts.values())

    def cleanup(self) -> None:
        for host in self.hosts.values():
            if host.net.pids():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    host.stop_workers()
        for net in HOST_NETS:
            net.remove()
        server_pid = self.redis_server.process.pid if self.redis_server.process else 0
        kill_marked(self.run_id, keep=[server_pid])
        self.redis.close()


@pytest.fixture(scope="module")
def two_hosts(
    netns_tools: None, redis_binary: str, hosts_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoHosts]:
    """Hosts A and B (namespaces, veths, names), with Redis, relays, origin, receiver and a fresh table."""
    tmp = tmp_path_factory.mktemp("two-hosts")
    run_id = uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        for net in HOST_NETS:
            stack.callback(net.remove)
            net.create()
        addresses = [net.root_ip for net in HOST_NETS]
        redis = RedisProcess.server(
            redis_binary, tmp / "redis", {**clean_environ(), MARKER: run_id}, (*addresses, "127.0.0.1")
        )
        stack.callback(redis.kill)
        redis.start()
        store = stack.enter_context(contextlib.contextmanager(fresh_store)())
        origin = FaultOrigin(tmp / "origin", token=uuid.uuid4().hex)
        start_server(origin)
        stack.callback(origin.stop)
        secret = generate_secret()
        receiver = start_server(WebhookReceiver(secret))
        stack.callback(receiver.stop)
        relays = {
            "db": Relay("db", addresses, (MYSQL_HOST, MYSQL_PORT)),
            "origin": Relay("origin", addresses, ("127.0.0.1", int(origin.server.server_address[1]))),
            "hooks": Relay("hooks", addresses, ("127.0.0.1", int(receiver.server.server_address[1]))),
        }
        for relay in relays.values():
            relay.start()
            stack.callback(relay.stop)
        world = TwoHosts(tmp, run_id, redis, relays, origin, receiver, secret, store)
        stack.callback(world.cleanup)
        yield world


# -- a Sentinel group -----------------------------------------------------------------------------


@dataclass
class SentinelGroup:
    """A master, one replica and three Sentinels watching them (quorum 2), all on loopback."""

    master: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess] = field(default_factory=list)

    @property
    def sentinels_setting(self) -> str:
        """REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it (`get-master-addr-by-name`)."""
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            client = sentinel.client(timeout=2)
            try:
                reply = sentinel_command(client, "get-master-addr-by-name", MASTER_NAME)
            except Exception:
                continue
            finally:
                client.close()
            if reply:
                return int(reply[1])
        return None

    def wait_ready(self, timeout: float = 30) -> None:
        """Each Sentinel knows the replica and the two other Sentinels, and can authorise a failover."""

        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client(timeout=2)
                try:
                    replicas = sentinel_command(client, "replicas", MASTER_NAME)
                    others = sentinel_command(client, "sentinels", MASTER_NAME)
                    sentinel_command(client, "ckquorum", MASTER_NAME)
                except Exception:
                    return False
                finally:
                    client.close()
                linked = [
                    entry
                    for entry in replicas
                    if dict(zip(entry[::2], entry[1::2], strict=True)).get(b"master-link-status") == b"ok"
                ]
                if not linked or len(others) != 2:
                    return False
            return True

        wait_for(ready, timeout=timeout, interval=0.2, what=lambda: f"the Sentinels to be ready\n{self.logs()}")

    def wait_failover(self, old_port: int, timeout: float = 60) -> int:
        """Wait until the Sentinels name a master other than *old_port*; return its port."""

        def promoted() -> int:
            port = self.master_port()
            return port if port is not None and port != old_port else 0

        return wait_for(promoted, timeout=timeout, interval=0.05, what=lambda: f"a failover\n{self.logs()}")

    def logs(self) -> str:
        parts = [("master", self.master), ("replica", self.replica)]
        parts += [(f"sentinel-{n + 1}", sentinel) for n, sentinel in enumerate(self.sentinels)]
        return "\n".join(f"== {name}\n{process.log()[-1500:]}" for name, process in parts)

    def processes(self) -> list[RedisProcess]:
        return [*self.sentinels, self.master, self.replica]

    def kill(self) -> None:
        for process in self.processes():
            process.kill()


@contextlib.contextmanager
def running_sentinel_group(binary: str, folder: Path, run_id: str) -> Iterator[SentinelGroup]:
    """Start a master, its replica and three Sentinels; kill them all (and every process marked
    *run_id*) on the way out."""
    env = {**clean_environ(), MARKER: run_id}
    master = RedisProcess.server(binary, folder / "master", env)
    replica = RedisProcess.server(
        binary, folder / "replica", env, ("127.0.0.1",), "--replicaof", "127.0.0.1", str(master.port)
    )
    group = SentinelGroup(master, replica)
    try:
        master.start()
        replica.start()
        for n in range(3):
            sentinel = RedisProcess.sentinel(binary, folder / f"sentinel-{n + 1}", env, master.port)
            group.sentinels.append(sentinel)
            sentinel.start()
        group.wait_ready()
        yield group
    finally:
        kill_marked(run_id, keep=[process.process.pid for process in group.processes() if process.process])
        group.kill()


@pytest.fixture
def sentinel_group(redis_binary: str, tmp_path: Path) -> Iterator[SentinelGroup]:
    with running_sentinel_group(redis_binary, tmp_path, uuid.uuid4().hex) as group:
        yield group
