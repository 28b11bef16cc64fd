"""Task folders on disk: a staging folder per task, moved into place whole, or kept aside on failure."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import LeaseBusyError, UnsafePathError
from .safety import join_inside, safe_relative_path
from .settings import Settings

RECORD_NAME = "manifest.json"
"""The record of what was fetched (path, size, sha256), written into each finished folder."""


def staging_path(settings: Settings, task_id: int) -> Path:
    return settings.staging_dir / str(task_id)


def final_path(settings: Settings, task_id: int) -> Path:
    return settings.download_dir / str(task_id)


@contextmanager
def staging_lock(settings: Settings, task_id: int) -> Iterator[None]:
    """An exclusive lock on the task's staging folder for one run on this host, beside the Redis
    lease: should two runs ever hold the lease in turn too close together (Redis lost it), the
    second still cannot write the folder the first is writing. Raises LeaseBusyError.

    The lock file, `<taskId>.lock` beside the folder, exists only while a run holds it: the holder
    removes it as it lets go, so no run, a cancel or a failure that removes the folder later leaves
    it behind. A run that opened the file just before it was removed would lock a file no longer
    there, guarding nothing: it sees that and opens the file again."""
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    lock_path = settings.staging_dir / f"{task_id}.lock"
    while True:
        handle = open(lock_path, "a+b")  # held open across the yield: the lock lives as long as it does
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LeaseBusyError(f"task {task_id}: another run on this host is writing its staging folder") from None
        except BaseException:
            handle.close()
            raise
        if _same_file(handle.fileno(), lock_path):
            break
        handle.close()  # its holder removed it as we opened it: lock the one there now
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # still held: a run that opened it meanwhile opens it again
        handle.close()  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    """Is the file open as *fd* the one at *path* now?"""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write the fetch record atomically (temp file, then rename)."""
    temp = folder / f".{RECORD_NAME}.tmp"
    temp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temp, folder / RECORD_NAME)


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_staging(staging: Path, course_url: str) -> dict[str, Any] | None:
    """The record of a course already fetched and verified in *staging* (a run wrote it and stopped
    before moving the folder into place), if every file it lists is there, a regular file of the
    recorded size; else None (the course is fetched, resuming what it can)."""
    record = read_record(staging)
    if record is None or record.get("courseUrl") != course_url or not isinstance(record.get("files"), list):
        return None
    for entry in record["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return None
        try:
            path = join_inside(staging, safe_relative_path(entry["path"]))
            info = os.lstat(path)
        except (OSError, UnsafePathError):
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.get("size"):
            return None
    return record


def promote(staging: Path, final: Path) -> None:
    """Move a verified staging folder into place in one rename (same file system).

    Only regular files and real folders are moved: a symlink or a special file anywhere in the
    tree (checked without following links) raises UnsafePathError and nothing moves.
    """
    check_plain_tree(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def check_plain_tree(folder: Path) -> None:
    """Raise UnsafePathError unless *folder* is a real folder holding only regular files and real folders."""
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise UnsafePathError(f"refusing to move {str(folder)!r} into place: not a real folder")
    for root, dirs, names in os.walk(folder):  # never descends into a symlinked folder
        for name in [*dirs, *names]:
            mode = os.lstat(os.path.join(root, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                relative = Path(root, name).relative_to(folder).as_posix()
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise UnsafePathError(f"refusing to move {str(folder)!r} into place: {relative!r} is {kind}")


def keep_failed(settings: Settings, task_id: int, staging: Path, reason: str) -> Path:
    """Move what a failed task fetched to FAILED_DIR/<taskId>-<UTC time>/ with an error.txt."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = settings.failed_dir / f"{task_id}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging.is_dir():
        shutil.move(str(staging), str(target))
    else:
        target.mkdir(parents=True)
    (target / "error.txt").write_text(f"task {task_id} failed at {stamp}\n{reason}\n", encoding="utf-8")
    return target


def remove_folder(folder: Path) -> bool:
    """Delete *folder* and what it holds, following no symlink (a symlink in its place is only
    unlinked). False when there was nothing to delete."""
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(folder)  # the fd-based rmtree on Linux: a link inside is removed, never followed
    else:
        folder.unlink()
    return True
