"""FETCH_COMMAND at its edges: a command that cannot start, one killed from outside, the processes it
leaves behind (stop, timeout, an early exit, its work horse killed), and the environment it sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.waiting import wait_for
from udemy_dl.errors import CommandError, Interrupted, PermanentError, TransientError
from udemy_dl.fetch_command import CommandFetcher
from udemy_dl.process_control import pid_alive
from udemy_dl.settings import VARIABLES, load_settings

URL = "https://cdn.example/courses/7"
GRACE = 0.3
"""Seconds between SIGTERM and SIGKILL of the command's process group, short for the tests."""

WRITER = 'while :; do echo x >> "$1/late.bin"; sleep 0.05; done'
"""A background writer into the task folder, as a downloader's helper process would be."""

STUBBORN_WRITER = f"( trap '' TERM; {WRITER} )"
"""The same, deaf to SIGTERM (so only the SIGKILL after the grace ends it)."""


def fetcher(argv: tuple[str, ...], timeout: float = 60) -> CommandFetcher:
    return CommandFetcher(argv, {"cdn.example"}, timeout=timeout, grace=GRACE)


def sh(script: str, *extra: str) -> tuple[str, ...]:
    """FETCH_COMMAND running *script* with $1={dest}, $2.. = *extra*, and {url} last."""
    return ("sh", "-c", script, "sh", "{dest}", *extra, "{url}")


@pytest.fixture
def pids(tmp_path: Path) -> Iterator[Path]:
    """A folder for the PID files the commands write; whatever they name is SIGKILLed afterwards
    (so a failing test leaves no writer behind)."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    for pid_file in folder.glob("*.pid"):
        text = pid_file.read_text().strip()
        if text.isdigit():
            for kill in (os.killpg, os.kill):
                try:
                    kill(int(text), signal.SIGKILL)
                except OSError:
                    pass


def pid_in(path: Path) -> int:
    """The PID the command wrote to *path*, once it is there in full."""
    text = wait_for(lambda: path.is_file() and path.read_text().endswith("\n") and path.read_text(), timeout=20)
    return int(text)


def in_background(action: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


# -- a command that cannot start -------------------------------------------------------------------


def test_partial_files_of_an_earlier_http_attempt_are_dropped_not_described(staging: Path) -> None:
    """An earlier attempt over HTTP left `.parts` in the task folder (the operator set FETCH_COMMAND since): the
    command's files are the result, and `.parts` is gone before the folder can be moved into place."""
    (staging / ".parts").mkdir(parents=True)
    (staging / ".parts" / "a.bin.part").write_bytes(b"half")
    result = fetcher(sh('printf course > "$1/course.bin"')).fetch(URL, staging)
    assert [(item.path, item.size) for item in result.files] == [("course.bin", 6)]
    assert sorted(path.name for path in staging.iterdir()) == ["course.bin"]


def test_missing_executable_is_a_permanent_error_naming_the_command(staging: Path, tmp_path: Path) -> None:
    """No such program: retrying cannot help, so the task fails at once, and the message says what was run."""
    missing = str(tmp_path / "no-such-downloader")
    with pytest.raises(PermanentError, match="no-such-downloader") as caught:
        fetcher((missing, "{url}", "{dest}")).fetch(URL, staging)
    assert not isinstance(caught.value, TransientError)
    assert "cannot start" in str(caught.value)


@pytest.mark.parametrize(
    ("mode", "content"),
    [(0o644, "#!/bin/sh\nexit 0\n"), (0o755, "\x7fNOT-AN-ELF\x00\x01")],
    ids=["not-executable", "exec-format-error"],
)
def test_unrunnable_file_is_a_permanent_error_naming_the_command(
    staging: Path, tmp_path: Path, mode: int, content: str
) -> None:
    """A file that is there but cannot be run (no x bit, not a program) fails the task at once."""
    program = tmp_path / "downloader"
    program.write_text(content)
    program.chmod(mode)
    with pytest.raises(PermanentError, match="downloader") as caught:
        fetcher((str(program), "{url}", "{dest}")).fetch(URL, staging)
    assert not isinstance(caught.value, TransientError)


def test_quotes_around_the_whole_command_are_a_permanent_error_naming_it(staging: Path) -> None:
    """`'/usr/bin/env {url}' {dest}` passes the settings (both placeholders are there) but names a
    program called `/usr/bin/env {url}`: the task fails at once, the message quoting that argument."""
    settings = load_settings({"FETCH_COMMAND": "'/usr/bin/env --out {url}' {dest}"}, env_file=None)
    assert settings.fetch_command is not None
    with pytest.raises(PermanentError, match=r"'/usr/bin/env --out \{url\}'"):
        fetcher(settings.fetch_command).fetch(URL, staging)


# -- a command killed from outside ------------------------------------------------------------------


def test_command_killed_by_sigterm_from_outside_is_transient_and_says_so(staging: Path, pids: Path) -> None:
    """Someone else's SIGTERM (an operator, the OOM killer's cousin) is not the course's fault: the
    attempt is retried, and the error names the signal rather than a bare negative status."""
    pid_file = pids / "command.pid"
    killer = in_background(lambda: os.kill(pid_in(pid_file), signal.SIGTERM))
    with pytest.raises(CommandError, match="SIGTERM") as caught:
        fetcher(sh('echo $$ > "$2"; exec sleep 300', str(pid_file))).fetch(URL, staging)
    killer.join()
    assert isinstance(caught.value, TransientError)
    assert "-15" not in str(caught.value)


# -- nothing of the command outlives the fetch ------------------------------------------------------


@pytest.mark.parametrize("writer", [WRITER, STUBBORN_WRITER], ids=["writer", "writer-deaf-to-sigterm"])
def test_hand_back_stop_ends_the_commands_children_too(staging: Path, pids: Path, writer: str) -> None:
    """When the worker asks for the task back, the command's background writer is gone by the time
    fetch raises Interrupted: no second writer in the folder while another run takes the task."""
    writer_pid, leader_pid = pids / "writer.pid", pids / "leader.pid"
    stop = threading.Event()

    def stop_once_both_run() -> None:
        pid_in(writer_pid)
        pid_in(leader_pid)
        stop.set()

    setter = in_background(stop_once_both_run)
    script = f'{writer} & echo $! > "$2"; echo $$ > "$3"; wait'
    with pytest.raises(Interrupted):
        fetcher(sh(script, str(writer_pid), str(leader_pid))).fetch(URL, staging, stop=stop)
    setter.join()
    assert not pid_alive(pid_in(writer_pid)), "the writer outlived the stop"
    assert not pid_alive(pid_in(leader_pid))


@pytest.mark.parametrize("writer", [WRITER, STUBBORN_WRITER], ids=["writer", "writer-deaf-to-sigterm"])
def test_timeout_ends_the_commands_children_too(staging: Path, pids: Path, writer: str) -> None:
    """A command timed out takes its background writer with it before fetch raises."""
    writer_pid = pids / "writer.pid"
    script = f'{writer} & echo $! > "$2"; wait'
    with pytest.raises(CommandError, match="timed out"):
        fetcher(sh(script, str(writer_pid)), timeout=2).fetch(URL, staging)
    assert writer_pid.is_file(), "the writer had started before the timeout"
    assert not pid_alive(pid_in(writer_pid)), "the writer outlived the timeout"


def test_command_exiting_while_its_writer_still_runs_is_not_trusted(staging: Path, pids: Path) -> None:
    """A command that says it is done (exit 0) while a process it started still writes the folder:
    the files may be half written, so the writer is ended and the attempt is retried."""
    writer_pid = pids / "writer.pid"
    script = f'{WRITER} & echo $! > "$2"; echo done > "$1/course.bin"'
    with pytest.raises(CommandError, match="still running"):
        fetcher(sh(script, str(writer_pid))).fetch(URL, staging)
    assert not pid_alive(pid_in(writer_pid)), "the writer outlived the command"


class DeathPenalty(Exception):
    """Raised by a SIGALRM handler, as RQ's job timeout (JobTimeoutException) is in a work horse."""


def test_exception_from_outside_ends_the_commands_children_too(staging: Path, pids: Path) -> None:
    """RQ's job timeout is an exception raised inside fetch by a signal handler: the command's group
    is ended before it propagates."""
    writer_pid = pids / "writer.pid"

    def penalty(signum: int, frame: object) -> None:
        raise DeathPenalty

    def alarm_once_the_writer_runs() -> None:
        pid_in(writer_pid)
        os.kill(os.getpid(), signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, penalty)
    try:
        in_background(alarm_once_the_writer_runs)
        with pytest.raises(DeathPenalty):
            fetcher(sh(f'{STUBBORN_WRITER} & echo $! > "$2"; wait', str(writer_pid))).fetch(URL, staging)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not pid_alive(pid_in(writer_pid)), "the writer outlived the exception"


HORSE = """
import sys
from pathlib import Path
from udemy_dl.fetch_command import CommandFetcher
argv = ("sh", "-c", sys.argv[1], "sh", "{dest}", sys.argv[3], sys.argv[4], "{url}")
CommandFetcher(argv, {"cdn.example"}, timeout=300).fetch("https://cdn.example/c", Path(sys.argv[2]))
"""


@pytest.mark.parametrize("how", ["horse-alone", "horse-group"])
def test_work_horse_killed_takes_the_commands_children_with_it(
    staging: Path, pids: Path, tmp_path: Path, how: str
) -> None:
    """kill -9 of the work horse (the OOM killer), or of its process group (RQ's own kill of a horse
    past its timeout): neither the command nor the writer it started keeps writing the folder."""
    writer_pid, leader_pid = pids / "writer.pid", pids / "leader.pid"
    script = f'{WRITER} & echo $! > "$2"; echo $$ > "$3"; wait'
    horse = subprocess.Popen(
        [sys.executable, "-c", HORSE, script, str(staging), str(writer_pid), str(leader_pid)],
        process_group=0,  # as RQ's work horse, which calls setpgrp()
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        writer, leader = pid_in(writer_pid), pid_in(leader_pid)
        if how == "horse-alone":
            os.kill(horse.pid, signal.SIGKILL)
        else:
            os.killpg(horse.pid, signal.SIGKILL)
    finally:
        if horse.poll() is None:
            horse.kill()
        horse.wait()
    wait_for(lambda: not pid_alive(leader), timeout=10, what="the command to go with its work horse")
    wait_for(lambda: not pid_alive(writer), timeout=10, what="the writer to go with its work horse")


KILLED_AT_START = """
import os, signal, sys, time
from pathlib import Path
from udemy_dl.fetch_command import CommandFetcher

class KilledRightAfterTheStart(CommandFetcher):
    def _start(self, argv, announce_to):
        process = super()._start(argv, announce_to)
        writer_pid = Path(sys.argv[3])
        while not writer_pid.is_file() or not writer_pid.read_text().endswith("\\n"):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)  # before the fetch goes on with a single step
        return process

argv = ("sh", "-c", sys.argv[1], "sh", "{dest}", sys.argv[3], sys.argv[4], "{url}")
KilledRightAfterTheStart(argv, {"cdn.example"}, timeout=300).fetch("https://cdn.example/c", Path(sys.argv[2]))
"""


def test_work_horse_killed_the_moment_the_command_started_takes_its_children_with_it(staging: Path, pids: Path) -> None:
    """The horse killed between the command's start and anything else it does: the group watchdog
    already knows the group (the command told it before exec), so the writer goes too."""
    writer_pid, leader_pid = pids / "writer.pid", pids / "leader.pid"
    script = f'{WRITER} & echo $! > "$2"; echo $$ > "$3"; wait'
    horse = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_START, script, str(staging), str(writer_pid), str(leader_pid)],
        process_group=0,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert horse.wait(timeout=20) == -signal.SIGKILL
    writer = pid_in(writer_pid)
    wait_for(lambda: not pid_alive(writer), timeout=10, what="the writer to go with its work horse")


# -- the command's environment ------------------------------------------------------------------------

ENV_DUMP = textwrap.dedent(
    """
    import json, os, pathlib, sys
    pathlib.Path(sys.argv[3]).write_text(json.dumps(dict(os.environ)))
    dest = pathlib.Path(sys.argv[2]); dest.mkdir(parents=True, exist_ok=True)
    (dest / "course.bin").write_bytes(b"c")
    """
)


def test_command_environment_holds_no_secret_of_the_service(
    staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command sees none of the service's settings (every one in VARIABLES, so a secret added
    later is covered too) and no secret-named variable, but does get CONTENT_TOKEN on purpose (it
    fetches from the origin that token unlocks) and the rest of the environment (PATH, its own)."""
    secrets = {name: f"leaked-{name.lower()}" for name in VARIABLES if name != "CONTENT_TOKEN"}
    secrets.update(
        REDIS_URL="redis://:redis-pass-1@redis.internal:6379/0",
        DATABASE_URL="mysql://udemy:db-pass-2@db.internal:3306/udemy",
        REDIS_SENTINEL_PASSWORD="sentinel-pass-3",
        STATUS_TOKEN_SECRET="status-secret-4",
        PAYMENT_API_KEY="payment-key-5",
        SMTP_PASSWD="smtp-pass-6",
        REDISCLI_AUTH="rediscli-auth-7",
        SENTRY_DSN="https://sentry-key-8@sentry.example/1",
        HTTPS_PROXY="http://proxy-user:proxy-pass-9@proxy.internal:3128",
    )
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONTENT_TOKEN", "origin-token")
    monkeypatch.setenv("DOWNLOADER_REGION", "eu-west")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")  # no password: the command may need it
    dump = tmp_path / "env.json"

    fetcher((sys.executable, "-c", ENV_DUMP, "{url}", "{dest}", str(dump))).fetch(URL, staging)

    seen = json.loads(dump.read_text())
    assert sorted(set(secrets) & set(seen)) == []
    leaked = [value for value in secrets.values() if any(value in text for text in seen.values())]
    assert leaked == []
    assert seen["CONTENT_TOKEN"] == "origin-token"
    assert seen["DOWNLOADER_REGION"] == "eu-west"
    assert seen["HTTP_PROXY"] == "http://proxy.internal:3128"
    assert seen["PATH"] == os.environ["PATH"]


# -- the command's output ---------------------------------------------------------------------------

NOISY = textwrap.dedent(
    """
    import pathlib, sys
    sys.stdout.buffer.write(b"progress \\xff\\xfe 12%\\n" + b"a fairly long progress line\\n" * 20000)
    sys.stdout.flush()
    dest = pathlib.Path(sys.argv[2]); dest.mkdir(parents=True, exist_ok=True)
    (dest / "course.bin").write_bytes(b"c")
    """
)


def test_output_that_is_not_utf8_does_not_stall_the_command(staging: Path) -> None:
    """A byte that is not UTF-8 in the command's output must not stop the log reader: the pipe would
    fill and the command block on it until the timeout."""
    result = fetcher((sys.executable, "-c", NOISY, "{url}", "{dest}"), timeout=10).fetch(URL, staging)
    assert [item.path for item in result.files] == ["course.bin"]
