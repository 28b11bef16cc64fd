"""The operator's own downloader: FETCH_COMMAND, run without a shell, instead of the HTTP fetcher."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO

from . import defaults
from .errors import CommandError, Interrupted, UnsafePathError
from .fetch import PARTS_DIRNAME, FetchedFile, FetchResult, ProgressCallback
from .process import preexec_die_with_parent
from .safety import check_url_allowed
from .storage import RECORD_NAME

log = logging.getLogger(__name__)


class CommandFetcher:
    """Runs FETCH_COMMAND (`{url}` and `{dest}` replaced) into the staging folder, under the job timeout.

    The command's output goes to the worker log line by line; a non-zero exit or a timeout is a
    transient error. The command runs in the work horse's process group, so RQ's timeout kill
    reaches it too.
    """

    def __init__(self, argv: tuple[str, ...], allowed_hosts: Collection[str], timeout: float) -> None:
        self.argv = argv
        self.allowed_hosts = allowed_hosts
        self.timeout = timeout
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
        log.info("running FETCH_COMMAND %s", argv[0])
        try:
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=command_environment(),
                preexec_fn=preexec_die_with_parent(),  # the command goes when its work horse goes (kill -9, OOM)
            )
        except OSError as exc:
            raise CommandError(f"FETCH_COMMAND {argv[0]!r} could not start: {exc}") from exc
        assert process.stdout is not None
        output = process.stdout
        reader = threading.Thread(target=_log_lines, args=(output,), daemon=True)
        reader.start()
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    code = process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        process.terminate()
                        process.wait()
                        raise Interrupted("FETCH_COMMAND stopped on request") from None
                    if time.monotonic() >= deadline:
                        process.kill()
                        process.wait()
                        raise CommandError(f"FETCH_COMMAND timed out after {self.timeout}s") from None
        finally:
            if process.poll() is None:  # left by an exception from outside (RQ's job timeout, a signal)
                process.kill()
                process.wait()
            reader.join(timeout=5)
        if code != 0:
            raise CommandError(f"FETCH_COMMAND exited with status {code}")
        files = tuple(_describe(staging))
        if not files:
            raise CommandError("FETCH_COMMAND exited 0 but left no files")
        if on_progress is not None:
            total = sum(item.size for item in files)
            on_progress(total, total, len(files), len(files))
        return FetchResult(title=course_url.rsplit("/", 1)[-1] or "course", files=files, bytes_transferred=0)


SECRET_VARIABLES = ("DATABASE_URL", "DB_PASSWORD", "REDIS_URL", "REDIS_PASSWORD", "API_SECRET_KEY")
"""Kept from the operator's command: it needs the origin (CONTENT_TOKEN stays), not our stores."""


def command_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in SECRET_VARIABLES}


def _log_lines(stream: IO[str]) -> None:
    """Copy the command's output into the worker log, line by line, as it comes."""
    for line in stream:
        log.info("FETCH_COMMAND: %s", line.rstrip())


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
