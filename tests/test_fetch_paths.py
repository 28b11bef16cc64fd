"""What the fetcher writes on disk: manifest paths the disk cannot hold are refused for good before anything is
fetched; nothing in the staging folder is followed through a symlink; only regular files and folders are moved
into place."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.fetching import cut_transfer, fetcher_for
from tests.support.files import files_under, sha256_of
from udemy_dl.errors import (
    PermanentError,
    UnsafePathError,
)
from udemy_dl.fetch import PARTS_DIRNAME, parse_manifest
from udemy_dl.folders import promote, write_record


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the task's folders that nothing may write to."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def one_file_course(origin: ContentOrigin, slug: str, paths: list[str], size: int = 100) -> str:
    """A manifest listing *paths*, all served from one small file on the origin."""
    write_sample_file(origin.root / "files" / slug / "data.bin", size, slug)
    files = [{"path": path, "url": f"/files/{slug}/data.bin"} for path in paths]
    return origin.set_manifest(f"/courses/{slug}", {"files": files})


def entries(folder: Path) -> Iterator[tuple[str, int]]:
    """(relative path, st_mode) of everything below *folder*, never following a symlink."""
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            path = Path(root) / name
            yield str(path.relative_to(folder)), os.lstat(path).st_mode


def only_plain(folder: Path) -> bool:
    return all(stat.S_ISREG(mode) or stat.S_ISDIR(mode) for _, mode in entries(folder))


# -- manifests the disk cannot hold (item 12) ---------------------------------------------------------


LONG_NAME = "é" * 200 + ".mp4"
"""200 characters, 404 bytes in UTF-8: more than the 255 bytes a Linux file name may hold."""


@pytest.mark.parametrize(
    ("paths", "shown"),
    [
        ([LONG_NAME], "éééé"),
        ([f"videos/{LONG_NAME}"], "éééé"),
        (["/".join(["d" * 250] * 20)], "bytes long"),
        (["a", "a/b"], "'a'"),
        (["a/b", "a"], "'a'"),
        (["x/a", "X/A/b"], "'X/A'"),
        (["\ud800.bin"], r"\\ud800"),
    ],
    ids=["long-name", "long-name-in-folder", "long-path", "file-then-folder", "folder-then-file", "case", "surrogate"],
)
def test_unwritable_manifest_path_fails_at_once_for_good(
    origin: ContentOrigin, staging: Path, paths: list[str], shown: str
) -> None:
    """A name longer than the disk allows, a path longer than it allows, a file where a folder must be, a path
    that is not text: a permanent error naming it, before any file is requested (retrying could never help)."""
    url = one_file_course(origin, "bad-paths", paths)
    with pytest.raises(PermanentError, match=shown):
        fetcher_for(origin).fetch(url, staging)
    assert origin.requests.paths() == ["/courses/bad-paths"]


def test_folder_named_like_the_record_is_refused() -> None:
    """`manifest.json/x` would make the record's name a folder: refused like `manifest.json` itself."""
    with pytest.raises(UnsafePathError, match="reserved"):
        parse_manifest(b'{"files": [{"path": "manifest.json/x", "url": "/a"}]}', "https://cdn.example/m")


def test_name_too_long_when_written_is_permanent(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the disk refuse a path the up-front check let through (it reports limits it does not keep), the
    ENAMETOOLONG on writing is a permanent error too, not an endless retry."""
    real_pathconf = os.pathconf

    def generous(path: Any, name: str | int) -> int:
        return 1 << 20 if name in ("PC_NAME_MAX", "PC_PATH_MAX") else real_pathconf(path, name)

    monkeypatch.setattr(os, "pathconf", generous)
    url = one_file_course(origin, "written", ["/".join(["d" * 250] * 20)])
    with pytest.raises(PermanentError, match="too long"):
        fetcher_for(origin).fetch(url, staging)


def test_single_file_with_a_long_name_is_saved_under_a_shorter_one(origin: ContentOrigin, staging: Path) -> None:
    """A single-file course whose name (from Content-Disposition) is too long for the disk is saved under that
    name shortened to fit."""
    sha = write_sample_file(origin.root / "files" / "solo" / "talk.mp4", 5000, "solo")
    origin.filenames["/files/solo/talk.mp4"] = LONG_NAME
    result = fetcher_for(origin).fetch(f"{origin.base_url}/files/solo/talk.mp4", staging)
    [item] = result.files
    assert item.sha256 == sha
    assert item.path.startswith("éé")
    assert len(item.path.encode()) <= 255
    assert files_under(staging) == [item.path]


def test_leftovers_of_an_older_manifest_do_not_block_the_new_one(origin: ContentOrigin, staging: Path) -> None:
    """The course changed between attempts: `a` was a file, now `a/b` is. The old file gives way, and only the
    current course's files remain."""
    url = one_file_course(origin, "changed", ["a", "old.bin"])
    fetcher_for(origin).fetch(url, staging)
    url = one_file_course(origin, "changed", ["a/b"])
    result = fetcher_for(origin).fetch(url, staging)
    assert [f.path for f in result.files] == ["a/b"]
    assert files_under(staging) == ["a/b"]


# -- symlinks in the staging folder (item 13) ---------------------------------------------------------


def test_parts_symlink_in_staging_is_not_followed_nor_kept(
    origin: ContentOrigin, staging: Path, outside: Path, tmp_path: Path
) -> None:
    """A `.parts` symlink already in the staging folder is removed, never written through; the folder moved
    into place holds regular files and folders only."""
    staging.mkdir(parents=True)
    (staging / PARTS_DIRNAME).symlink_to(outside, target_is_directory=True)
    url = origin.add_course("parts-link", {"a.bin": 5000, "sub/b.bin": 7000})
    result = fetcher_for(origin).fetch(url, staging)
    assert list(outside.iterdir()) == []
    assert files_under(staging) == ["a.bin", "sub/b.bin"]
    assert only_plain(staging)
    write_record(staging, result.record(url))
    final = tmp_path / "downloads" / "1"
    promote(staging, final)
    assert sorted(name for name, _ in entries(final)) == ["a.bin", "manifest.json", "sub", "sub/b.bin"]
    assert only_plain(final)


def test_parts_symlink_during_a_resume_is_not_followed(origin: ContentOrigin, staging: Path, outside: Path) -> None:
    """A part file swapped for a symlink between attempts is dropped, never read or appended through: the file
    is fetched again and the link's target is left as it was."""
    url = origin.add_course("part-link", {"big.bin": 3_000_000})
    with cut_transfer(origin, "/files/part-link/big.bin", 1_000_000):
        fetcher_for(origin).fetch(url, staging)
    [part] = (staging / PARTS_DIRNAME).glob("*.part")
    decoy = outside / "decoy"
    decoy.write_bytes(part.read_bytes())
    part.unlink()
    part.symlink_to(decoy)
    result = fetcher_for(origin).fetch(url, staging)
    assert sha256_of(staging / "big.bin") == result.files[0].sha256
    assert result.files[0].sha256 == origin.manifests["/courses/part-link"]["files"][0]["sha256"]
    assert decoy.stat().st_size == 1_000_000
    assert only_plain(staging)


def test_strays_in_staging_are_not_moved_into_place(origin: ContentOrigin, staging: Path, outside: Path) -> None:
    """Symlinks, a FIFO and files the course does not list, left in the staging folder, are gone when the fetch
    ends: what is moved into place is the course and nothing else."""
    (staging / "sub").mkdir(parents=True)
    (staging / "link").symlink_to(outside / "x")
    (staging / "folder-link").symlink_to(outside, target_is_directory=True)
    (staging / "sub" / "link").symlink_to("/etc/passwd")
    os.mkfifo(staging / "fifo")
    (staging / "stale.bin").write_bytes(b"not in the course")
    url = origin.add_course("strays", {"sub/a.bin": 100})
    fetcher_for(origin).fetch(url, staging)
    assert sorted(name for name, _ in entries(staging)) == ["sub", "sub/a.bin"]
    assert list(outside.iterdir()) == []


def test_a_symlink_where_a_course_file_or_its_folder_goes_is_removed_and_the_file_fetched(
    origin: ContentOrigin, staging: Path, outside: Path
) -> None:
    """A symlink at a course file's own path, or at a folder on its way, is removed, never written through:
    the course is fetched in full (a paid order is not failed for it) and what the links pointed at is left."""
    (outside / "victim.bin").write_bytes(b"someone else's")
    staging.mkdir(parents=True)
    (staging / "a.bin").symlink_to(outside / "victim.bin")
    (staging / "sub").symlink_to(outside, target_is_directory=True)
    url = origin.add_course("links-on-the-way", {"a.bin": 100, "sub/b.bin": 200})
    result = fetcher_for(origin).fetch(url, staging)
    assert sorted(item.path for item in result.files) == ["a.bin", "sub/b.bin"]
    assert only_plain(staging)
    assert sorted(path.name for path in outside.iterdir()) == ["victim.bin"]
    assert (outside / "victim.bin").read_bytes() == b"someone else's"


def test_strays_removed_from_staging_are_logged_as_what_they_are(
    origin: ContentOrigin, staging: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning for each stray names its kind: a plain file is a file, a hard link a hard-linked file, only a
    FIFO (or socket, device) a special file."""
    staging.mkdir(parents=True)
    (staging / "stale.bin").write_bytes(b"not in the course")
    (outside / "kept.bin").write_bytes(b"someone else's")
    os.link(outside / "kept.bin", staging / "hard.bin")
    os.mkfifo(staging / "fifo")
    (staging / "link").symlink_to(outside / "kept.bin")
    (staging / "old").mkdir()
    url = origin.add_course("stray-kinds", {"a.bin": 100})
    with caplog.at_level("WARNING", logger="udemy_dl.fetch"):
        fetcher_for(origin).fetch(url, staging)
    said = {
        Path(str(record.args[0])).name: str(record.args[1])
        for record in caplog.records
        if record.msg.startswith("removing %s from the staging folder") and isinstance(record.args, tuple)
    }
    assert said == {
        "stale.bin": "file",
        "hard.bin": "hard-linked file",
        "fifo": "special file",
        "link": "symlink",
        "old": "folder",
    }
    assert (outside / "kept.bin").read_bytes() == b"someone else's"


@pytest.mark.parametrize("kind", ["symlink", "folder-symlink", "fifo"])
def test_promote_refuses_anything_but_regular_files_and_folders(tmp_path: Path, kind: str) -> None:
    """promote() checks the tree it moves (without following links): a symlink or a special file anywhere in
    it is refused, and nothing is moved."""
    staging = tmp_path / "staging" / "1"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"a")
    odd = staging / "sub" / "odd"
    if kind == "symlink":
        odd.symlink_to("/etc/passwd")
    elif kind == "folder-symlink":
        odd.symlink_to(tmp_path, target_is_directory=True)
    else:
        os.mkfifo(odd)
    final = tmp_path / "final" / "1"
    with pytest.raises(UnsafePathError, match="sub/odd"):
        promote(staging, final)
    assert not final.exists()
    assert staging.is_dir()


def test_staging_that_is_a_symlink_is_not_promoted(tmp_path: Path) -> None:
    """A staging folder that is itself a symlink is not moved into place."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.bin").write_bytes(b"a")
    staging = tmp_path / "staging"
    staging.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        promote(staging, tmp_path / "final")
    assert not (tmp_path / "final").exists()
