"""Room on the download disk, judged before any file is requested: not enough free now is retried (space may be
freed), a course larger than the whole disk fails for good. The disk's answer is faked at shutil.disk_usage."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import pytest

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.disks import Usage
from tests.support.fetching import cut_transfer, fetcher_for
from tests.support.files import files_under
from udemy_dl import defaults, fetch
from udemy_dl.errors import NoSpaceError, PermanentError, TooLargeError, TransientError

TiB = 1 << 40


def disk(monkeypatch: pytest.MonkeyPatch, total: int, free: int) -> None:
    """Make the download disk look *total* bytes large with *free* bytes free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(total, total - free, free))


def test_not_enough_free_space_now_is_retried(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Less free than the course plus the headroom: a transient NoSpaceError naming both numbers, no file
    requested; once space is freed the next attempt fetches the course."""
    url = origin.add_course("full", {"a.bin": 40_000, "b.bin": 60_000})
    disk(monkeypatch, total=TiB, free=defaults.DISK_HEADROOM + 99_999)
    with pytest.raises(
        NoSpaceError, match=rf"{defaults.DISK_HEADROOM + 100_000} more bytes.*{99_999 + defaults.DISK_HEADROOM} free"
    ) as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    assert origin.requests.paths() == ["/courses/full"]
    assert files_under(staging) == []
    disk(monkeypatch, total=TiB, free=defaults.DISK_HEADROOM + 100_000)
    result = fetcher_for(origin).fetch(url, staging)
    assert files_under(staging) == ["a.bin", "b.bin"]
    assert result.total_bytes == 100_000


def test_course_larger_than_the_disk_fails_for_good(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A course larger than the whole download disk could never fit: TooLargeError (permanent), no file
    requested."""
    url = origin.add_course("huge", {"a.bin": 60_000, "b.bin": 60_000})
    disk(monkeypatch, total=100_000, free=100_000)
    with pytest.raises(TooLargeError, match=r"120000 bytes.*100000") as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, PermanentError)
    assert origin.requests.paths() == ["/courses/huge"]


def test_single_file_larger_than_the_disk_fails_for_good(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a single-file course, judged on its Content-Length before its body is read."""
    write_sample_file(origin.root / "files" / "solo" / "talk.mp4", 500_000, "solo")
    disk(monkeypatch, total=100_000, free=100_000)
    with pytest.raises(TooLargeError):
        fetcher_for(origin).fetch(f"{origin.base_url}/files/solo/talk.mp4", staging)
    assert "talk.mp4" not in files_under(staging)


def test_bytes_already_fetched_are_not_needed_again(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an earlier attempt kept (a verified file, a part file) counts as present: only the rest must fit."""
    url = origin.add_course("partly", {"a.bin": 100_000, "b.bin": 1_000_000})
    with cut_transfer(origin, "/files/partly/b.bin", 600_000):
        fetcher_for(origin, concurrency=1).fetch(url, staging)
    disk(monkeypatch, total=TiB, free=defaults.DISK_HEADROOM + 400_000)
    result = fetcher_for(origin).fetch(url, staging)
    assert result.total_bytes == 1_100_000


class FillingFile:
    """A part file on a disk that fills after *room* bytes: writes past it fail with ENOSPC, as the OS answers."""

    def __init__(self, real: BinaryIO, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def test_disk_filling_while_writing_is_retried_and_keeps_the_bytes(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills mid-file (another program took the space after the check): a transient NoSpaceError naming
    the file, never an unexplained OSError; the bytes written stay, and the next attempt resumes after them."""
    url = origin.add_course("fills", {"a.bin": 1_000_000})
    real_open = fetch._open_file
    monkeypatch.setattr(fetch, "_open_file", lambda path, mode: FillingFile(real_open(path, mode), 600_000))
    with pytest.raises(NoSpaceError, match=r"a\.bin: the download disk is full") as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    monkeypatch.setattr(fetch, "_open_file", real_open)
    result = fetcher_for(origin).fetch(url, staging)
    assert result.total_bytes == 1_000_000
    with origin.requests.lock:
        ranges = [headers.get("Range") for _, path, headers in origin.requests.entries if path.endswith("/a.bin")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
