"""Processes: their state read from /proc (no third-party dependency), killing them and all they
started, finding those a test marked, and the `udemy-dl` processes a test starts with a log file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# -- reading /proc ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, parent, process group, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str | None:
    """The state letter of *pid* (R, S, Z, ...), or None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def pid_running(pid: int) -> bool:
    """True while *pid* exists and is not a zombie waiting to be reaped."""
    state = proc_state(pid)
    return state is not None and state != "Z"


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def children(pid: int, zombies: bool = True) -> list[int]:
    """PIDs whose parent is *pid* (without zombies unless *zombies*)."""
    return [
        candidate for candidate in all_pids() if parent(candidate) == pid and (zombies or proc_state(candidate) != "Z")
    ]


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def work_horses(worker_pid: int) -> list[int]:
    """The worker's running work horses: RQ forks each into its own process group (its scheduler child is not)."""
    return [pid for pid in children(worker_pid) if process_group(pid) == pid and pid_running(pid)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def marked_pids(marker: str, run_id: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries `<marker>=<run_id>` (a test's own)."""
    needle = f"{marker}={run_id}".encode()
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_running(pid):
            found.append(pid)
    return found


# -- killing ------------------------------------------------------------------------------------------


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send *sig* to *pid*, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        kill(pid)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by *pid* (a work horse and anything it ran), or *pid* alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    kill(pid)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL *pid*, then everything it had started (listed before the kill); return them all.

    The parent goes first, as in a crash: a worker must not get to see its work horse die.
    """
    family = [pid, *descendants(pid)]
    kill_pids(family)
    return family


def kill_marked(marker: str, run_id: str, keep: Sequence[int] = (), timeout: float = 15) -> None:
    """SIGKILL every process marked `<marker>=<run_id>` (but *keep*) until none is left."""
    deadline = time.monotonic() + timeout
    while left := [pid for pid in marked_pids(marker, run_id) if pid not in keep]:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes survive SIGKILL: {[(pid, cmdline(pid)) for pid in left]}")
        kill_pids(left)
        time.sleep(0.1)


PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(enabled: bool) -> None:
    """Make this process adopt orphaned descendants (Linux prctl), as the PID 1 of a container does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


# -- processes a test starts, each with its log file ----------------------------------------------------


@dataclass
class LoggedProcess:
    """A process a test started in a session of its own (a worker, a pool), its output in *log_path*."""

    process: subprocess.Popen[bytes]
    log_path: Path
    name: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self, tail: int | None = None) -> str:
        """Its output so far (the last *tail* characters only, when given)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""
        return text[-tail:] if tail else text

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for it to exit; return its exit code."""
        return self.process.wait(timeout=timeout)

    def children(self) -> list[int]:
        """PIDs of its live children (a worker's: its work horse, in its own process group, and its scheduler)."""
        return children(self.process.pid, zombies=False)

    def kill(self) -> None:
        """SIGKILL it and everything it started (horses run in their own process groups)."""
        family = self.children()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        for child in family:
            kill_group(child)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to its process group if it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_logged(argv: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path, name: str = "") -> LoggedProcess:
    """Start *argv* in a new session, output (stdout and stderr) to *log_path*, no standard input."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LoggedProcess(process, log_path, name)


def folder_logs(folder: Path, tail: int, label: str = "") -> str:
    """The last *tail* characters of every log in *folder*, each under `== <label><name>`, for assertion messages."""
    if not folder.is_dir():
        return f"== {label}(no logs)"
    return "\n".join(f"== {label}{p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(folder.iterdir()))
