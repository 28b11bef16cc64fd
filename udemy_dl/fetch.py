"""Fetching a course from the content origin: a JSON manifest of files, or one file, over HTTP(S)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests

from . import defaults
from .errors import BadManifestError, FetchError, IntegrityError, OriginRefusedError, UnsafePathError
from .safety import check_url_allowed, join_inside, safe_filename, safe_relative_path
from .storage import RECORD_NAME

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
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


class Fetcher:
    """Fetches one task's files into a staging folder, streaming, with the allow-list enforced."""

    def __init__(
        self,
        allowed_hosts: Collection[str],
        token: str | None = None,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (defaults.CONNECT_TIMEOUT, defaults.READ_TIMEOUT),
    ) -> None:
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.session = session or requests.Session()
        self.timeout = timeout

    def _open(self, url: str) -> requests.Response:
        """GET *url*, following redirects only to allowed hosts; the token goes only to allowed hosts."""
        for _ in range(MAX_REDIRECTS + 1):
            check_url_allowed(url, self.allowed_hosts)
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                response = self.session.get(
                    url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=False
                )
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

    def fetch(self, course_url: str, staging: Path, on_progress: ProgressCallback | None = None) -> FetchResult:
        """Fetch the course at *course_url* into *staging* and return what was fetched."""
        staging.mkdir(parents=True, exist_ok=True)
        response = self._open(course_url)
        if _is_json(response):
            manifest = _read_limited(response, defaults.MANIFEST_MAX_BYTES)
            title, specs = parse_manifest(manifest, response.url or course_url)
            for spec in specs:
                check_url_allowed(spec.url, self.allowed_hosts)
            return FetchResult(title=title, files=self._fetch_files(specs, staging, on_progress))
        name = safe_filename(_filename(response, course_url))
        if name == RECORD_NAME:
            name = f"file-{name}"
        spec = FileSpec(path=PurePosixPath(name), url=course_url)
        total = _content_length(response)
        try:
            fetched = self._stream(response, spec, staging, _offset_reporter(on_progress, 0, total, 0, 1))
        finally:
            response.close()
        _report(on_progress, fetched.size, fetched.size, 1, 1)
        return FetchResult(title=name, files=(fetched,))

    def _fetch_files(
        self, specs: list[FileSpec], staging: Path, on_progress: ProgressCallback | None
    ) -> tuple[FetchedFile, ...]:
        declared = [spec.size for spec in specs]
        total = sum(s for s in declared if s is not None) if all(s is not None for s in declared) else None
        done_bytes = 0
        fetched: list[FetchedFile] = []
        for index, spec in enumerate(specs):
            existing = _verified_existing(staging, spec)
            if existing is not None:
                log.info("already fetched and verified: %s", spec.path)
                fetched.append(existing)
                done_bytes += existing.size
                continue
            response = self._open(spec.url)
            try:
                item = self._stream(
                    response, spec, staging, _offset_reporter(on_progress, done_bytes, total, index, len(specs))
                )
            finally:
                response.close()
            fetched.append(item)
            done_bytes += item.size
            _report(on_progress, done_bytes, total, index + 1, len(specs))
        return tuple(fetched)

    def _stream(
        self, response: requests.Response, spec: FileSpec, staging: Path, on_bytes: Callable[[int], None]
    ) -> FetchedFile:
        """Stream a body to `<path>.part`, hashing as it goes; verify; rename into the staging folder."""
        target = join_inside(staging, spec.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        if part.is_symlink() or target.is_symlink():
            raise UnsafePathError(f"refusing to write through a symlink: {str(spec.path)!r}")
        digest = hashlib.sha256()
        size = 0
        limit = spec.size
        try:
            with open(part, "wb") as out:
                for chunk in response.iter_content(chunk_size=defaults.CHUNK_SIZE):
                    if not chunk:
                        continue
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise IntegrityError(f"{spec.path}: more bytes than the declared {limit}")
                    digest.update(chunk)
                    out.write(chunk)
                    on_bytes(size)
        except requests.RequestException as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{spec.path}: transfer broke after {size} bytes: {exc}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        expected_length = _content_length(response)
        actual_sha = digest.hexdigest()
        problem = None
        if expected_length is not None and size != expected_length and "Content-Encoding" not in response.headers:
            problem = f"{spec.path}: body truncated: {size} of {expected_length} bytes"
        elif spec.size is not None and size != spec.size:
            problem = f"{spec.path}: size {size} differs from the manifest's {spec.size}"
        elif spec.sha256 is not None and actual_sha != spec.sha256:
            problem = f"{spec.path}: sha256 {actual_sha} differs from the manifest's {spec.sha256}"
        if problem:
            part.unlink(missing_ok=True)
            raise IntegrityError(problem)
        os.replace(part, target)
        return FetchedFile(path=str(spec.path), size=size, sha256=actual_sha)


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


def _verified_existing(staging: Path, spec: FileSpec) -> FetchedFile | None:
    """A file an earlier attempt finished and verified is not fetched again."""
    if spec.size is None or spec.sha256 is None:
        return None
    target = join_inside(staging, spec.path)
    if target.is_symlink() or not target.is_file() or target.stat().st_size != spec.size:
        return None
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for block in iter(lambda: handle.read(defaults.CHUNK_SIZE), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        return None
    return FetchedFile(path=str(spec.path), size=spec.size, sha256=spec.sha256)


def _offset_reporter(
    on_progress: ProgressCallback | None, base: int, total: int | None, files: int, count: int
) -> Callable[[int], None]:
    """Turn one file's byte count into task-wide progress."""

    def report(done: int) -> None:
        _report(on_progress, base + done, total, files, count)

    return report


def _report(on_progress: ProgressCallback | None, done: int, total: int | None, files: int, count: int) -> None:
    if on_progress is not None:
        on_progress(done, total, files, count)


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
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _filename(response: requests.Response, url: str) -> str:
    disposition = response.headers.get("Content-Disposition", "")
    match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition, re.IGNORECASE)
    if match:
        return unquote(match.group(1))
    return unquote(urlsplit(response.url or url).path.rsplit("/", 1)[-1])
