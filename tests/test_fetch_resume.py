"""Resuming a file against an origin that misbehaves: whatever it answers, no corrupt file is ever put in
place, and an origin that serves the right bytes later is never a permanent failure.

Each case first cuts a transfer mid-file (the bytes so far stay in the part file), then changes how the
origin answers the resume.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.fetching import cut_transfer, fetcher_for, killed_at_part_rename
from tests.support.files import files_under, sha256_of
from udemy_dl.errors import IntegrityError, TransientError
from udemy_dl.fetch import FetchResult

SIZE = 3_000_000
CUT = 2_000_000


def cut_course(origin: ContentOrigin, staging: Path, slug: str, checksums: bool = True, size: int = SIZE) -> str:
    """A one-file course whose first fetch is cut after CUT bytes; returns the course URL."""
    url = origin.add_course(slug, {"big.bin": size}, with_checksums=checksums)
    with cut_transfer(origin, file_path(slug), CUT):
        fetcher_for(origin).fetch(url, staging)
    return url


def file_path(slug: str) -> str:
    return f"/files/{slug}/big.bin"


def requests_for(origin: ContentOrigin, path: str) -> list[dict[str, str]]:
    """Headers of every request the origin received for *path*, in order."""
    return [headers for _, seen, headers in origin.requests.entries if seen == path]


def rewrite(origin: ContentOrigin, slug: str, seed: str, size: int = SIZE, mtime_step: int = 0) -> str:
    """Replace the origin's file with other bytes of the same size; returns the new sha256.

    *mtime_step* moves the file's mtime that many seconds past the old one (Last-Modified has whole
    seconds: a rewrite within the same second would not change it).
    """
    target = origin.root / "files" / slug / "big.bin"
    before = target.stat().st_mtime_ns
    sha = write_sample_file(target, size, seed)
    stamp = before + max(mtime_step, 1) * 1_000_000_000
    os.utime(target, ns=(stamp, stamp))
    return sha


def expected_sha(origin: ContentOrigin, slug: str) -> str:
    return sha256_of(origin.root / "files" / slug / "big.bin")


def assert_in_place(result: FetchResult, staging: Path, sha: str) -> None:
    assert [(f.path, f.sha256) for f in result.files] == [("big.bin", sha)]
    assert sha256_of(staging / "big.bin") == sha
    assert files_under(staging) == ["big.bin"]


# -- a part file that already holds every byte (item 3) -------------------------------------------------


def test_part_complete_when_the_connection_broke_before_the_last_chunk_is_verified(
    origin: ContentOrigin, staging: Path
) -> None:
    """A chunked body whose every byte arrived but whose final empty chunk did not: the next attempt's Range
    request is answered 416 `bytes */<size>`, which says the part is complete; it is verified and put in place,
    not refused for good."""
    size = 8 * 256 * 1024  # whole chunks of the origin's, whole reads of ours: every byte reaches the part
    url = origin.add_course("whole", {"big.bin": size}, with_checksums=False)
    origin.chunked = True
    with cut_transfer(origin, file_path("whole"), size):
        fetcher_for(origin).fetch(url, staging)
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "whole"))
    assert requests_for(origin, file_path("whole"))[1].get("Range") == f"bytes={size}-"
    assert origin.bytes_sent[file_path("whole")] == size  # nothing sent twice


def test_chunked_body_cut_mid_read_keeps_every_byte_received(origin: ContentOrigin, staging: Path) -> None:
    """A chunked body cut inside one of our reads: the bytes of that read are kept too, so the resume asks for
    exactly the bytes that never arrived."""
    url = origin.add_course("midread", {"big.bin": SIZE}, with_checksums=False)
    origin.chunked = True
    with cut_transfer(origin, file_path("midread"), 1_000_000):
        fetcher_for(origin).fetch(url, staging)
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "midread"))
    assert requests_for(origin, file_path("midread"))[1].get("Range") == "bytes=1000000-"


def test_part_complete_when_killed_before_the_rename_is_put_in_place(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed between the last write and the rename leaves a complete part file: the next run verifies it
    and moves it into place, without fetching it again and without a permanent 416."""

    url = origin.add_course("killed", {"big.bin": SIZE})
    with killed_at_part_rename():
        fetcher_for(origin).fetch(url, staging)
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "killed"))
    assert origin.bytes_sent[file_path("killed")] == SIZE


def test_complete_single_file_part_is_put_in_place(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a single-file course (its size comes from the first answer's Content-Length)."""

    sha = write_sample_file(origin.root / "files" / "solo" / "talk.mp4", SIZE, "solo")
    course = f"{origin.base_url}/files/solo/talk.mp4"
    with killed_at_part_rename():
        fetcher_for(origin).fetch(course, staging)
    result = fetcher_for(origin).fetch(course, staging)
    assert [(f.path, f.sha256) for f in result.files] == [("talk.mp4", sha)]
    assert origin.bytes_sent["/files/solo/talk.mp4"] == SIZE


def test_416_for_an_incomplete_part_starts_the_file_again(origin: ContentOrigin, staging: Path) -> None:
    """An origin answering the resume with 416 although the part is short: the file is fetched again from byte
    0 and comes out right; a 416 on a resume is never a permanent refusal."""
    url = cut_course(origin, staging, "refused")
    origin.unsatisfiable[file_path("refused")] = 1
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "refused"))
    ranges = [headers.get("Range") for headers in requests_for(origin, file_path("refused"))]
    assert ranges[0] is None and ranges[1] is not None and ranges[2] is None


def test_416_without_content_range_starts_the_file_again(origin: ContentOrigin, staging: Path) -> None:
    """A 416 for a part the origin calls complete while the manifest declares more bytes: fetched again whole."""
    url = cut_course(origin, staging, "short416")
    origin.unsatisfiable[file_path("short416")] = 1
    origin.content_range[file_path("short416")] = lambda start, size: "bytes */garbage"
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "short416"))


# -- two versions of one file (item 4) ------------------------------------------------------------------


def test_origin_ignoring_if_range_does_not_splice_two_versions(origin: ContentOrigin, staging: Path) -> None:
    """The file changed since the cut and the origin answers 206 despite the old If-Range: its ETag differs
    from the one stored, so the file starts again from byte 0 (no sha256 in the manifest to catch a splice)."""
    url = cut_course(origin, staging, "splice", checksums=False)
    new_sha = rewrite(origin, "splice", "version two")
    origin.honour_if_range = False
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


def test_origin_ignoring_if_range_with_a_checksum_finishes_in_one_attempt(origin: ContentOrigin, staging: Path) -> None:
    """With a sha256 in the manifest the splice would be caught, but the attempt must not be wasted either."""
    url = cut_course(origin, staging, "splice-sha")
    new_sha = rewrite(origin, "splice-sha", "version two")
    origin.manifests["/courses/splice-sha"]["files"][0]["sha256"] = new_sha
    origin.honour_if_range = False
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


def test_validator_missing_from_the_206_starts_again(origin: ContentOrigin, staging: Path) -> None:
    """A 206 without the ETag stored at the start cannot prove it is the same file: fetched again whole."""
    url = cut_course(origin, staging, "noetag", checksums=False)
    new_sha = rewrite(origin, "noetag", "version two")
    origin.honour_if_range = False
    origin.send_etag = False
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


def test_resume_with_only_last_modified(origin: ContentOrigin, staging: Path) -> None:
    """An origin that sends Last-Modified and no ETag: the resume sends it as If-Range and continues from the
    cut; no byte is sent twice."""
    origin.send_etag = False
    origin.send_last_modified = True
    url = cut_course(origin, staging, "lm")
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "lm"))
    resume = requests_for(origin, file_path("lm"))[1]
    match = re.fullmatch(r"bytes=(\d+)-", resume.get("Range", ""))
    assert match is not None
    assert resume.get("If-Range", "").endswith(" GMT")
    assert origin.bytes_sent[file_path("lm")] == CUT + (SIZE - int(match.group(1)))


def test_last_modified_change_with_if_range_honoured_comes_back_whole(origin: ContentOrigin, staging: Path) -> None:
    """The file changed (new Last-Modified): the origin answers the If-Range with the whole new file."""
    origin.send_etag = False
    origin.send_last_modified = True
    url = cut_course(origin, staging, "lm-changed", checksums=False)
    new_sha = rewrite(origin, "lm-changed", "version two", mtime_step=10)
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


def test_last_modified_change_with_if_range_ignored_is_not_spliced(origin: ContentOrigin, staging: Path) -> None:
    """The file changed (new Last-Modified) and the origin ignores If-Range: the 206's Last-Modified differs
    from the stored one, so the file starts again."""
    origin.send_etag = False
    origin.send_last_modified = True
    url = cut_course(origin, staging, "lm-splice", checksums=False)
    new_sha = rewrite(origin, "lm-splice", "version two", mtime_step=10)
    origin.honour_if_range = False
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


def test_no_validator_and_no_checksum_is_never_resumed(origin: ContentOrigin, staging: Path) -> None:
    """Neither ETag nor Last-Modified nor a sha256: nothing could tell two versions apart, so the file is
    fetched again whole rather than continued."""
    origin.send_etag = False
    url = cut_course(origin, staging, "blind", checksums=False)
    new_sha = rewrite(origin, "blind", "version two")
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)
    assert all(headers.get("Range") is None for headers in requests_for(origin, file_path("blind")))


def test_no_validator_but_a_checksum_resumes_and_recovers_from_a_splice(origin: ContentOrigin, staging: Path) -> None:
    """Without validators a sha256 still allows a resume; if the result is spliced (the file changed) it is
    fetched again whole in the same attempt."""
    origin.send_etag = False
    url = cut_course(origin, staging, "blind-sha")
    new_sha = rewrite(origin, "blind-sha", "version two")
    origin.manifests["/courses/blind-sha"]["files"][0]["sha256"] = new_sha
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, new_sha)


# -- other misbehaviour on resume -----------------------------------------------------------------------


LIES: dict[str, Callable[[int, int], str]] = {
    "wrong-start": lambda start, size: f"bytes {start - 1000}-{size - 1}/{size}",
    "wrong-total": lambda start, size: f"bytes {start}-{size}/{size + 1}",
    "short-end": lambda start, size: f"bytes {start}-{size - 2}/{size}",
    "unknown-total": lambda start, size: f"bytes {start}-{size - 1}/*",
    "malformed": lambda start, size: "bytes=everything",
}


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest.mark.parametrize("checksums", [True, False], ids=["sha256", "no-sha256"])
def test_lying_content_range_never_corrupts(origin: ContentOrigin, staging: Path, lie: str, checksums: bool) -> None:
    """A 206 whose Content-Range does not match what was asked (start, total, end or shape) is not appended to
    the part: the file is fetched again whole and comes out right."""
    slug = f"lie-{lie}-{checksums}"
    url = cut_course(origin, staging, slug, checksums=checksums)
    origin.content_range[file_path(slug)] = LIES[lie]
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, slug))


def test_body_shorter_than_announced_on_resume_keeps_its_bytes(origin: ContentOrigin, staging: Path) -> None:
    """A resume cut short again is a transient error that keeps what arrived; the third attempt finishes from
    there and no byte is sent twice."""
    url = cut_course(origin, staging, "twice")
    with cut_transfer(origin, file_path("twice"), CUT + 500_000) as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "twice"))
    assert origin.bytes_sent[file_path("twice")] == SIZE


def test_file_grown_since_the_cut_is_refused_then_fetched_when_right(origin: ContentOrigin, staging: Path) -> None:
    """The origin now sends more than the manifest declares: a transient IntegrityError, nothing in place; once
    it serves the declared bytes again, the file is fetched and verified."""
    url = cut_course(origin, staging, "grown")
    origin.padding[file_path("grown")] = 500
    with pytest.raises(IntegrityError) as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    assert not (staging / "big.bin").exists()
    del origin.padding[file_path("grown")]
    result = fetcher_for(origin).fetch(url, staging)
    assert_in_place(result, staging, expected_sha(origin, "grown"))


@pytest.mark.parametrize("checksums", [True, False], ids=["sha256", "no-sha256"])
def test_body_longer_than_content_length_never_corrupts(origin: ContentOrigin, staging: Path, checksums: bool) -> None:
    """Bytes past the announced Content-Length (on the resume and on the next file over the same connection)
    never reach a file: what is in place is right, or the attempt fails transiently and the next one is."""
    url = origin.add_course("overrun", {"big.bin": SIZE, "next.bin": 100_000}, with_checksums=checksums)
    fetcher = fetcher_for(origin, concurrency=1)
    with cut_transfer(origin, file_path("overrun"), CUT):
        fetcher.fetch(url, staging)
    origin.overrun[file_path("overrun")] = 70_000
    try:
        result = fetcher.fetch(url, staging)
    except TransientError:
        origin.overrun.clear()
        result = fetcher.fetch(url, staging)
    for item in result.files:
        assert sha256_of(staging / item.path) == item.sha256
        assert item.sha256 == sha256_of(origin.root / "files" / "overrun" / item.path)
