"""The operator's own downloader: FETCH_COMMAND, run without a shell, instead of the HTTP fetcher."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO

from . import defaults
from .errors import CommandError, Interrupted, PermanentError, UdemyDlError, UnsafePathError
from .fetch import PARTS_DIRNAME, FetchedFile, FetchResult, ProgressCallback
from .folders import RECORD_NAME
from .process_control import GroupWatchdog, end_process_group, group_members, preexec_die_with_this_process
from .safety import check_url_allowed
from .settings import VARIABLES

log = logging.getLogger(__name__)


class CommandStartError(PermanentError):
    """Raised when FETCH_COMMAND cannot be started at all (no such program, not executable, not a
    program): no retry can help until the operator fixes the setting."""


STOP_GRACE = 5.0
"""Seconds the command's processes have between SIGTERM and SIGKILL when the fetch ends them."""

POLL_INTERVAL = 0.1
"""Seconds between two looks at the command, the stop event and the deadline."""

_TRANSIENT_START_ERRORS = frozenset(
    {errno.EAGAIN, errno.ENOMEM, errno.ETXTBSY, errno.EMFILE, errno.ENFILE, errno.EINTR}
)
"""Reasons a command could not start that pass by themselves (out of processes or memory, the
program being replaced right now); any other reason is the setting's, and permanent."""


class CommandFetcher:
    """Runs FETCH_COMMAND (`{url}` and `{dest}` replaced) into the staging folder, under the job timeout.

    The command's output goes to the worker log line by line. A non-zero exit, death by a signal
    or a timeout is a transient error; a command that cannot start at all is a permanent one.

    The command runs in a process group of its own, and whatever ends the fetch ends the whole
    group before fetch returns or raises (SIGTERM, *grace* seconds, then SIGKILL): its exit with
    helpers still running, the stop event (the worker handing the task back, the lease lost), the
    timeout, or an exception from outside (RQ's job timeout). No process the command started is
    left writing the folder while the task is handed back or retried. Should the work horse itself
    die (kill -9, the OOM killer), PR_SET_PDEATHSIG takes the command and a GroupWatchdog its
    group. Out of reach: a process that leaves the group (setsid, a daemon); under systemd, the
    unit's stop still kills it.

    The command's environment is the worker's without the service's settings and secrets
    (see `command_environment`).
    """

    def __init__(
        self, argv: tuple[str, ...], allowed_hosts: Collection[str], timeout: float, grace: float = STOP_GRACE
    ) -> None:
        self.argv = argv
        self.allowed_hosts = allowed_hosts
        self.timeout = timeout
        self.grace = grace
        self.bytes_transferred = 0
        """Not known for an operator's command (it may fetch from anywhere it likes)."""

    def reset_count(self) -> None:
        """Nothing to reset: bytes_transferred stays 0."""

    def fetch(
        self,
        course_url: str,
        staging: Path,
        on_progress: ProgressCallback | None = None,
        stop: threading.Event | None = None,
    ) -> FetchResult:
        check_url_allowed(course_url, self.allowed_hosts)
        staging.mkdir(parents=True, exist_ok=True)
        argv = [part.replace("{url}", course_url).replace("{dest}", str(staging)) for part in self.argv]
        log.info("running FETCH_COMMAND %r", self.argv[0])
        watchdog = GroupWatchdog()
        try:
            process = self._start(argv, watchdog.announce_fd)
        except BaseException:
            watchdog.release()
            raise
        assert process.stdout is not None
        output = process.stdout
        reader = threading.Thread(target=_log_lines, args=(output,), daemon=True)
        ended = False
        try:
            reader.start()
            failure, leftovers = self._supervise(process, stop)
        finally:  # also on an exception from outside: RQ's job timeout, a signal
            # The leader (pid == pgid) stays unreaped until its group is gone: its id cannot be reused.
            ended = end_process_group(process.pid, self.grace)
            if ended:
                watchdog.release()  # else it stays armed, for when this process exits
                process.wait()
            else:
                log.error("FETCH_COMMAND: processes of group %s would not end, even after SIGKILL", process.pid)
            if reader.ident is not None:
                reader.join(timeout=5)
            if not reader.is_alive():
                output.close()
        if failure is not None:
            raise failure
        if not ended:
            raise CommandError("FETCH_COMMAND left processes that would not end, even after SIGKILL")
        code = process.returncode
        if code != 0 and stop is not None and stop.is_set():
            raise Interrupted(f"FETCH_COMMAND {_exit_status(code)} while stopping")
        if code != 0:
            raise CommandError(f"FETCH_COMMAND {_exit_status(code)}")
        if leftovers:
            raise CommandError(
                f"FETCH_COMMAND exited 0 with {leftovers} process(es) it started still running; they were "
                "ended, and what they were writing is not trusted"
            )
        _drop_parts(staging)
        files = tuple(_describe(staging))
        if not files:
            raise CommandError("FETCH_COMMAND exited 0 but left no files")
        if on_progress is not None:
            total = sum(item.size for item in files)
            on_progress(total, total, len(files), len(files))
        return FetchResult(title=course_url.rsplit("/", 1)[-1] or "course", files=files, bytes_transferred=0)

    def _start(self, argv: list[str], announce_to: int | None) -> subprocess.Popen[str]:
        """Start the command as the leader of a new process group (and session); before exec it
        writes its id to *announce_to* (the group watchdog's pipe)."""
        try:
            return subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",  # a stray byte must not stop the reader (the pipe would fill)
                env=command_environment(),
                start_new_session=True,
                preexec_fn=preexec_die_with_this_process(announce_to),  # the command goes when its work horse goes
            )
        except OSError as exc:
            reason = f"{exc.strerror or exc} (errno {exc.errno})"
            if exc.errno in _TRANSIENT_START_ERRORS:
                raise CommandError(f"FETCH_COMMAND {self.argv[0]!r} could not start: {reason}") from exc
            raise CommandStartError(f"FETCH_COMMAND {self.argv[0]!r} cannot start: {reason}") from exc
        except ValueError as exc:  # a NUL byte in an argument
            raise CommandStartError(f"FETCH_COMMAND {self.argv[0]!r} cannot start: {exc}") from exc

    def _supervise(
        self, process: subprocess.Popen[str], stop: threading.Event | None
    ) -> tuple[UdemyDlError | None, int]:
        """Wait for the command to exit, without reaping it. Return the error that ended the wait
        early (stop, timeout) or None, and how many processes of its group outlived its exit."""
        deadline = time.monotonic() + self.timeout
        while not _exited(process.pid):
            if stop is not None and stop.is_set():
                return Interrupted("FETCH_COMMAND stopped on request"), 0
            if time.monotonic() >= deadline:
                return CommandError(f"FETCH_COMMAND timed out after {self.timeout}s"), 0
            time.sleep(POLL_INTERVAL)
        return None, len(group_members(process.pid))


def _exited(pid: int) -> bool:
    """Has our child *pid* ended? Asked without reaping it (WNOWAIT)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _exit_status(code: int) -> str:
    """`exited with status 3`, or `was killed by SIGTERM` for a death by signal."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


PASSED_SETTINGS = frozenset({"CONTENT_TOKEN"})
"""The only settings the command sees: the origin's bearer token, on purpose, for a downloader
fetching from the origin the HTTP fetcher would send it to."""

_SECRET_WORDS = ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "CREDENTIAL", "PRIVATE")
_SECRET_PARTS = frozenset({"KEY", "KEYS", "APIKEY", "PASS", "PWD", "PW", "AUTH", "DSN", "COOKIE"})
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*:[^/?#\s]*@")
"""A URL whose userinfo holds a password (`http://user:pw@proxy:3128`), wherever it is in a value."""


def withheld_from_command(name: str, value: str = "") -> bool:
    """Is *name* (holding *value*) kept out of the command's environment? Every variable the settings
    read (secret or not: a setting added later is covered without a thought), except PASSED_SETTINGS;
    any other variable whose name says it holds a secret (`*PASSWORD*`, `*SECRET*`, `*TOKEN*`,
    `*_KEY`, `*_PASS`, `*_AUTH`, `*_DSN`, ...); and any whose value holds a URL with a password (a
    proxy's, say). A downloader that needs a credential of its own reads it from a file."""
    upper = name.upper()
    if upper in PASSED_SETTINGS:
        return False
    if upper in VARIABLES or any(word in upper for word in _SECRET_WORDS):
        return True
    if _URL_WITH_PASSWORD.search(value):
        return True
    parts = upper.split("_")
    return len(parts) > 1 and any(part in _SECRET_PARTS for part in parts)


def command_environment() -> dict[str, str]:
    """The worker's environment, less what `withheld_from_command` names."""
    return {name: value for name, value in os.environ.items() if not withheld_from_command(name, value)}


def _log_lines(stream: IO[str]) -> None:
    """Copy the command's output into the worker log, line by line, as it comes."""
    for line in stream:
        log.info("FETCH_COMMAND: %s", line.rstrip())


def _drop_parts(staging: Path) -> None:
    """Remove `.parts` (an earlier HTTP attempt's partial files): not the command's, never moved into place."""
    parts = staging / PARTS_DIRNAME
    if parts.is_symlink() or parts.is_file():
        parts.unlink()
    elif parts.is_dir():
        shutil.rmtree(parts)


def _describe(staging: Path) -> list[FetchedFile]:
    """Every regular file the command left, hashed; a symlink anywhere is refused."""
    found = []
    for path in sorted(staging.rglob("*")):
        relative = path.relative_to(staging)
        if relative.parts[0] == PARTS_DIRNAME or str(relative) == RECORD_NAME:
            continue
        if path.is_symlink():
            raise UnsafePathError(f"FETCH_COMMAND left a symlink: {str(relative)!r}")
        if not path.is_file():
            continue
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(defaults.CHUNK_SIZE), b""):
                digest.update(block)
                size += len(block)
        found.append(FetchedFile(path=relative.as_posix(), size=size, sha256=digest.hexdigest()))
    return found
