"""Process inspection and control helpers (Linux first, portable where it can be)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

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


HAND_BACK = threading.Event()
"""Set in a work horse when its worker asks it to hand the task back (the worker is stopping)."""


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
