"""Fetching a course from the content origin: a JSON manifest of files, or one file, over HTTP(S).

Files stream to disk in large chunks over pooled connections, several at a time, hashed as they
arrive. Partial data lives in the staging folder's `.parts/` and survives retries and restarts:
an interrupted file continues with a validated Range request, and a file already complete and
verified is never fetched again. Every connection is checked against ALLOWED_HOSTS, on the URL
and on the address actually connected to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import defaults
from .errors import (
    BadManifestError,
    FetchError,
    IntegrityError,
    Interrupted,
    NoSpaceError,
    OriginRefusedError,
    TooLargeError,
    UnsafePathError,
)
from .safety import check_peer_allowed, check_url_allowed, join_inside, safe_filename, safe_relative_path
from .storage import RECORD_NAME

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
PARTS_DIRNAME = ".parts"
ProgressCallback = Callable[[int, "int | None", int, int], None]
"""on_progress(bytes_done, bytes_total or None, files_done, files_total)."""


@dataclass(frozen=True)
class FileSpec:
    """One file the manifest lists."""

    path: PurePosixPath
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class FetchedFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class FetchResult:
    title: str
    files: tuple[FetchedFile, ...]
    bytes_transferred: int = 0
    """Bytes that crossed the network in this attempt (resumed and skipped bytes excluded)."""

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)

    def record(self, course_url: str) -> dict[str, Any]:
        return {
            "title": self.title,
            "courseUrl": course_url,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "bytes": self.total_bytes,
        }


class _Cancelled(Exception):
    """Raised inside a transfer thread when a sibling transfer has failed."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Interrupted("fetch stopped on request; the bytes so far are kept")


class _Progress:
    """Thread-safe task-wide progress, handed to the reporter under a lock."""

    def __init__(
        self, on_progress: ProgressCallback | None, total: int | None, files_total: int, limit: int = 0
    ) -> None:
        self.on_progress = on_progress
        self.limit = limit
        self.total = total
        self.files_total = files_total
        self.done = 0
        self.files_done = 0
        self.transferred = 0
        self.lock = threading.Lock()

    def add(self, count: int, transferred: bool = True) -> None:
        """Count bytes; raises TooLargeError once the task as a whole passes MAX_TASK_BYTES."""
        with self.lock:
            self.done += count
            if self.limit and self.done > self.limit:
                raise TooLargeError(f"course holds more than MAX_TASK_BYTES={self.limit} bytes")
            if transferred:
                self.transferred += count
            self._report()

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1
            self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done, self.total, self.files_done, self.files_total)


def _guarded_adapter(allowed_hosts: Collection[str], pool_size: int) -> HTTPAdapter:
    """An HTTPAdapter whose connections refuse internal peer addresses a listed host did not name."""

    def check(conn: HTTPConnection, sock: Any) -> None:
        peer = sock.getpeername()[0]
        try:
            check_peer_allowed(conn.host, conn.port or 0, peer, allowed_hosts)
        except Exception:
            sock.close()
            raise

    class GuardedHTTP(HTTPConnection):
        def _new_conn(self) -> Any:
            sock = super()._new_conn()
            check(self, sock)
            return sock

    class GuardedHTTPS(HTTPSConnection):
        def _new_conn(self) -> Any:
            sock = super()._new_conn()
            check(self, sock)
            return sock

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTP

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPS

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return GuardedAdapter(pool_connections=4, pool_maxsize=max(pool_size, 1), max_retries=0)


def new_session(allowed_hosts: Collection[str], pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: only the configured origin
    adapter = _guarded_adapter(allowed_hosts, pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Fetcher:
    """Fetches one task's files into a staging folder: concurrent, resumable, verified, allow-listed."""

    def __init__(
        self,
        allowed_hosts: Collection[str],
        token: str | None = None,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (defaults.CONNECT_TIMEOUT, defaults.READ_TIMEOUT),
        concurrency: int = defaults.FETCH_CONCURRENCY,
        max_task_bytes: int = defaults.MAX_TASK_BYTES,
    ) -> None:
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.concurrency = max(1, concurrency)
        self.session = session or new_session(allowed_hosts, self.concurrency)
        self.timeout = timeout
        self.max_task_bytes = max_task_bytes
        self._stop: threading.Event | None = None
        self._progress: _Progress | None = None

    def reset_count(self) -> None:
        """Start counting bytes_transferred afresh (a new attempt that may not fetch at all)."""
        self._progress = None

    @property
    def bytes_transferred(self) -> int:
        """Bytes received from the network by the last fetch (so far, if it is still running or failed)."""
        return self._progress.transferred if self._progress is not None else 0

    # -- HTTP -------------------------------------------------------------------------------

    def _open(self, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        """GET *url*, following redirects only to allowed hosts; the token goes only to allowed hosts."""
        for _ in range(MAX_REDIRECTS + 1):
            check_url_allowed(url, self.allowed_hosts)
            sent = dict(headers or {})
            if self.token:
                sent["Authorization"] = f"Bearer {self.token}"
            try:
                response = self.session.get(url, headers=sent, stream=True, timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
            if response.is_redirect and response.headers.get("Location"):
                response.close()
                url = urljoin(url, response.headers["Location"])
                continue
            self._check_status(url, response)
            return response
        raise FetchError(f"GET {url}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _check_status(url: str, response: requests.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        response.close()
        if status in (408, 425, 429) or status >= 500:
            raise FetchError(f"GET {url}: HTTP {status}")
        raise OriginRefusedError(f"GET {url}: HTTP {status}")

    # -- the course -------------------------------------------------------------------------

    def fetch(
        self,
        course_url: str,
        staging: Path,
        on_progress: ProgressCallback | None = None,
        stop: threading.Event | None = None,
    ) -> FetchResult:
        """Fetch the course at *course_url* into *staging* and return what was fetched.

        Setting *stop* makes the fetch raise Interrupted within a chunk, keeping its bytes.
        """
        self._stop = stop
        self._progress = None
        staging.mkdir(parents=True, exist_ok=True)
        if staging.is_symlink():
            raise UnsafePathError(f"staging folder is a symlink: {staging}")
        parts = staging / PARTS_DIRNAME
        parts.mkdir(exist_ok=True)
        single = _read_json(parts / "course.json")
        if single and single.get("url") == course_url and isinstance(single.get("name"), str):
            # An earlier attempt found a single file here: resume it without asking for the course again.
            spec = FileSpec(path=PurePosixPath(single["name"]), url=course_url, size=single.get("size"))
            result = self._fetch_specs([spec], staging, on_progress)
            shutil.rmtree(parts, ignore_errors=True)
            return FetchResult(title=single["name"], files=result[0], bytes_transferred=result[1])
        response = self._open(course_url)
        if _is_json(response):
            manifest = _read_limited(response, defaults.MANIFEST_MAX_BYTES)
            title, specs = parse_manifest(manifest, response.url or course_url)
            for spec in specs:
                check_url_allowed(spec.url, self.allowed_hosts)
            files, transferred = self._fetch_specs(specs, staging, on_progress)
        else:
            name = safe_filename(_filename(response, course_url))
            if name == RECORD_NAME:
                name = f"file-{name}"
            size = _content_length(response)
            _write_json(parts / "course.json", {"url": course_url, "name": name, "size": size})
            spec = FileSpec(path=PurePosixPath(name), url=course_url, size=size)
            title = name
            files, transferred = self._fetch_specs([spec], staging, on_progress, opened=response)
        shutil.rmtree(parts, ignore_errors=True)
        return FetchResult(title=title, files=files, bytes_transferred=transferred)

    def _fetch_specs(
        self,
        specs: list[FileSpec],
        staging: Path,
        on_progress: ProgressCallback | None,
        opened: requests.Response | None = None,
    ) -> tuple[tuple[FetchedFile, ...], int]:
        declared = [spec.size for spec in specs]
        total = sum(s for s in declared if s is not None) if all(s is not None for s in declared) else None
        if total is not None and self.max_task_bytes and total > self.max_task_bytes:
            raise TooLargeError(f"course is {total} bytes, more than MAX_TASK_BYTES={self.max_task_bytes}")
        self._check_disk(staging, specs, total)
        progress = _Progress(on_progress, total, len(specs), limit=self.max_task_bytes)
        self._progress = progress
        cancel = threading.Event()
        results: dict[int, FetchedFile] = {}

        def run(index: int) -> None:
            _check_stop(self._stop)
            results[index] = self._fetch_file(specs[index], staging, progress, cancel, opened if index == 0 else None)
            progress.file_done()

        if len(specs) == 1:
            run(0)
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(specs)), thread_name_prefix="fetch") as pool:
                futures = [pool.submit(run, index) for index in range(len(specs))]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                errors = [f.exception() for f in done if f.exception() is not None]
                if errors:
                    cancel.set()
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    first = next((e for e in errors if not isinstance(e, _Cancelled | Interrupted)), None)
                    first = first or next((e for e in errors if isinstance(e, Interrupted)), errors[0])
                    assert first is not None
                    raise first
        fetched = tuple(results[index] for index in range(len(specs)))
        if self.max_task_bytes and sum(f.size for f in fetched) > self.max_task_bytes:
            raise TooLargeError(f"course holds more than MAX_TASK_BYTES={self.max_task_bytes} bytes")
        return fetched, progress.transferred

    def _check_disk(self, staging: Path, specs: list[FileSpec], total: int | None) -> None:
        if total is None:
            return
        usage = shutil.disk_usage(staging)
        if total > usage.total:
            raise TooLargeError(f"course is {total} bytes; the download disk holds only {usage.total}")
        present = 0
        for spec in specs:
            for candidate in (join_inside(staging, spec.path), _part_paths(staging, spec)[0]):
                if candidate.is_file() and not candidate.is_symlink():
                    present += candidate.stat().st_size
        needed = total - present + defaults.DISK_HEADROOM
        if needed > usage.free:
            raise NoSpaceError(f"course needs {needed} more bytes on the download disk, {usage.free} free")

    # -- one file ---------------------------------------------------------------------------

    def _fetch_file(
        self,
        spec: FileSpec,
        staging: Path,
        progress: _Progress,
        cancel: threading.Event,
        opened: requests.Response | None,
    ) -> FetchedFile:
        target = join_inside(staging, spec.path)
        part, state_file = _part_paths(staging, spec)
        done = _verified_existing(target, state_file, spec)
        if done is not None:
            if opened is not None:
                opened.close()
            log.info("already fetched and verified: %s", spec.path)
            progress.add(done.size, transferred=False)
            return done
        for path in (target, part):
            if path.is_symlink():
                raise UnsafePathError(f"refusing to write through a symlink: {str(spec.path)!r}")
        state = _read_json(state_file) or {}
        offset = part.stat().st_size if part.is_file() and state.get("url") == spec.url else 0
        if offset and spec.size is not None and offset > spec.size:
            offset = 0
        response = opened
        resumed = False
        if offset:
            if response is not None:
                response.close()
            headers = {"Range": f"bytes={offset}-"}
            validator = state.get("etag") or state.get("lastModified")
            if validator:
                headers["If-Range"] = validator
            response = self._open(spec.url, headers)
            resumed = _resumable(response, offset, state)
            if response.status_code == 206 and not resumed:
                # A range we cannot use (wrong start, or the file changed): start over, whole.
                response.close()
                response = self._open(spec.url)
            elif not resumed:
                log.info("origin ignored the Range request for %s: fetching it whole", spec.path)
        elif response is None:
            response = self._open(spec.url)
        try:
            return self._receive(response, spec, target, part, state_file, offset if resumed else 0, progress, cancel)
        finally:
            response.close()

    def _receive(
        self,
        response: requests.Response,
        spec: FileSpec,
        target: Path,
        part: Path,
        state_file: Path,
        offset: int,
        progress: _Progress,
        cancel: threading.Event,
    ) -> FetchedFile:
        """Stream *response* into the part file (appending after *offset* when resuming), then verify."""
        digest = hashlib.sha256()
        expected_total = spec.size
        resumed = offset > 0
        if resumed:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(defaults.CHUNK_SIZE), b""):
                    digest.update(block)
            size = offset
            progress.add(offset, transferred=False)
            expected_total = expected_total if expected_total is not None else _range_total(response)
            log.info("resuming %s at byte %s", spec.path, offset)
        else:
            size = 0
            length = _content_length(response)
            expected_total = expected_total if expected_total is not None else length
            _write_json(
                state_file,
                {
                    "url": spec.url,
                    "etag": response.headers.get("ETag"),
                    "lastModified": response.headers.get("Last-Modified"),
                    "total": length,
                },
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                for chunk in _body_chunks(response):
                    if cancel.is_set():
                        raise _Cancelled()
                    _check_stop(self._stop)
                    if not chunk:
                        continue
                    size += len(chunk)
                    if expected_total is not None and size > expected_total:
                        raise IntegrityError(f"{spec.path}: more bytes than the expected {expected_total}")
                    digest.update(chunk)
                    out.write(chunk)
                    progress.add(len(chunk))
        except (requests.RequestException, HTTPException, ConnectionError, TimeoutError) as exc:
            # The bytes so far stay in the part file: the next attempt continues from them.
            raise FetchError(f"{spec.path}: transfer broke after {size} bytes: {exc}") from exc
        except (IntegrityError, TooLargeError):
            _discard(part, state_file)
            raise
        actual_sha = digest.hexdigest()
        problem = None
        if expected_total is not None and size != expected_total:
            problem = f"{spec.path}: body truncated: {size} of {expected_total} bytes"
        elif spec.sha256 is not None and actual_sha != spec.sha256:
            problem = f"{spec.path}: sha256 {actual_sha} differs from the manifest's {spec.sha256}"
        if problem:
            if expected_total is not None and size < expected_total:
                raise FetchError(problem)  # a short body: keep its bytes, the next attempt resumes
            _discard(part, state_file)
            raise IntegrityError(problem)
        os.replace(part, target)
        _write_json(state_file, {"url": spec.url, "done": True, "size": size, "sha256": actual_sha})
        return FetchedFile(path=str(spec.path), size=size, sha256=actual_sha)


def _body_chunks(response: requests.Response) -> Iterator[bytes | memoryview]:
    """The body, chunk by chunk, as it arrives.

    An uncompressed body is read straight into one reusable buffer (no allocation per chunk, and
    every byte received is handed on at once, so an interruption loses at most one buffer); the
    connection then goes back to the pool for the next file. Anything else goes through requests.
    """
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") or not hasattr(fp, "readinto"):
        yield from response.iter_content(chunk_size=defaults.CHUNK_SIZE)
        return
    buffer = bytearray(defaults.READ_BUFFER_SIZE)
    view = memoryview(buffer)
    while True:
        count = fp.readinto(buffer)  # type: ignore[union-attr]
        if not count:
            break
        yield view[:count]
    if fp.isclosed():  # type: ignore[union-attr]
        # http.client read the whole body (it closes its side at Content-Length or the last chunk).
        response.raw.release_conn()


def parse_manifest(document: bytes, manifest_url: str) -> tuple[str, list[FileSpec]]:
    """Parse `{"title": ..., "files": [{"path", "url", "size"?, "sha256"?}]}`; name what is wrong."""
    try:
        data = json.loads(document)
    except ValueError as exc:
        raise BadManifestError(f"manifest at {manifest_url} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise BadManifestError(f"manifest at {manifest_url} has no 'files' list")
    title = data.get("title")
    title = title if isinstance(title, str) and title.strip() else "course"
    specs: list[FileSpec] = []
    seen: set[str] = set()
    for number, item in enumerate(data["files"], start=1):
        if not isinstance(item, dict):
            raise BadManifestError(f"manifest file #{number} is not an object")
        path = safe_relative_path(item.get("path"))
        if str(path) == RECORD_NAME:
            raise UnsafePathError(f"manifest file #{number}: path {RECORD_NAME!r} is reserved")
        key = str(path).lower()
        if key in seen:
            raise BadManifestError(f"manifest file #{number}: duplicate path {str(path)!r}")
        seen.add(key)
        url = item.get("url")
        if not isinstance(url, str) or not url.strip():
            raise BadManifestError(f"manifest file #{number} ({path}) has no url")
        size = item.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise BadManifestError(f"manifest file #{number} ({path}): size must be a whole number, got {size!r}")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            raise BadManifestError(f"manifest file #{number} ({path}): sha256 must be 64 hex digits, got {sha!r}")
        specs.append(
            FileSpec(path=path, url=urljoin(manifest_url, url.strip()), size=size, sha256=sha.lower() if sha else None)
        )
    if not specs:
        raise BadManifestError(f"manifest at {manifest_url} lists no files")
    return title, specs


def _part_paths(staging: Path, spec: FileSpec) -> tuple[Path, Path]:
    """Where a file's partial bytes and its transfer state live (outside the course's own paths)."""
    key = hashlib.sha256(f"{spec.url}\n{spec.path}".encode()).hexdigest()[:32]
    parts = staging / PARTS_DIRNAME
    return parts / f"{key}.part", parts / f"{key}.json"


def _verified_existing(target: Path, state_file: Path, spec: FileSpec) -> FetchedFile | None:
    """A file an earlier attempt finished and verified is not fetched (or hashed) again."""
    state = _read_json(state_file)
    if not state or not state.get("done") or state.get("url") != spec.url:
        return None
    if target.is_symlink() or not target.is_file() or target.stat().st_size != state.get("size"):
        return None
    if spec.size is not None and spec.size != state["size"]:
        return None
    if spec.sha256 is not None and spec.sha256 != state.get("sha256"):
        return None
    return FetchedFile(path=str(spec.path), size=int(state["size"]), sha256=str(state["sha256"]))


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temp, path)


def _is_json(response: requests.Response) -> bool:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _read_limited(response: requests.Response, limit: int) -> bytes:
    body = bytearray()
    try:
        for chunk in response.iter_content(chunk_size=65536):
            body.extend(chunk)
            if len(body) > limit:
                raise BadManifestError(f"manifest at {response.url} is larger than {limit} bytes")
    except requests.RequestException as exc:
        raise FetchError(f"manifest at {response.url}: {exc}") from exc
    finally:
        response.close()
    return bytes(body)


def _content_length(response: requests.Response) -> int | None:
    if response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _resumable(response: requests.Response, offset: int, state: dict[str, Any]) -> bool:
    """A 206 that starts where our bytes end, for the same file (same total size) as before."""
    if response.status_code != 206 or _range_start(response) != offset:
        return False
    total = _range_total(response)
    return state.get("total") is None or total is None or total == state["total"]


def _range_start(response: requests.Response) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _range_total(response: requests.Response) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    return int(match.group(3)) if match and match.group(3) != "*" else None


def _filename(response: requests.Response, url: str) -> str:
    disposition = response.headers.get("Content-Disposition", "")
    match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition, re.IGNORECASE)
    if match:
        return unquote(match.group(1))
    return unquote(urlsplit(response.url or url).path.rsplit("/", 1)[-1])
