"""What every part of the benchmark shares: child processes, their memory, waiting, statistics, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from tests.support.waiting import wait_for
from udemy_dl.settings import VARIABLES

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
"""The checkout: plain `rq worker` imports `bench.noop` from here."""

BIN = Path(sys.executable).parent
"""The virtualenv's scripts (udemy-dl, rq) next to this interpreter."""

SERVICE_VARIABLES = VARIABLES
"""Every variable the service reads: none of the caller's may leak into the bench's workers."""


class BenchError(Exception):
    """The benchmark could not measure something; the message says what and why."""


def say(message: str) -> None:
    """Progress on stderr, so stdout carries only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.01,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll *predicate* until it returns something truthy and return it; raise BenchError after *timeout*
    (naming *what*, followed by what *on_timeout* says)."""
    described = (lambda: f"{what}\n{on_timeout()}") if on_timeout else what
    found = wait_for(predicate, timeout=timeout, interval=interval, what=described, error=BenchError)
    return cast(T, found)  # truthy, so never None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- statistics -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline is None or baseline == 0:
        return None
    return ours / baseline


# -- processes ------------------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When *pid* started (clock ticks since boot): with the pid, it names one process, reuse or not."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time *pid* has used so far."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below *pid* (children, grandchildren...).

    Reads the kernel's per-thread child lists, so sampling often costs little; scans all of /proc
    only where those lists are missing (a kernel without CONFIG_PROC_CHILDREN).
    """
    if Path(f"/proc/{pid}/task/{pid}/children").exists() or not Path(f"/proc/{pid}").exists():
        return _descendants_from_child_lists(pid)
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _descendants_from_child_lists(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                listed = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, listed):
                found.append(child)
                stack.append(child)
    return found


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size of *pid* (VmHWM, kB), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Child:
    """A process the bench started (in its own session), with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    seen: dict[int, int] = field(default_factory=dict)
    """Descendants noticed while it ran (pid -> start time), so cleanup reaches those that left its group."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log})"
        return f"last lines of {self.log}:\n" + "\n".join(text[-lines:])


class Children:
    """Starts child processes and makes sure every one of them (and theirs) is gone at the end."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.lock = threading.Lock()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, popen, log)
        with self.lock:
            self.children.append(child)
        return child

    def note_descendants(self, child: Child) -> list[int]:
        found = descendants(child.pid) if child.alive() else []
        for pid in found:
            started = start_time(pid)
            if started is not None:
                child.seen.setdefault(pid, started)
        return found

    def stop(self, child: Child, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal *child*, wait up to *timeout*, then SIGKILL it and every descendant it had."""
        self.note_descendants(child)
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)
            try:
                child.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(child)
        _kill_seen(child)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)

    def freeze(self, child: Child) -> None:
        """SIGSTOP *child* and its descendants: nothing more is read, so socket queues stop moving."""
        for pid in [child.pid, *self.note_descendants(child)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def kill(self, child: Child) -> None:
        """SIGKILL *child* and its descendants at once (a crash, not a shutdown)."""
        self.note_descendants(child)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        _kill_seen(child)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)

    def stop_all(self) -> None:
        with self.lock:
            children = list(reversed(self.children))
        for child in children:
            try:
                self.stop(child, timeout=10)
            except Exception as exc:  # cleanup goes on for the others
                say(f"cleanup: stopping {child.name} (pid {child.pid}) failed: {exc}")


def _kill_seen(child: Child) -> None:
    """SIGKILL every descendant noted earlier that is still the same process (same pid, same start time)."""
    for pid, started in sorted(child.seen.items()):
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class RssMonitor:
    """Samples VmHWM of a process and its descendants while it runs (a forked work horse included).

    A worker keeps its horse from one download to the next: a horse already running when the
    monitor starts counts only the CPU time it uses from then on (its VmHWM is its peak so far).
    """

    def __init__(self, children: Children, child: Child, interval: float = 0.02) -> None:
        self.children = children
        self.child = child
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cpu_before: dict[int, float] = {}
        """CPU seconds of the processes already there at the first sample, then."""
        self.horses: set[int] = set()
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def __enter__(self) -> RssMonitor:
        self.sample()  # the first sample before the work starts: what was there already
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        for pid in [self.child.pid, *self.children.note_descendants(self.child)]:
            kb = vm_hwm_kb(pid)
            if kb is None:
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0), kb)
            used = cpu_seconds(pid)
            if used is not None:
                self.cpu[pid] = used
                if self._first:
                    self.cpu_before[pid] = used
            if pid != self.child.pid and process_group(pid) == pid:
                self.horses.add(pid)  # RQ's work horse calls setpgrp(); its scheduler does not
        self._first = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    @property
    def worker_mb(self) -> float:
        return self.peaks.get(self.child.pid, 0) / 1024

    @property
    def horse_mb(self) -> float:
        return max((self.peaks[pid] for pid in self.horses if pid in self.peaks), default=0) / 1024

    @property
    def horse_cpu(self) -> float:
        """CPU seconds of the horses while monitored, as last sampled (a horse's last ~50 ms may be missing)."""
        return sum(self.cpu.get(pid, 0.0) - self.cpu_before.get(pid, 0.0) for pid in self.horses)

    @property
    def others_mb(self) -> float:
        rest = [kb for pid, kb in self.peaks.items() if pid != self.child.pid and pid not in self.horses]
        return max(rest, default=0) / 1024


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without any of the service's variables, plus *variables*."""
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    env.update(variables)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> str:
    """Run a short command; raise BenchError with its output if it fails."""
    done = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def sync_disks() -> None:
    """Write dirty pages out before a timed run, so one run's writeback does not land in the next."""
    os.sync()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed:` leaves the seconds taken in elapsed[0]."""
    holder: list[float] = []
    start = time.perf_counter()
    try:
        yield holder
    finally:
        holder.append(time.perf_counter() - start)


# -- the machine ----------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_info(extra: Mapping[str, Any]) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    import redis as redis_py
    import requests
    import rq

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": memory_gib,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "rq": rq.__version__,
        "redis_py": redis_py.__version__,
        "requests": requests.__version__,
        "curl": _first_line(["curl", "--version"]),
        "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
    }
    info.update(extra)
    return info


def _os_name() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return None
