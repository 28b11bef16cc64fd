"""`python -m dev.origin FOLDER`: an operator's own folder served as a course, fetched by the real fetcher."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from udemy_dl.fetch import Fetcher

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def course_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "My Course"
    (folder / "week 1").mkdir(parents=True)
    (folder / "intro.txt").write_text("welcome\n")
    (folder / "week 1" / "lesson one.bin").write_bytes(bytes(range(256)) * 1000)
    (folder / ".hidden").write_text("not part of the course")
    return folder


@pytest.fixture
def served(course_folder: Path) -> Iterator[tuple[str, str]]:
    """The command running on a free port: (course URL, host:port to allow)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dev.origin", str(course_folder), "--port", "0", "--slug", "mine"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        second = process.stdout.readline()
        url = re.search(r"as the course (\S+)", first)
        host = re.search(r"ALLOWED_HOSTS=(\S+)", second)
        assert url and host, (first, second)
        yield url.group(1), host.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)


def test_a_folder_is_served_as_a_course_that_the_fetcher_downloads_verified(
    served: tuple[str, str], course_folder: Path, tmp_path: Path
) -> None:
    """Every regular file, spaces and subfolders included, arrives byte for byte, checked against the sha256 the
    manifest generated; hidden files are not part of the course."""
    url, host = served
    assert url.endswith("/courses/mine")
    staging = tmp_path / "staging"
    result = Fetcher({host}).fetch(url, staging)
    assert sorted(item.path for item in result.files) == ["intro.txt", "week 1/lesson one.bin"]
    for item in result.files:
        assert (staging / item.path).read_bytes() == (course_folder / item.path).read_bytes()


def test_a_missing_folder_is_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "dev.origin", str(missing), "--port", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr
