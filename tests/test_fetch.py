"""The fetcher against a real local origin: manifests, single files, tokens, integrity, errors, the allow-list."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.fetching import TIMEOUT, cut_transfer, fetcher_for, resolve_to_loopback
from tests.support.files import files_under, sha256_of
from tests.support.http_servers import start_server
from udemy_dl.errors import (
    BadManifestError,
    CommandError,
    FetchError,
    HostNotAllowedError,
    IntegrityError,
    OriginRefusedError,
    PermanentError,
    TooLargeError,
    TransientError,
    UnsafePathError,
)
from udemy_dl.fetch import Fetcher, parse_manifest
from udemy_dl.fetch_command import CommandFetcher


@pytest.fixture
def private_origin(tmp_path: Path) -> Iterator[ContentOrigin]:
    """An origin that answers 401 unless the request carries `Bearer origin-token`."""
    server = start_server(ContentOrigin(tmp_path / "private", token="origin-token"))
    yield server
    server.stop()


# -- what arrives ---------------------------------------------------------------------------------


def test_manifest_files_are_fetched_and_verified(origin: ContentOrigin, staging: Path) -> None:
    """Every file a manifest lists lands in staging with the size and sha256 the manifest declares."""
    url = origin.add_course("intro", {"a.bin": 1500, "sub/b.bin": 70_000})
    declared = {item["path"]: item for item in origin.manifests["/courses/intro"]["files"]}
    result = fetcher_for(origin).fetch(url, staging)
    assert files_under(staging) == ["a.bin", "sub/b.bin"]
    for item in result.files:
        assert (item.size, item.sha256) == (declared[item.path]["size"], declared[item.path]["sha256"])
        assert sha256_of(staging / item.path) == item.sha256
    assert (result.title, result.total_bytes) == ("Intro", 71_500)


def test_manifest_urls_are_resolved_relative_to_the_manifest(origin: ContentOrigin, staging: Path) -> None:
    """A file URL like `../files/x` is resolved against the manifest's own URL."""
    sha = write_sample_file(origin.root / "files" / "rel" / "x.bin", 2048, "rel")
    url = origin.set_manifest("/courses/rel", {"files": [{"path": "x.bin", "url": "../files/rel/x.bin"}]})
    result = fetcher_for(origin).fetch(url, staging)
    assert [(f.path, f.sha256) for f in result.files] == [("x.bin", sha)]
    assert origin.requests.paths() == ["/courses/rel", "/files/rel/x.bin"]


def test_manifest_without_checksums_is_fetched_and_hashed(origin: ContentOrigin, staging: Path) -> None:
    """Size and sha256 are optional in the manifest; the fetcher computes the hash itself."""
    url = origin.add_course("plain", {"a.bin": 3000}, with_checksums=False)
    result = fetcher_for(origin).fetch(url, staging)
    assert result.files[0].sha256 == sha256_of(staging / "a.bin")
    assert result.files[0].size == 3000


def test_single_file_url_is_fetched(origin: ContentOrigin, staging: Path) -> None:
    """A course URL that answers with a file (not JSON) is fetched as that one file, named from the URL."""
    sha = write_sample_file(origin.root / "files" / "one" / "video.mp4", 100_000, "one")
    result = fetcher_for(origin).fetch(f"{origin.base_url}/files/one/video.mp4", staging)
    assert files_under(staging) == ["video.mp4"]
    assert [(f.path, f.size, f.sha256) for f in result.files] == [("video.mp4", 100_000, sha)]


def test_single_file_cannot_overwrite_the_record(origin: ContentOrigin, staging: Path) -> None:
    """A single file named manifest.json is renamed so it cannot clobber the fetch record."""
    write_sample_file(origin.root / "files" / "x" / "manifest.json", 10, "x")
    result = fetcher_for(origin).fetch(f"{origin.base_url}/files/x/manifest.json", staging)
    assert [f.path for f in result.files] == ["file-manifest.json"]


def test_bearer_token_is_sent_on_every_request(private_origin: ContentOrigin, staging: Path) -> None:
    """With CONTENT_TOKEN set, the manifest and each file request carry `Authorization: Bearer <token>`."""
    url = private_origin.add_course("paid", {"a.bin": 10, "b.bin": 20})
    fetcher_for(private_origin, token="origin-token").fetch(url, staging)
    headers = [entry[2] for entry in private_origin.requests.entries]
    assert len(headers) == 3
    assert all(h.get("Authorization") == "Bearer origin-token" for h in headers)


def test_missing_token_is_refused_permanently(private_origin: ContentOrigin, staging: Path) -> None:
    """Without the token a protected origin answers 401: an OriginRefusedError (permanent)."""
    url = private_origin.add_course("paid", {"a.bin": 10})
    with pytest.raises(OriginRefusedError, match="401"):
        fetcher_for(private_origin).fetch(url, staging)


def test_progress_reports_every_byte_and_file(origin: ContentOrigin, staging: Path) -> None:
    """The progress callback ends with all bytes of all files done."""
    url = origin.add_course("prog", {"a.bin": 5000, "b.bin": 7000})
    calls: list[tuple[int, int | None, int, int]] = []
    fetcher_for(origin).fetch(url, staging, on_progress=lambda *args: calls.append(args))
    assert calls[-1] == (12_000, 12_000, 2, 2)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_verified_files_from_a_failed_attempt_are_not_fetched_again(origin: ContentOrigin, staging: Path) -> None:
    """After an attempt that failed on the second file, the retry into the same staging skips the verified first."""
    url = origin.add_course("resume", {"a.bin": 4000, "b.bin": 4000})
    origin.fail_next("/files/resume/b.bin", 1)
    fetcher = fetcher_for(origin, concurrency=1)  # one file at a time: a.bin is complete before b.bin fails
    with pytest.raises(FetchError):
        fetcher.fetch(url, staging)
    result = fetcher.fetch(url, staging)
    paths = origin.requests.paths()
    assert (paths.count("/files/resume/a.bin"), paths.count("/files/resume/b.bin")) == (1, 2)
    assert [f.path for f in result.files] == ["a.bin", "b.bin"]


def test_interrupted_file_resumes_with_a_range_request(origin: ContentOrigin, staging: Path) -> None:
    """A transfer cut mid-file keeps its bytes; the next attempt asks only for the rest (Range) and verifies."""
    url = origin.add_course("cut", {"big.bin": 5_000_000})
    with cut_transfer(origin, "/files/cut/big.bin", 3_000_000):
        fetcher_for(origin).fetch(url, staging)
    result = fetcher_for(origin).fetch(url, staging)
    ranges = [headers.get("Range") for _, path, headers in origin.requests.entries if path == "/files/cut/big.bin"]
    assert ranges[0] is None and len(ranges) == 2
    match = re.fullmatch(r"bytes=(\d+)-", ranges[1] or "")
    assert match is not None and 0 < int(match.group(1)) <= 3_000_000
    resumed_at = int(match.group(1))
    assert origin.bytes_sent["/files/cut/big.bin"] == 3_000_000 + (5_000_000 - resumed_at)  # nothing sent twice
    assert result.files[0].sha256 == origin.manifests["/courses/cut"]["files"][0]["sha256"]
    assert sha256_of(staging / "big.bin") == result.files[0].sha256


def test_interrupted_file_that_changed_is_fetched_whole(origin: ContentOrigin, staging: Path) -> None:
    """If the file changed on the origin since the cut, If-Range makes it come back whole: never a spliced file."""
    url = origin.add_course("changed", {"big.bin": 3_000_000})
    with cut_transfer(origin, "/files/changed/big.bin", 2_500_000):
        fetcher_for(origin).fetch(url, staging)
    new_sha = write_sample_file(origin.root / "files" / "changed" / "big.bin", 3_000_000, "new content")
    origin.manifests["/courses/changed"]["files"][0]["sha256"] = new_sha
    result = fetcher_for(origin).fetch(url, staging)
    assert result.files[0].sha256 == new_sha == sha256_of(staging / "big.bin")


def test_origin_ignoring_range_still_gives_a_correct_file(origin: ContentOrigin, staging: Path) -> None:
    """An origin that answers a Range request with the whole file (200) is handled: the file restarts cleanly."""
    url = origin.add_course("norange", {"big.bin": 3_000_000})
    with cut_transfer(origin, "/files/norange/big.bin", 2_500_000):
        fetcher_for(origin).fetch(url, staging)
    origin.ignore_range = True
    result = fetcher_for(origin).fetch(url, staging)
    assert sha256_of(staging / "big.bin") == result.files[0].sha256
    assert result.files[0].sha256 == origin.manifests["/courses/norange"]["files"][0]["sha256"]


def test_interrupted_single_file_resumes(origin: ContentOrigin, staging: Path) -> None:
    """A single-file course cut mid-transfer continues with a Range request on the next attempt."""
    sha = write_sample_file(origin.root / "files" / "solo" / "talk.mp4", 4_000_000, "solo")
    course = f"{origin.base_url}/files/solo/talk.mp4"
    with cut_transfer(origin, "/files/solo/talk.mp4", 3_000_000):
        fetcher_for(origin).fetch(course, staging)
    result = fetcher_for(origin).fetch(course, staging)
    assert [(f.path, f.sha256) for f in result.files] == [("talk.mp4", sha)]
    assert [h.get("Range") is not None for _, p, h in origin.requests.entries] == [False, True]


# -- integrity --------------------------------------------------------------------------------------


def test_sha256_mismatch_raises_integrity_error_and_leaves_no_file(origin: ContentOrigin, staging: Path) -> None:
    """A body whose sha256 differs from the manifest's is an IntegrityError; neither file nor .part remains."""
    write_sample_file(origin.root / "files" / "bad" / "a.bin", 1000, "bad")
    url = origin.set_manifest(
        "/courses/bad", {"files": [{"path": "a.bin", "url": "/files/bad/a.bin", "size": 1000, "sha256": "0" * 64}]}
    )
    with pytest.raises(IntegrityError, match="sha256"):
        fetcher_for(origin).fetch(url, staging)
    assert files_under(staging) == []


def test_size_mismatch_raises_integrity_error_and_leaves_no_file(origin: ContentOrigin, staging: Path) -> None:
    """A body longer than the manifest's size is cut off as an IntegrityError; nothing remains."""
    write_sample_file(origin.root / "files" / "big" / "a.bin", 5000, "big")
    url = origin.set_manifest("/courses/big", {"files": [{"path": "a.bin", "url": "/files/big/a.bin", "size": 10}]})
    with pytest.raises(IntegrityError):
        fetcher_for(origin).fetch(url, staging)
    assert files_under(staging) == []


def test_body_longer_than_declared_is_an_integrity_error(origin: ContentOrigin, staging: Path) -> None:
    """An origin sending more bytes than the manifest declares is cut off; nothing of it remains."""
    url = origin.add_course("padded", {"a.bin": 1000})
    origin.padding["/files/padded/a.bin"] = 500
    with pytest.raises(IntegrityError):
        fetcher_for(origin).fetch(url, staging)
    assert [p for p in files_under(staging) if not p.startswith(".parts/")] == []


def test_course_over_max_task_bytes_is_refused_before_fetching(origin: ContentOrigin, staging: Path) -> None:
    """Declared sizes adding up to more than MAX_TASK_BYTES: TooLargeError (permanent), no file requested."""
    url = origin.add_course("huge", {"a.bin": 600, "b.bin": 600})
    with pytest.raises(TooLargeError) as caught:
        fetcher_for(origin, max_task_bytes=1000).fetch(url, staging)
    assert isinstance(caught.value, PermanentError)
    assert origin.requests.paths() == ["/courses/huge"]


def test_undeclared_file_over_max_task_bytes_is_cut_off(origin: ContentOrigin, staging: Path) -> None:
    """Without declared sizes, a body passing MAX_TASK_BYTES is stopped mid-stream and discarded."""
    url = origin.add_course("sneaky", {"a.bin": 50_000}, with_checksums=False)
    with pytest.raises(TooLargeError):
        fetcher_for(origin, max_task_bytes=10_000).fetch(url, staging)
    assert [p for p in files_under(staging) if p.endswith((".part", ".bin"))] == []


def test_integrity_error_is_transient() -> None:
    """A corrupted transfer may succeed next time: IntegrityError is retried."""
    assert issubclass(IntegrityError, TransientError)


# -- origin errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["manifest", "file"])
def test_server_error_is_a_transient_fetch_error(origin: ContentOrigin, staging: Path, failing: str) -> None:
    """A 5xx from the origin (on the manifest or a file) raises FetchError, which is retried."""
    url = origin.add_course("flaky", {"a.bin": 100})
    origin.fail_next("/courses/flaky" if failing == "manifest" else "/files/flaky/a.bin", 1)
    with pytest.raises(FetchError, match="500") as caught:
        fetcher_for(origin).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    assert files_under(staging) == []


def test_not_found_is_a_permanent_origin_refusal(origin: ContentOrigin, staging: Path) -> None:
    """A 404 raises OriginRefusedError, which is not retried."""
    with pytest.raises(OriginRefusedError, match="404") as caught:
        fetcher_for(origin).fetch(f"{origin.base_url}/courses/nope", staging)
    assert isinstance(caught.value, PermanentError)


def test_missing_file_in_a_manifest_is_a_permanent_refusal(origin: ContentOrigin, staging: Path) -> None:
    """A manifest pointing at a file the origin does not have fails permanently with the 404."""
    url = origin.set_manifest("/courses/gap", {"files": [{"path": "a.bin", "url": "/files/gap/missing.bin"}]})
    with pytest.raises(OriginRefusedError, match="404"):
        fetcher_for(origin).fetch(url, staging)


def test_unreachable_origin_is_a_transient_fetch_error(staging: Path) -> None:
    """A refused connection raises FetchError (retried), not a requests exception."""
    with pytest.raises(FetchError):
        Fetcher({"127.0.0.1:1"}, timeout=TIMEOUT).fetch("http://127.0.0.1:1/course", staging)


# -- the allow-list and paths -----------------------------------------------------------------------


def test_course_url_off_the_allow_list_is_never_requested(
    origin: ContentOrigin, other_origin: ContentOrigin, staging: Path
) -> None:
    """A course URL on a host:port that ALLOWED_HOSTS does not list is refused before any request."""
    url = other_origin.add_course("elsewhere", {"a.bin": 10})
    with pytest.raises(HostNotAllowedError):
        fetcher_for(origin).fetch(url, staging)
    assert other_origin.requests.paths() == []


def test_file_url_off_the_allow_list_is_refused_before_any_file_request(
    origin: ContentOrigin, other_origin: ContentOrigin, staging: Path
) -> None:
    """A manifest naming a file on another server fails with HostNotAllowedError; that server sees no request."""
    write_sample_file(origin.root / "files" / "mixed" / "ok.bin", 10, "ok")
    write_sample_file(other_origin.root / "files" / "mixed" / "stolen.bin", 10, "stolen")
    url = origin.set_manifest(
        "/courses/mixed",
        {
            "files": [
                {"path": "ok.bin", "url": "/files/mixed/ok.bin"},
                {"path": "stolen.bin", "url": f"{other_origin.base_url}/files/mixed/stolen.bin"},
            ]
        },
    )
    with pytest.raises(HostNotAllowedError):
        fetcher_for(origin).fetch(url, staging)
    assert other_origin.requests.paths() == []
    assert origin.requests.paths() == ["/courses/mixed"]
    assert files_under(staging) == []


def test_manifest_path_with_dotdot_is_refused_and_nothing_written_outside(
    origin: ContentOrigin, tmp_path: Path, staging: Path
) -> None:
    """A manifest path climbing out of the task folder raises UnsafePathError; no file is requested or written."""
    write_sample_file(origin.root / "files" / "evil" / "x.bin", 10, "evil")
    url = origin.set_manifest("/courses/evil", {"files": [{"path": "../../escape.bin", "url": "/files/evil/x.bin"}]})
    before = set(files_under(tmp_path))
    with pytest.raises(UnsafePathError):
        fetcher_for(origin).fetch(url, staging)
    assert set(files_under(tmp_path)) == before
    assert origin.requests.paths() == ["/courses/evil"]


def test_symlink_planted_in_staging_is_not_written_through(
    origin: ContentOrigin, tmp_path: Path, staging: Path
) -> None:
    """If staging holds a symlinked folder pointing outside, the link is removed, not followed: the file is
    fetched into a real folder and nothing lands outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    staging.mkdir(parents=True)
    (staging / "sub").symlink_to(outside, target_is_directory=True)
    url = origin.add_course("sym", {"sub/a.bin": 10})
    fetcher_for(origin).fetch(url, staging)
    assert (staging / "sub").is_dir() and not (staging / "sub").is_symlink()
    assert (staging / "sub" / "a.bin").stat().st_size == 10
    assert list(outside.iterdir()) == []


def test_redirect_to_a_host_off_the_list_is_refused(
    origin: ContentOrigin, other_origin: ContentOrigin, staging: Path
) -> None:
    """An allowed host that redirects elsewhere does not get us there: HostNotAllowedError, no request made."""
    origin.redirects["/courses/moved-away"] = other_origin.add_course("away", {"a.bin": 10})
    with pytest.raises(HostNotAllowedError):
        fetcher_for(origin, token="origin-token").fetch(f"{origin.base_url}/courses/moved-away", staging)
    assert origin.requests.paths() == ["/courses/moved-away"]
    assert other_origin.requests.paths() == []


def test_redirect_within_allowed_hosts_is_followed(
    origin: ContentOrigin, other_origin: ContentOrigin, staging: Path
) -> None:
    """A redirect to another allowed host is followed, and relative file URLs resolve against the final URL."""
    origin.redirects["/courses/moved"] = other_origin.add_course("moved", {"a.bin": 64})
    result = fetcher_for(origin, other_origin).fetch(f"{origin.base_url}/courses/moved", staging)
    assert [f.path for f in result.files] == ["a.bin"]
    assert other_origin.requests.paths() == ["/courses/moved", "/files/moved/a.bin"]


def test_redirect_to_a_malformed_url_is_a_fetch_error_naming_it(origin: ContentOrigin, staging: Path) -> None:
    """A Location the URL parser cannot read (an empty IPv6 host) is the origin misbehaving: a FetchError that
    quotes it (retried like any transient fault), never a ValueError from deep inside the fetch."""
    origin.redirects["/courses/broken"] = "http://[]/x"
    with pytest.raises(FetchError, match=r"malformed URL 'http://\[\]/x'"):
        fetcher_for(origin).fetch(f"{origin.base_url}/courses/broken", staging)


def test_redirect_loop_gives_up(origin: ContentOrigin, staging: Path) -> None:
    """Endless redirects stop after a few hops with a FetchError."""
    origin.redirects["/a"] = "/b"
    origin.redirects["/b"] = "/a"
    with pytest.raises(FetchError, match="redirects"):
        fetcher_for(origin).fetch(f"{origin.base_url}/a", staging)
    assert len(origin.requests.paths()) <= 10


def test_pattern_allowed_host_on_an_internal_address_is_refused(
    origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host allowed only by a `*.` pattern whose name resolves to an internal address is refused at connect
    time, before any request (or token) is sent: DNS cannot smuggle an internal target in."""
    port = origin.host_port.rsplit(":", 1)[1]
    origin.add_course("internal", {"a.bin": 10})
    resolve_to_loopback(monkeypatch, "origin.cdn.test")
    fetcher = Fetcher({f"*.cdn.test:{port}"}, token="origin-token", timeout=TIMEOUT)
    with pytest.raises(HostNotAllowedError, match="internal address"):
        fetcher.fetch(f"http://origin.cdn.test:{port}/courses/internal", staging)
    assert origin.requests.paths() == []


def test_exactly_listed_internal_host_is_allowed(origin: ContentOrigin, staging: Path) -> None:
    """Listing the internal host:port exactly (as the local origin here) is the operator's explicit consent."""
    url = origin.add_course("listed", {"a.bin": 10})
    assert [f.path for f in fetcher_for(origin).fetch(url, staging).files] == ["a.bin"]


# -- manifest shape ---------------------------------------------------------------------------------


def test_valid_manifest_parses_into_file_specs() -> None:
    """parse_manifest returns the title and one spec per file, URLs made absolute."""
    title, specs = parse_manifest(
        json.dumps(
            {"title": "T", "files": [{"path": "a/b.bin", "url": "b.bin", "size": 3, "sha256": "A" * 64}]}
        ).encode(),
        "https://cdn.example/courses/1/",
    )
    assert title == "T"
    assert [(str(s.path), s.url, s.size, s.sha256) for s in specs] == [
        ("a/b.bin", "https://cdn.example/courses/1/b.bin", 3, "a" * 64)
    ]


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (b"{not json", BadManifestError),
        (b"[]", BadManifestError),
        (b'{"files": {}}', BadManifestError),
        (b'{"files": []}', BadManifestError),
        (b'{"files": ["a.bin"]}', BadManifestError),
        (b'{"files": [{"path": "a.bin"}]}', BadManifestError),
        (b'{"files": [{"path": "a.bin", "url": "/a", "size": -1}]}', BadManifestError),
        (b'{"files": [{"path": "a.bin", "url": "/a", "size": true}]}', BadManifestError),
        (b'{"files": [{"path": "a.bin", "url": "/a", "size": "10"}]}', BadManifestError),
        (b'{"files": [{"path": "a.bin", "url": "/a", "sha256": "abc"}]}', BadManifestError),
        (b'{"files": [{"path": "a.bin", "url": "/a"}, {"path": "A.BIN", "url": "/b"}]}', BadManifestError),
        (b'{"files": [{"path": "manifest.json", "url": "/a"}]}', UnsafePathError),
        (b'{"files": [{"path": "../a.bin", "url": "/a"}]}', UnsafePathError),
        (b'{"files": [{"path": "/etc/passwd", "url": "/a"}]}', UnsafePathError),
        (b'{"files": [{"path": "a.bin", "url": "http://[]/a"}]}', BadManifestError),
    ],
    ids=[
        "not-json",
        "not-object",
        "files-not-list",
        "no-files",
        "file-not-object",
        "no-url",
        "negative-size",
        "bool-size",
        "string-size",
        "short-sha",
        "duplicate-path",
        "reserved-name",
        "dotdot",
        "absolute",
        "malformed-url",
    ],
)
def test_malformed_manifest_is_refused_permanently(document: bytes, error: type[Exception]) -> None:
    """A manifest that is not the documented shape raises a permanent error saying what is wrong."""
    with pytest.raises(error) as caught:
        parse_manifest(document, "https://cdn.example/m")
    assert isinstance(caught.value, PermanentError)


# -- FETCH_COMMAND ----------------------------------------------------------------------------------

WRITE_FILES = """
import pathlib, sys
dest = pathlib.Path(sys.argv[2])
(dest / "sub").mkdir(parents=True, exist_ok=True)
(dest / "sub" / "lecture.mp4").write_bytes(b"v" * 1000)
(dest / "notes.txt").write_text(sys.argv[1])
print("fetched", sys.argv[1])
"""


def command(script: str) -> tuple[str, ...]:
    """FETCH_COMMAND running *script* with argv[1]={url}, argv[2]={dest}."""
    return (sys.executable, "-c", script, "{url}", "{dest}")


def test_fetch_command_files_are_described_and_hashed(staging: Path) -> None:
    """The operator's command gets {url} and {dest}; every file it leaves is recorded with size and sha256."""
    result = CommandFetcher(command(WRITE_FILES), {"cdn.example"}, timeout=30).fetch(
        "https://cdn.example/course/7", staging
    )
    assert [(f.path, f.size) for f in result.files] == [("notes.txt", 28), ("sub/lecture.mp4", 1000)]
    assert (staging / "notes.txt").read_text() == "https://cdn.example/course/7"
    assert result.files[1].sha256 == hashlib.sha256(b"v" * 1000).hexdigest()


def test_fetch_command_url_off_the_allow_list_is_never_run(staging: Path, tmp_path: Path) -> None:
    """A course URL off ALLOWED_HOSTS is refused before the command starts."""
    marker = tmp_path / "ran"
    script = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"
    with pytest.raises(HostNotAllowedError):
        CommandFetcher(command(script), {"cdn.example"}, timeout=30).fetch("https://evil.example/x", staging)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("script", "message"),
    [("import sys; sys.exit(3)", "status 3"), ("pass", "no files")],
    ids=["non-zero-exit", "no-files"],
)
def test_fetch_command_failure_is_a_transient_command_error(staging: Path, script: str, message: str) -> None:
    """A command that fails, or succeeds without leaving files, raises CommandError (retried)."""
    with pytest.raises(CommandError, match=message) as caught:
        CommandFetcher(command(script), {"cdn.example"}, timeout=30).fetch("https://cdn.example/c", staging)
    assert isinstance(caught.value, TransientError)


def test_fetch_command_leaving_a_symlink_is_refused(staging: Path) -> None:
    """A symlink among the command's output is refused (it could point anywhere)."""
    script = "import os, sys; os.makedirs(sys.argv[2], exist_ok=True); os.symlink('/etc/passwd', sys.argv[2] + '/p')"
    with pytest.raises(UnsafePathError):
        CommandFetcher(command(script), {"cdn.example"}, timeout=30).fetch("https://cdn.example/c", staging)


def test_fetch_command_that_hangs_is_timed_out(staging: Path) -> None:
    """A command still running after the timeout is killed and reported as timed out."""
    script = "import time; time.sleep(2)"
    with pytest.raises(CommandError, match="timed out"):
        CommandFetcher(command(script), {"cdn.example"}, timeout=0.2).fetch("https://cdn.example/c", staging)
