"""Properties of the network guards, on generated input.

URLs: whatever check_url_allowed accepts, requests (urllib3) really connects to that same host and
port, and that host is on the list by an oracle written independently of udemy_dl.safety; a
token-bearing request from the Fetcher (course URL, redirect target, manifest file URL) is never
connected anywhere else. The "real" connection is observed inside urllib3's own connection class,
after requests and urllib3 have done all their parsing, so no parser of ours stands in between.

Manifest paths: any string is either refused with UnsafePathError or joins to a path that resolves
inside the task folder, with real folders holding real symlinks that point out, in, to files, to
nowhere, and at themselves; and writing there leaves everything outside untouched.
"""

from __future__ import annotations

import io
import ipaddress
import json
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from udemy_dl.errors import HostNotAllowedError, UnsafePathError
from udemy_dl.fetch import Fetcher, parse_manifest
from udemy_dl.safety import check_url_allowed, join_inside, safe_relative_path, url_target

ALLOWED = frozenset(
    {"*.cdn.example.com", "origin.example:8443", "127.0.0.1:8080", "[::1]:9000", "xn--bcher-kva.example"}
)
TOKEN = "content-token-secret"
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def independently_allowed(host: str, port: int) -> bool:
    """The oracle: is the host urllib3 connects to (as it hands it to DNS) on ALLOWED? No udemy_dl code used."""
    name = host[:-1] if host.endswith(".") else host
    if name != name.lower() or not name.isascii():
        return False
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name) == ipaddress.IPv6Address("::1") and port == 9000
        except ValueError:
            return False
    labels = name.split(".")
    if not all(label and all(c.isalnum() or c in "-_" for c in label) for label in labels):
        return False
    return (
        (name.endswith(".cdn.example.com"))
        or (name, port) in {("origin.example", 8443), ("127.0.0.1", 8080)}
        or name == "xn--bcher-kva.example"
    )


# -- observing where requests really connects --------------------------------------------------------


class Connected(Exception):
    """Raised by the recording connection instead of opening a socket: where it would have gone.

    *authorization* is the header the request carried (plain HTTP writes the request before it
    connects; HTTPS connects first, so there it is None).
    """

    def __init__(self, scheme: str, host: str, port: int, authorization: str | None) -> None:
        super().__init__(f"{scheme}://{host}:{port}")
        self.scheme, self.host, self.port, self.authorization = scheme, host, port, authorization


class RecordingHTTP(HTTPConnection):
    authorization: str | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        self.authorization = (headers or {}).get("Authorization")
        super().request(method, url, body=body, headers=headers, **kwargs)

    def connect(self) -> None:
        raise Connected("http", self._dns_host, self.port, self.authorization)


class RecordingHTTPS(HTTPSConnection):
    def connect(self) -> None:
        raise Connected("https", self._dns_host, self.port, None)


class RecordingPool(HTTPConnectionPool):
    ConnectionCls = RecordingHTTP


class RecordingHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = RecordingHTTPS


class RecordingAdapter(HTTPAdapter):
    """requests' own adapter and urllib3's own pools; only the socket is never opened.

    A request for `redirect_from` is answered with a 302 to `location` (to follow the Fetcher's redirect path).
    """

    redirect_from: str | None = None
    location: str = ""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": RecordingPool, "https": RecordingHTTPSPool}

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if self.redirect_from is not None and request.url == self.redirect_from:
            response = requests.Response()
            response.status_code = 302
            response.headers = CaseInsensitiveDict({"Location": self.location})
            response.raw = io.BytesIO(b"")
            response.url = request.url
            response.request = request
            return response
        return super().send(request, *args, **kwargs)


def recording_session() -> tuple[requests.Session, RecordingAdapter]:
    session = requests.Session()
    session.trust_env = False
    adapter = RecordingAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session, adapter


SESSION, ADAPTER = recording_session()


def real_target(url: str) -> Connected | None:
    """Where requests would connect for *url* with the token set (None: requests itself refuses the URL)."""
    try:
        SESSION.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, allow_redirects=False, timeout=1)
    except Connected as connected:
        return connected
    except (requests.RequestException, ValueError):
        return None
    raise AssertionError(f"the recording adapter let a request through: {url!r}")


def assert_agrees(url: str) -> None:
    """The allow-list's verdict on *url* is the verdict on the host requests really connects to."""
    real = real_target(url)
    try:
        target = url_target(url)
    except HostNotAllowedError:
        with pytest.raises(HostNotAllowedError):
            check_url_allowed(url, ALLOWED)
        return
    assert real is not None, f"accepted, but requests refuses it: {url!r}"
    dns_host = real.host[:-1] if real.host.endswith(".") else real.host
    same_host = dns_host == target.host or (
        ":" in dns_host and ipaddress.ip_address(dns_host) == ipaddress.ip_address(target.host)
    )
    assert same_host and (real.scheme, real.port) == (target.scheme, target.port), (url, real, target)
    try:
        check_url_allowed(url, ALLOWED)
    except HostNotAllowedError:
        return
    assert independently_allowed(real.host, real.port), f"allowed, but requests connects to {real}: {url!r}"


# -- generated URLs ---------------------------------------------------------------------------------

ALLOWED_NAMES = [
    "eu.cdn.example.com",
    "a.b.cdn.example.com",
    "EU.CDN.Example.COM.",
    "cdn.example.com",
    "origin.example",
    "127.0.0.1",
    "[::1]",
    "[0:0::1]",
    "xn--bcher-kva.example",
    "bücher.example",
    "BÜCHER.EXAMPLE.",
]
OTHER_NAMES = [
    "evil.example",
    "evil.example.",
    "10.0.0.1",
    "[::2]",
    "[fe80::1%25eth0]",
    "[fe80::1%eth0]",
    "[::ffff:127.0.0.1]",
    "0x7f.1",
    "0x7f.0.0.1",
    "2130706433",
    "127.1",
    "0177.0.0.1",
    "evil%2eexample",
    "eu%2ecdn.example.com",
    "évil.example",
    "\uff45\uff55.cdn.example.com",  # fullwidth "eu"
    "localhost",
    "*.cdn.example.com",
    ".cdn.example.com",
    "cdn.example.com..",
    "",
]
GLUE = [
    "",
    ".",
    "\\",
    "\\.",
    "/",
    "%5c",
    "%5C.",
    "%2e",
    "%2f",
    "%40",
    "@",
    ":",
    "#",
    "?",
    ";",
    "[",
    "]",
    "\t",
    "\n",
    "\r",
    " ",
    "\x00",
    "\x7f",
    "\x85",
    "\xa0",
    "\u3002",
    "\uff0e",
    "\u2028",
    "\u200b",
    "%00",
    "%25",
]
label = st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True)
generated_name = st.lists(label, min_size=1, max_size=3).map(".".join) | st.lists(label, min_size=1, max_size=2).map(
    lambda labels: ".".join([*labels, "cdn.example.com"])
)
any_name = st.sampled_from(ALLOWED_NAMES) | st.sampled_from(OTHER_NAMES) | generated_name
glued_name = st.tuples(any_name, st.sampled_from(GLUE), any_name).map("".join)
scrambled_name = st.lists(st.sampled_from([*"ab.-_:[]@/#?ü*", *GLUE]), max_size=12).map("".join)
host = any_name | glued_name | scrambled_name
userinfo = st.sampled_from(
    ["", "", "", "", "user@", "u:p@", "eu.cdn.example.com@", "evil.example:443@", "a@b@", "@", ":@"]
)
port = st.sampled_from(
    ["", "", "", ":", ":0", ":80", ":443", ":8080", ":8443", ":9000", ":65535", ":65536", ":abc"]
) | (st.integers(min_value=-1, max_value=70_000).map(lambda number: f":{number}"))
scheme = st.sampled_from(["http", "https", "http", "https", "HTTP", "hTTps", "ftp", "", "javascript"])
separator = st.sampled_from(["://", "://", "://", ":/", ":", ":\\\\", ":///", "://\\", "//"])
rest = st.sampled_from(["", "/", "/x", "\\x", "?q=1", "#f", "/a b", "/\u2028", "/%2e%2e/", "?@evil.example", "/\\evil"])
urls = st.tuples(scheme, separator, userinfo, host, port, rest).map("".join)
anything = st.text(max_size=40)


@PROPERTY
@given(url=urls | anything)
@example("http://evil.example\\.cdn.example.com/x")
@example("http://evil.example%5c.cdn.example.com/x")
@example("http://evil%2eexample/x")
@example("http://eu.cdn.example.com\\@evil.example/x")
@example("http://[fe80::1%25eth0]:9000/")
@example("http://bücher.example/x")
@example("http://0x7f.0.0.1:8080/")
@example("https://eu.cdn.example.com.:443/x")
def test_verdict_agrees_with_where_requests_connects(url: str) -> None:
    """Accepted URLs connect exactly where the check looked, and only to listed hosts."""
    assert_agrees(url)


def assert_open_refused_or_allowed(url: str, what: object) -> None:
    """Fetcher._open(*url*) either refuses before any connection or connects only to a listed host (requests
    refusing the URL itself, after our check, connects nothing either)."""
    fetcher = Fetcher(ALLOWED, token=TOKEN, session=SESSION, timeout=(1.0, 1.0))
    try:
        fetcher._open(url)
    except HostNotAllowedError:
        return
    except Connected as connected:
        assert independently_allowed(connected.host, connected.port), (what, connected)
        return
    except Exception as exc:
        assert not isinstance(exc, AssertionError)
        return
    raise AssertionError(f"no connection and no refusal for {what!r}")


@PROPERTY
@given(url=urls | anything)
@example("http://evil.example\\.cdn.example.com/x")
def test_fetcher_never_connects_with_the_token_outside_the_list(url: str) -> None:
    """Through Fetcher._open (the one place the token is attached): refused before any connection, or allowed."""
    ADAPTER.redirect_from = None
    assert_open_refused_or_allowed(url, url)


BASE = "https://eu.cdn.example.com/courses/1"
location = (
    urls
    | st.tuples(st.sampled_from(["//", "///", "/\\", "\\\\", "\\/", "/", ""]), host, port, rest).map("".join)
    | anything
)


@PROPERTY
@given(location=location)
@example("//evil.example\\.cdn.example.com/x")
@example("/\\evil.example/x")
@example("\\\\evil.example/x")
def test_redirect_target_never_takes_the_token_outside_the_list(location: str) -> None:
    """A redirect Location, resolved against the course URL as the Fetcher resolves it, obeys the same rule."""
    ADAPTER.redirect_from = BASE
    ADAPTER.location = location
    try:
        assert_open_refused_or_allowed(BASE, f"a redirect to {location!r}")
    finally:
        ADAPTER.redirect_from = None


@PROPERTY
@given(file_url=location)
@example("//evil.example\\.cdn.example.com/a.bin")
def test_manifest_file_url_agrees_with_where_requests_connects(file_url: str) -> None:
    """A manifest's file URL is resolved against the manifest's URL; the resolved URL obeys the same rule."""
    document = json.dumps({"files": [{"path": "a.bin", "url": file_url}]}).encode()
    try:
        _, specs = parse_manifest(document, BASE)
    except Exception:
        return  # refused as a manifest: nothing is fetched
    for spec in specs:
        assert_agrees(spec.url)


# -- manifest paths ----------------------------------------------------------------------------------

SEGMENTS = [
    "a",
    "b.bin",
    "..",
    ".",
    "",
    "link",
    "inlink",
    "filelink",
    "loop",
    "dangling",
    "root",
    "up",
    "real",
    "real/f",
    "C:",
    "c:x",
    "~",
    ".git",
    "é",
    "..\\..",
    "a\\..",
    "\x00",
    "\n",
    " ",
    "\u202e",
    "\udc80",
    "e" * 256,
    "é" * 128,
]
segment = st.sampled_from(SEGMENTS) | st.text(max_size=6)
joined = st.tuples(st.lists(segment, max_size=6), st.sampled_from(["/", "\\", "//"])).map(
    lambda parts_sep: parts_sep[1].join(parts_sep[0])
)
raw_path: st.SearchStrategy[object] = joined | st.text(max_size=30) | st.none() | st.integers()


def make_task_folder(root: Path) -> tuple[Path, Path]:
    """A task folder holding a real sub-folder and symlinks of every kind, and an outside folder with a victim."""
    folder, outside = root / "task", root / "outside"
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "f").write_text("inside", encoding="utf-8")
    outside.mkdir()
    (outside / "victim").write_text("keep me", encoding="utf-8")
    (folder / "link").symlink_to(outside, target_is_directory=True)
    (folder / "inlink").symlink_to(folder / "real", target_is_directory=True)
    (folder / "filelink").symlink_to(outside / "victim")
    (folder / "loop").symlink_to("loop")
    (folder / "dangling").symlink_to(outside / "missing")
    (folder / "root").symlink_to("/", target_is_directory=True)
    (folder / "up").symlink_to("..", target_is_directory=True)
    return folder, outside


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*")) if p.is_file()}


@settings(max_examples=200, deadline=None)
@given(raw=raw_path)
@example(".")
@example("./")
@example("loop/x")
@example("link/victim")
@example("inlink/f")
@example("up/outside/victim")
@example("dangling")
@example("é" * 128)
@example("\udc80")
def test_manifest_path_is_refused_or_stays_inside_the_task_folder(raw: object) -> None:
    """Refused with UnsafePathError, or a path that resolves inside the folder; writing there leaves outside alone."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, outside = make_task_folder(root)
        before = tree(outside)
        try:
            relative = safe_relative_path(raw)
            target = join_inside(folder, relative)
        except UnsafePathError:
            return
        assert isinstance(relative, PurePosixPath) and not relative.is_absolute()
        base = folder.resolve()
        assert base in target.resolve().parents, (raw, target)
        assert not any(parent.is_symlink() for parent in [target, *target.parents] if base in parent.parents)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("fetched", encoding="utf-8")
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            pass  # a path that collides with a folder or file already there: refused by the file system, inside
        assert tree(outside) == before
        assert sorted(p.name for p in root.iterdir()) == ["outside", "task"]
