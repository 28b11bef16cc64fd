"""Fetching a course from the content origin: a JSON manifest of files, or one file, over HTTP(S).

Files stream to disk in large chunks over pooled connections, several at a time, hashed as they
arrive. Partial data lives in the staging folder's `.parts/` and survives retries and restarts:
an interrupted file continues with a validated Range request, and a file already complete and
verified is never fetched again. Every connection is checked against ALLOWED_HOSTS, on the URL
and on the address actually connected to.

A resume is trusted only when the origin proves it continues the same file: a 206 starting at our
offset, running to the end of the same total, carrying the ETag and Last-Modified stored when the
file was started. Anything else (a changed or missing validator, a Content-Range that does not fit,
a 416, a spliced result caught by the sha256) starts the file again from byte 0; a part that already
holds every byte is verified and put in place. Nothing in the staging folder is followed through a
symlink, and when the fetch ends the folder holds the course's regular files and folders only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol
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
    UnwritablePathError,
)
from .folders import RECORD_NAME
from .safety import check_peer_allowed, check_url_allowed, join_inside, safe_filename, safe_relative_path

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
PARTS_DIRNAME = ".parts"
PACE_STOP_CHECK = 0.25
"""Seconds between looks at the stop event while a read waits for its turn under FETCH_RATE_LIMIT."""
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
"""Standard variables naming a CA bundle to verify HTTPS origins with (a private CA), read by
new_session although the session otherwise ignores the environment."""
_UNWRITABLE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})
ProgressCallback = Callable[[int, "int | None", int, int], None]
"""on_progress(bytes_done, bytes_total or None, files_done, files_total)."""


class Pacer(Protocol):
    """FETCH_RATE_LIMIT, as the fetcher sees it (limits.ByteRate): bytes are booked before they are read."""

    chunk: int
    """Bytes one booking covers, and the most one read takes."""
    receive_buffer: int
    """SO_RCVBUF of each connection, in bytes."""

    def reserve(self, count: int) -> float:
        """Book *count* bytes; return the seconds to wait before reading them."""
        ...


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

    def take_back(self, count: int) -> None:
        """Uncount bytes that were counted as done but will be fetched again (a resume that did not verify)."""
        with self.lock:
            self.done -= count
            self._report()

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1
            self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done, self.total, self.files_done, self.files_total)


def _guarded_adapter(allowed_hosts: Collection[str], pool_size: int, receive_buffer: int | None = None) -> HTTPAdapter:
    """An HTTPAdapter whose connections refuse internal peer addresses a listed host did not name.

    *receive_buffer* sets each connection's SO_RCVBUF (FETCH_RATE_LIMIT): a reader that reads slowly
    then slows the origin within moments, where the kernel's own buffer would grow to megabytes and
    let the origin burst at full speed first."""
    socket_options = list(HTTPConnection.default_socket_options)
    if receive_buffer:
        socket_options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer))

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
            super().init_poolmanager(*args, **kwargs, socket_options=socket_options)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return GuardedAdapter(pool_connections=4, pool_maxsize=max(pool_size, 1), max_retries=0)


class ManualRedirectSession(requests.Session):
    """A session that never works out a redirect itself: the fetch follows each one by hand, after
    checking its target against ALLOWED_HOSTS (requests would parse a malformed Location even
    with allow_redirects=False, and fail with a bare ValueError)."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


def new_session(allowed_hosts: Collection[str], pool_size: int, receive_buffer: int | None = None) -> requests.Session:
    session = ManualRedirectSession()
    session.trust_env = False  # no proxies or .netrc from the environment: only the configured origin
    ca_bundle = next((os.environ[name] for name in CA_BUNDLE_VARIABLES if os.environ.get(name)), None)
    if ca_bundle:
        session.verify = ca_bundle  # an origin whose certificate comes from the operator's own CA
    adapter = _guarded_adapter(allowed_hosts, pool_size, receive_buffer)
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
        pacer: Pacer | None = None,
    ) -> None:
        self.allowed_hosts = allowed_hosts
        self.pacer = pacer
        """FETCH_RATE_LIMIT: shared by every download of this machine (None: no limit)."""
        self.token = token
        self.concurrency = max(1, concurrency)
        self.session = session or new_session(
            allowed_hosts, self.concurrency, receive_buffer=pacer.receive_buffer if pacer is not None else None
        )
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

    def _open(self, url: str, headers: dict[str, str] | None = None, accept: Collection[int] = ()) -> requests.Response:
        """GET *url*, following redirects only to allowed hosts; the token goes only to allowed hosts.

        A status in *accept* is handed back like a 2xx, for the caller to judge.
        """
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
                location = response.headers["Location"]
                try:
                    url = urljoin(url, location)
                except ValueError as exc:  # a malformed host ("http://[]/x"): the origin misbehaves
                    raise FetchError(f"GET {url}: redirect to a malformed URL {location!r}: {exc}") from None
                continue
            if response.status_code not in accept:
                self._check_status(url, response)
            return response
        raise FetchError(f"GET {url}: more than {MAX_REDIRECTS} redirects")

    def _pace(self, most: int) -> int:
        """Book the next chunk of FETCH_RATE_LIMIT, *most* bytes at most, and wait for its turn; return
        the bytes booked. A stop ends the wait (Interrupted), as it ends a read."""
        assert self.pacer is not None
        count = max(1, min(self.pacer.chunk, most))
        due = time.monotonic() + self.pacer.reserve(count)
        while (left := due - time.monotonic()) > 0:
            _check_stop(self._stop)
            time.sleep(min(left, PACE_STOP_CHECK))
        _check_stop(self._stop)
        return count

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
        _real_folder(parts)
        single = _read_json(parts / "course.json")
        if single and single.get("url") == course_url and isinstance(single.get("name"), str):
            # An earlier attempt found a single file here: resume it without asking for the course again.
            size = single.get("size")
            spec = FileSpec(
                path=PurePosixPath(single["name"]), url=course_url, size=size if isinstance(size, int) else None
            )
            check_fits([spec], staging)
            files, transferred = self._fetch_specs([spec], staging, on_progress)
            _finish_staging(staging, [spec])
            return FetchResult(title=single["name"], files=files, bytes_transferred=transferred)
        response = self._open(course_url)
        if _is_json(response):
            manifest = _read_limited(response, defaults.MANIFEST_MAX_BYTES)
            title, specs = parse_manifest(manifest, response.url or course_url)
            for spec in specs:
                check_url_allowed(spec.url, self.allowed_hosts)
            check_fits(specs, staging)
            files, transferred = self._fetch_specs(specs, staging, on_progress)
        else:
            name = safe_filename(_filename(response, course_url))
            if name == RECORD_NAME:
                name = f"file-{name}"
            name = fit_name(name, _pathconf(staging, "PC_NAME_MAX", 255))
            size = _content_length(response)
            spec = FileSpec(path=PurePosixPath(name), url=course_url, size=size)
            specs = [spec]
            try:
                check_fits(specs, staging)
            except UnwritablePathError:
                response.close()
                raise
            _write_json(parts / "course.json", {"url": course_url, "name": name, "size": size})
            title = name
            files, transferred = self._fetch_specs(specs, staging, on_progress, opened=response)
        _finish_staging(staging, specs)
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
        try:
            if total is not None and self.max_task_bytes and total > self.max_task_bytes:
                raise TooLargeError(f"course is {total} bytes, more than MAX_TASK_BYTES={self.max_task_bytes}")
            _drop_symlinks_on_the_way(staging, specs)
            self._check_disk(staging, specs, total)
        except BaseException:
            if opened is not None:
                opened.close()  # the single file's response, not read: its connection is not kept waiting
            raise
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
            try:
                for candidate in (join_inside(staging, spec.path), _part_paths(staging, spec)[0]):
                    present += _regular_size(candidate)
            except OSError as exc:
                mapped = _path_error(spec, exc)
                if mapped is exc:
                    raise
                raise mapped from exc
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
        try:
            return self._fetch_one(spec, staging, progress, cancel, opened)
        except OSError as exc:
            if opened is not None:
                opened.close()
            mapped = _path_error(spec, exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def _fetch_one(
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
        if target.is_symlink():
            raise UnsafePathError(f"refusing to write through a symlink: {str(spec.path)!r}")
        _clear_way(staging, target)
        for internal in (part, state_file):
            _drop_if_not_regular(internal)  # .parts holds only what we wrote there: anything else goes
        state = _read_json(state_file) or {}
        offset = _regular_size(part) if state.get("url") == spec.url else 0
        if offset:
            if opened is not None:
                opened.close()
                opened = None
            resumed = self._resume(spec, target, part, state_file, state, offset, progress, cancel)
            if resumed is not None:
                return resumed
            _discard(part, state_file)
        response = opened if opened is not None else self._open(spec.url)
        try:
            return self._receive(response, spec, target, part, state_file, 0, progress, cancel)
        finally:
            response.close()

    def _resume(
        self,
        spec: FileSpec,
        target: Path,
        part: Path,
        state_file: Path,
        state: dict[str, Any],
        offset: int,
        progress: _Progress,
        cancel: threading.Event,
    ) -> FetchedFile | None:
        """Finish a file from the *offset* bytes of its part file; None when it must start again from byte 0.

        The part is continued only with a 206 that proves it is the same file (see _resumable), or
        verified as it is when it already holds every byte (by the declared size, or by the origin's
        416 `bytes */<size>`). A continued file that then fails verification starts again at once.
        """
        stored_total = state.get("total") if isinstance(state.get("total"), int) else None
        known = spec.size if spec.size is not None else stored_total
        if known is not None and offset > known:
            log.info("%s: part holds %s bytes, more than the %s expected: fetching it again", spec.path, offset, known)
            return None
        if known is not None and offset == known:
            # Received whole by one version (a part is only ever continued when the origin proves the
            # version unchanged): the connection broke, or the run stopped, before it was put in place.
            log.info("%s: part already holds all %s bytes: verifying it", spec.path, offset)
            return self._continue(None, spec, target, part, state_file, offset, known, progress, cancel)
        validator = _if_range_validator(state)
        if validator is None and spec.sha256 is None:
            log.info(
                "%s: no ETag, Last-Modified or sha256 proves the part is of this file: fetching it again", spec.path
            )
            return None
        headers = {"Range": f"bytes={offset}-"}
        if validator:
            headers["If-Range"] = validator
        response = self._open(spec.url, headers, accept=(416,))
        try:
            if response.status_code == 416:
                total = _unsatisfied_total(response)
                if total == offset and known in (None, total) and _same_version(response, state, required=False):
                    log.info("%s: origin says the part's %s bytes are the whole file: verifying it", spec.path, offset)
                    return self._continue(None, spec, target, part, state_file, offset, total, progress, cancel)
                log.info(
                    "%s: origin answered 416 to a resume at byte %s (Content-Range %r): fetching it again",
                    spec.path,
                    offset,
                    response.headers.get("Content-Range"),
                )
                return None
            if response.status_code != 206:
                log.info("origin ignored the Range request for %s: fetching it whole", spec.path)
                return self._receive(response, spec, target, part, state_file, 0, progress, cancel)
            if not _resumable(response, offset, known, state):
                log.info(
                    "%s: the 206 (Content-Range %r, ETag %r, Last-Modified %r) does not continue the part at byte %s: "
                    "fetching it again",
                    spec.path,
                    response.headers.get("Content-Range"),
                    response.headers.get("ETag"),
                    response.headers.get("Last-Modified"),
                    offset,
                )
                return None
            expected = known if known is not None else _range_total(response)
            return self._continue(response, spec, target, part, state_file, offset, expected, progress, cancel)
        finally:
            response.close()

    def _continue(
        self,
        response: requests.Response | None,
        spec: FileSpec,
        target: Path,
        part: Path,
        state_file: Path,
        offset: int,
        expected_total: int | None,
        progress: _Progress,
        cancel: threading.Event,
    ) -> FetchedFile | None:
        """Append *response* (None: nothing) to the part and verify; None if the result does not verify."""
        try:
            return self._receive(
                response, spec, target, part, state_file, offset, progress, cancel, expected_total=expected_total
            )
        except IntegrityError as exc:
            log.warning("%s: the resumed file did not verify (%s): fetching it again", spec.path, exc)
            return None

    def _receive(
        self,
        response: requests.Response | None,
        spec: FileSpec,
        target: Path,
        part: Path,
        state_file: Path,
        offset: int,
        progress: _Progress,
        cancel: threading.Event,
        expected_total: int | None = None,
    ) -> FetchedFile:
        """Stream *response* into the part file (appending after *offset* when resuming), then verify.

        Resuming, *expected_total* is the file's whole size if known and *response* may be None (the
        part is complete). Bytes counted as done are taken back if the file does not verify.
        """
        digest = hashlib.sha256()
        resumed = offset > 0
        counted = 0
        if resumed:
            with _open_file(part, "rb") as handle:
                for block in iter(lambda: handle.read(defaults.CHUNK_SIZE), b""):
                    digest.update(block)
            size = offset
            if spec.size is not None:
                expected_total = spec.size
            progress.add(offset, transferred=False)
            counted = offset
            log.info("resuming %s at byte %s", spec.path, offset)
        else:
            assert response is not None
            size = 0
            length = _content_length(response)
            expected_total = spec.size if spec.size is not None else length
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
            with _open_file(part, "ab" if resumed else "wb") as out:
                for chunk in _body_chunks(response, self._pace if self.pacer else None) if response is not None else ():
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
                    counted += len(chunk)
        except (requests.RequestException, HTTPException, ConnectionError, TimeoutError) as exc:
            # The bytes so far stay in the part file: the next attempt continues from them.
            raise FetchError(f"{spec.path}: transfer broke after {size} bytes: {exc}") from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled while writing (something else took the space): what was written stays
            # for the next attempt, which runs once space is freed.
            raise NoSpaceError(f"{spec.path}: the download disk is full: {exc.strerror}") from exc
        except (IntegrityError, TooLargeError):
            _discard(part, state_file)
            progress.take_back(counted)
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
            progress.take_back(counted)
            raise IntegrityError(problem)
        os.replace(part, target)
        _write_json(state_file, {"url": spec.url, "done": True, "size": size, "sha256": actual_sha})
        return FetchedFile(path=str(spec.path), size=size, sha256=actual_sha)


def _body_chunks(response: requests.Response, pace: Callable[[int], int] | None = None) -> Iterator[bytes | memoryview]:
    """The body, chunk by chunk, as it arrives.

    An uncompressed body is read straight into one reusable buffer (no allocation per chunk, and
    every byte received is handed on at once, so an interruption loses at most one buffer); the
    connection then goes back to the pool for the next file. Anything else goes through requests.

    With *pace* (FETCH_RATE_LIMIT), no byte is read before it is booked: pace(n) books at most n
    bytes, waits for their turn and returns how many it booked, and reads take no more than what is
    booked and unread. The origin is thus slowed by TCP itself, not by a burst followed by a pause.
    Near the end of a body of known length, only the bytes left are booked: a booking never read
    would leave the link idle for its time.
    """
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") or not hasattr(fp, "readinto"):
        credit = 0
        for chunk in response.iter_content(chunk_size=defaults.CHUNK_SIZE):
            while pace is not None and credit < len(chunk):  # decoded bytes: the limit is near enough
                credit += pace(len(chunk) - credit)
            credit -= len(chunk)
            yield chunk
        return
    buffer = bytearray(defaults.READ_BUFFER_SIZE)
    view = memoryview(buffer)
    booked = 0
    while True:
        size = len(buffer)
        if pace is not None:
            if booked <= 0:
                left = getattr(fp, "length", None)  # http.client's count of the body's bytes still to come
                booked += pace(left if isinstance(left, int) and left > 0 else size)
            size = min(size, booked)
        try:
            count = fp.readinto(view[:size])  # type: ignore[union-attr]
        except IncompleteRead as exc:
            # A chunked body cut short: what this read did receive is still body, hand it on first.
            if exc.partial:
                yield exc.partial
            raise
        if not count:
            break
        booked -= count
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
    seen: dict[str, int] = {}
    for number, item in enumerate(data["files"], start=1):
        if not isinstance(item, dict):
            raise BadManifestError(f"manifest file #{number} is not an object")
        path = safe_relative_path(item.get("path"))
        if path.parts[0] == RECORD_NAME:
            raise UnsafePathError(f"manifest file #{number}: path {str(path)!r}: {RECORD_NAME!r} is reserved")
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise UnwritablePathError(
                f"manifest file #{number}: path {str(path)!r} is not valid Unicode text"
            ) from None
        key = str(path).lower()
        if key in seen:
            raise BadManifestError(f"manifest file #{number}: duplicate path {str(path)!r}")
        seen[key] = number
        url = item.get("url")
        if not isinstance(url, str) or not url.strip():
            raise BadManifestError(f"manifest file #{number} ({path}) has no url")
        size = item.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise BadManifestError(f"manifest file #{number} ({path}): size must be a whole number, got {size!r}")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha)):
            raise BadManifestError(f"manifest file #{number} ({path}): sha256 must be 64 hex digits, got {sha!r}")
        try:
            absolute = urljoin(manifest_url, url.strip())
        except ValueError as exc:  # a malformed host ("http://[]/x")
            raise BadManifestError(f"manifest file #{number} ({path}): malformed url {url!r}: {exc}") from None
        specs.append(FileSpec(path=path, url=absolute, size=size, sha256=sha.lower() if sha else None))
    if not specs:
        raise BadManifestError(f"manifest at {manifest_url} lists no files")
    for number, spec in enumerate(specs, start=1):
        for folder in list(spec.path.parents)[:-1]:
            other = seen.get(str(folder).lower())
            if other is not None:
                raise UnwritablePathError(
                    f"manifest file #{number} ({str(spec.path)!r}) needs {str(folder)!r} to be a folder, "
                    f"but file #{other} is a file by that name"
                )
    return title, specs


def check_fits(specs: list[FileSpec], staging: Path) -> None:
    """Refuse, before anything is fetched, paths the download disk cannot hold: a name longer than its
    NAME_MAX bytes, or a whole path (under *staging*) of PATH_MAX bytes or more."""
    name_max = _pathconf(staging, "PC_NAME_MAX", 255)
    path_max = _pathconf(staging, "PC_PATH_MAX", 4096)
    base = len(os.fsencode(staging.absolute()))
    for number, spec in enumerate(specs, start=1):
        try:
            names = [part.encode("utf-8") for part in spec.path.parts]
        except UnicodeEncodeError:
            raise UnwritablePathError(f"file #{number}: path {str(spec.path)!r} is not valid Unicode text") from None
        for name in names:
            if len(name) > name_max:
                raise UnwritablePathError(
                    f"file #{number}: name {name.decode()!r} is {len(name)} bytes; "
                    f"the download disk allows {name_max} bytes per name"
                )
        length = base + 1 + len(b"/".join(names))
        if length >= path_max:
            raise UnwritablePathError(
                f"file #{number}: path {str(spec.path)!r} would be {length} bytes long in {str(staging)!r}; "
                f"the download disk allows fewer than {path_max}"
            )


def fit_name(name: str, limit: int) -> str:
    """Shorten a file name of our own choosing to *limit* UTF-8 bytes, keeping a short extension."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension.encode()) > 16:
        stem, extension = name, ""
    else:
        extension = f".{extension}"
    budget = limit - len(extension.encode())
    return (stem.encode()[:budget].decode("utf-8", "ignore").rstrip() or "download") + extension


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


def _path_error(spec: FileSpec, exc: OSError) -> Exception:
    """The error to raise for an OSError met while writing *spec* (*exc* itself if it says nothing about the
    path): a path the disk cannot hold is permanent, a symlink met on the way is refused."""
    if exc.errno in _UNWRITABLE_ERRNOS:
        return UnwritablePathError(f"file path {str(spec.path)!r} cannot be written on the download disk: {exc}")
    if exc.errno == errno.ELOOP:
        return UnsafePathError(f"refusing to write through a symlink: {str(spec.path)!r}")
    return exc


def _pathconf(folder: Path, name: str, fallback: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError):
        return fallback
    return value if value > 0 else fallback


def _open_file(path: Path, mode: str) -> BinaryIO:
    """Open a file in the staging folder without following a symlink (ELOOP) or blocking on a FIFO."""
    flags = {
        "rb": os.O_RDONLY,
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    }[mode]
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"not a regular file: {str(path)!r}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


def _regular_size(path: Path) -> int:
    """The size of *path* if it is a regular file (not through a symlink), else 0."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _kind(info: os.stat_result) -> str:
    """What stands at a path, for the log: `symlink`, `folder`, `file` (`hard-linked file` when other
    names share it), or `special file` (a FIFO, a socket, a device)."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "hard-linked file" if info.st_nlink > 1 else "file"
    return "special file"


def _drop_if_not_regular(path: Path) -> None:
    """Remove whatever stands at *path* unless it is a regular file (never following a symlink)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode):
        return
    log.warning("removing %s from the staging folder: a %s, not one of ours", path, _kind(info))
    _remove(path, info.st_mode)


def _remove(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _real_folder(path: Path) -> None:
    """Make *path* a real folder, removing a symlink or file standing in its place (never following it)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        path.mkdir()
        return
    if stat.S_ISDIR(info.st_mode):
        return
    log.warning("removing %s from the staging folder: a %s, not a folder", path, _kind(info))
    path.unlink()
    path.mkdir()


def _drop_symlinks_on_the_way(staging: Path, specs: Sequence[FileSpec]) -> None:
    """Remove (never follow) a symlink found where a course file, or a folder on its way, must go: no run of
    ours makes one, and the file is fetched in its place. The staging folder is this run's alone (its lease
    and its lock), so nothing else writes there meanwhile."""
    for spec in specs:
        path = staging
        for part in spec.path.parts:
            path = path / part
            try:
                info = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(info.st_mode):
                log.warning("removing %s from the staging folder: a symlink, not one of ours", path)
                path.unlink()
                break


def _clear_way(staging: Path, target: Path) -> None:
    """Remove what an earlier attempt (for another version of the manifest) left where *target* must go:
    a file where one of its folders must be, or a folder where it must be. The manifest itself cannot
    ask for both (parse_manifest refuses it), and join_inside has refused symlinks on the way."""
    relative = target.relative_to(staging)
    for folder in [staging.joinpath(*relative.parts[:depth]) for depth in range(1, len(relative.parts))]:
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            log.warning("removing %s from the staging folder: a folder must be there", folder)
            folder.unlink(missing_ok=True)  # another file of the course may have removed it first
            return
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        log.warning("removing folder %s from the staging folder: a file must be there", target)
        shutil.rmtree(target)


def _finish_staging(staging: Path, specs: list[FileSpec]) -> None:
    """Leave in *staging* only the course's files (regular files) and their folders (real folders).

    Drops `.parts`, and anything an earlier attempt or anyone else left: symlinks, special files,
    files of an older manifest. Nothing is followed; what is not ours is removed, not read.
    """
    shutil.rmtree(staging / PARTS_DIRNAME, ignore_errors=True)
    files = {spec.path for spec in specs}
    folders = {folder for spec in specs for folder in list(spec.path.parents)[:-1]}
    for root, dirs, names in os.walk(staging):
        relative_root = PurePosixPath(Path(root).relative_to(staging).as_posix())
        for name in [*dirs, *names]:
            path = Path(root) / name
            relative = relative_root / name
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and relative in folders:
                continue
            if stat.S_ISREG(info.st_mode) and (relative in files or relative == PurePosixPath(RECORD_NAME)):
                continue
            if name in dirs:
                dirs.remove(name)
            log.warning("removing %s from the staging folder: a %s the course does not list", path, _kind(info))
            _remove(path, info.st_mode)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with _open_file(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError, UnsafePathError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)  # a symlink planted there is removed, never written through
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as out:
        out.write(json.dumps(data).encode("utf-8"))
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
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# Compiled at import, in the worker: compiled at first use, each work horse would compile them anew.
_DISPOSITION_NAME = re.compile(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", re.IGNORECASE)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_VALIDATORS = (("etag", "ETag"), ("lastModified", "Last-Modified"))
"""Transfer-state key and response header of each validator stored when a file is started."""


def _resumable(response: requests.Response, offset: int, expected: int | None, state: dict[str, Any]) -> bool:
    """A 206 that continues the part: from *offset* to the end of the same total as before (and as
    *expected*), as long as Content-Length says, with every validator stored at the start unchanged."""
    if response.status_code != 206:
        return False
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or match.group(3) == "*":
        return False
    start, end, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
    if start != offset or end != total - 1:
        return False
    if total != expected and expected is not None:
        return False
    if state.get("total") is not None and total != state["total"]:
        return False
    length = _content_length(response)
    if length is not None and length != end - start + 1:
        return False
    return _same_version(response, state, required=True)


def _same_version(response: requests.Response, state: dict[str, Any], required: bool) -> bool:
    """Whether *response* carries the validators stored when the file was started. With *required*, a
    stored validator the response leaves out counts as a difference."""
    for key, header in _VALIDATORS:
        stored = state.get(key)
        if not stored:
            continue
        answered = response.headers.get(header)
        if answered is None and not required:
            continue
        if answered != stored:
            return False
    return True


def _if_range_validator(state: dict[str, Any]) -> str | None:
    """The stored validator to send as If-Range: a strong ETag, else Last-Modified (a weak ETag may not be used)."""
    etag = state.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = state.get("lastModified")
    return modified if isinstance(modified, str) and modified else None


def _unsatisfied_total(response: requests.Response) -> int | None:
    """The whole size a 416 reports in `Content-Range: bytes */<size>`, if it does."""
    match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _range_total(response: requests.Response) -> int | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match.group(3)) if match and match.group(3) != "*" else None


def _filename(response: requests.Response, url: str) -> str:
    disposition = response.headers.get("Content-Disposition", "")
    match = _DISPOSITION_NAME.search(disposition)
    if match:
        return unquote(match.group(1))
    return unquote(urlsplit(response.url or url).path.rsplit("/", 1)[-1])
