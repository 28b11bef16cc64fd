"""Process inspection and control helpers (Linux first, portable where it can be)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from setproctitle import setproctitle

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
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


def set_process_title(title: str) -> None:
    """Show *title* as this process's command line (/proc/<pid>/cmdline: `ps`, `pgrep -f`, `htop`).

    Only the space of the original arguments is used (SPT_NOENV): the environment stays readable
    in /proc/<pid>/environ, and a title longer than the original command line is cut short.
    """
    os.environ.setdefault("SPT_NOENV", "1")  # read by setproctitle at its first call
    setproctitle(title)


HAND_BACK = threading.Event()
"""Set in a work horse when its worker asks it to hand the task back (the worker is stopping)."""


class RunStop(threading.Event):
    """One run's stop: set when the run must stop (its lease lost), and seen as set while its work
    horse is asked to hand the task back (HAND_BACK). A lease lost by one run never stops the next
    one run in the same process (the one-line entry point, a test)."""

    def is_set(self) -> bool:
        return super().is_set() or HAND_BACK.is_set()


def install_hand_back_handler(signum: int) -> None:
    """In a fresh work horse: let *signum* set HAND_BACK (by default SIGUSR1 would kill the process)."""
    HAND_BACK.clear()
    signal.signal(signum, lambda received, frame: HAND_BACK.set())


PR_SET_PDEATHSIG = 1


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn for subprocess: the child is SIGKILLed when the process that started it dies.

    libc is loaded here, in the parent: between fork and exec the child only makes the one call
    (no allocation, no logging, no locks).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return set_death_signal


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


def preexec_die_with_this_process(announce_to: int | None = None) -> Callable[[], None] | None:
    """A preexec_fn for subprocess: like preexec_die_with_parent, and the child also exits at once
    (status 127, before exec) if the process starting it died before the request took hold.

    With *announce_to* (a GroupWatchdog's pipe, `GroupWatchdog.announce_fd`), the child writes its
    own id there before exec, so the watchdog knows the group before the command can start anything:
    a parent killed right after the fork still has the group ended by the watchdog.

    Linux sends the signal when the *thread* that started the child ends: start it from the
    thread that outlives it (the work horse's main thread does).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        if announce_to is not None:
            os.write(announce_to, b"%d\n" % os.getpid())  # exec then closes the child's copy
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(127)

    return set_death_signal


def group_members(pgid: int) -> list[int]:
    """The PIDs of process group *pgid* that still run; a zombie counts as gone (it runs no code).

    Linux reads /proc (a slow PID 1 may leave zombies for seconds, and kill(0) counts them);
    elsewhere, `[pgid]` while kill(0) reaches the group.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # someone else's process in the group: still a member
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pgid]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            state, group = fields[0], int(fields[2])  # after "(comm)": state, ppid, pgrp, ...
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if group == pgid and state not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def signal_group(pgid: int, signum: int) -> None:
    """Send *signum* to process group *pgid*; a group already gone is no error."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("process group %s: %s not delivered: %s", pgid, signal.Signals(signum).name, exc)


GROUP_POLL_INTERVAL = 0.02
"""Seconds between two looks at a process group that is being ended."""

GROUP_KILL_WAIT = 10.0
"""Seconds a process group has to vanish after SIGKILL (a process in uninterruptible sleep, on a
dead network mount say, dies only when it leaves the kernel)."""


def end_process_group(pgid: int, grace: float, wait: float = GROUP_KILL_WAIT) -> bool:
    """End every process of group *pgid*: SIGTERM (and SIGCONT, for a stopped one), up to *grace*
    seconds to go, then SIGKILL. Return True once none runs, False if some still ran *wait*
    seconds after the SIGKILL.

    The caller should hold the group leader unreaped (a zombie) until this returns: its PID, the
    group's id, cannot then be given to a new process, so the signals reach no stranger.
    """
    if not group_members(pgid):
        return True
    signal_group(pgid, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)
    if _group_gone_within(pgid, grace):
        return True
    remaining = group_members(pgid)
    log.warning(
        "process group %s: %s process(es) still running %ss after SIGTERM; SIGKILL", pgid, len(remaining), grace
    )
    signal_group(pgid, signal.SIGKILL)
    return _group_gone_within(pgid, wait)


def _group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_members(pgid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(GROUP_POLL_INTERVAL, remaining))
    return True


_WATCHDOG_SOURCE = """\
import os, signal, sys
pgid, _, verdict = sys.stdin.buffer.read().partition(b"\\n")
if pgid.isdigit() and verdict != b"done":
    try:
        os.killpg(int(pgid), signal.SIGKILL)
    except OSError:
        pass
"""


class GroupWatchdog:
    """SIGKILLs a process group should this process die without ending it (kill -9, OOM killer).

    PR_SET_PDEATHSIG reaches only the direct child: the processes it started would live on,
    adopted by PID 1. The watchdog is a tiny Python process in a session of its own (so a kill of
    this process's group, as RQ kills a work horse, spares it) reading a pipe whose only write end
    is ours. We write the group's id, then "done" once we have ended the group ourselves; if we die
    first, the kernel closes the pipe and the watchdog, reading no "done", SIGKILLs the group.

    Start it before the group's first process, whose preexec_fn writes the group's id to
    `announce_fd` before exec (so no window is left where the group runs and the watchdog does not
    know it), and `release()` it once the group is gone. A watchdog that cannot start is logged and
    does without.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("process group watchdog not started: %s", exc)

    @property
    def announce_fd(self) -> int | None:
        """The pipe the group's leader writes its id to before exec (preexec_die_with_this_process)."""
        if self._process is None or self._process.stdin is None:
            return None
        return self._process.stdin.fileno()

    def release(self) -> None:
        """The group is gone: let the watchdog end without killing anything."""
        self._write(b"done", close=True)
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _write(self, data: bytes, close: bool) -> None:
        if self._process is None or self._process.stdin is None:
            return
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
            if close:
                self._process.stdin.close()
        except OSError as exc:  # the watchdog died (someone killed it): nothing to tell
            log.warning("process group watchdog gone: %s", exc)
