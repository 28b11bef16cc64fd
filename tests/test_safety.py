"""Guards on network input: the URL allow-list, manifest path checks, and writes that cannot leave their folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from udemy_dl.errors import HostNotAllowedError, PermanentError, UnsafePathError
from udemy_dl.safety import (
    check_peer_allowed,
    check_url_allowed,
    is_internal_address,
    join_inside,
    match_allowed,
    safe_filename,
    safe_relative_path,
    url_target,
)

ALLOWED = frozenset({"cdn.example", "media.example:8443", "127.0.0.1:8080", "[::1]:9000"})


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example/courses/1",
        "http://cdn.example:8000/any/port/for/a/bare/host",
        "https://CDN.Example/case/insensitive",
        "https://media.example:8443/listed/port",
        "http://127.0.0.1:8080/ip",
        "http://[::1]:9000/ipv6",
    ],
)
def test_allowed_url_is_returned_unchanged(url: str) -> None:
    """A http(s) URL whose host (or host:port) is listed passes and comes back as given."""
    assert check_url_allowed(url, ALLOWED) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/x",
        "https://cdn.example.evil.example/suffix-trick",
        "https://evilcdn.example/prefix-trick",
        "http://evil.example?@cdn.example/query-trick",
        "http://evil.example#@cdn.example/fragment-trick",
        "http://127.0.0.2:8080/other-ip",
    ],
)
def test_url_on_a_host_off_the_list_is_refused(url: str) -> None:
    """A host not in ALLOWED_HOSTS is refused, however the URL dresses it up."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, ALLOWED)


@pytest.mark.parametrize(
    "url",
    [
        "https://media.example/default-port-443",
        "http://media.example:8080/wrong-port",
        "http://127.0.0.1/default-port-80",
        "http://127.0.0.1:8081/wrong-port",
        "http://[::1]:9001/wrong-port",
    ],
)
def test_listed_host_on_another_port_is_refused(url: str) -> None:
    """An entry with a port allows that port only (default ports count as 80/443)."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, ALLOWED)


def test_default_port_matches_an_explicit_entry() -> None:
    """https://host/ is host:443 and http://host/ is host:80 for the allow-list."""
    assert check_url_allowed("https://secure.example/x", {"secure.example:443"})
    assert check_url_allowed("http://plain.example/x", {"plain.example:80"})


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cdn.example/file",
        "file:///etc/passwd",
        "gopher://cdn.example/x",
        "javascript:alert(1)",
        "//cdn.example/scheme-relative",
        "cdn.example/no-scheme",
    ],
)
def test_non_http_scheme_is_refused(url: str) -> None:
    """Only http and https URLs are fetched."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, ALLOWED)


@pytest.mark.parametrize(
    "url",
    ["https://user:pw-secret@cdn.example/x", "https://user@cdn.example/x", "https://cdn.example@evil.example/x"],
)
def test_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    """A URL carrying user info is refused (it could hide the real host) and the password is not shown."""
    with pytest.raises(HostNotAllowedError) as caught:
        check_url_allowed(url, ALLOWED)
    assert "pw-secret" not in str(caught.value)


@pytest.mark.parametrize("url", ["http://cdn.example:99999/x", "http://cdn.example:abc/x", "http://[::1/x"])
def test_malformed_url_is_refused_not_crashing(url: str) -> None:
    """A URL the parser rejects is a HostNotAllowedError, not a stray ValueError."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, ALLOWED)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://eu.cdn.example/x", True),
        ("https://a.b.cdn.example/x", True),
        ("https://cdn.example/x", False),
        ("https://cdn.example.evil.example/x", False),
        ("https://evilcdn.example/x", False),
        ("https://eu.media.example:8443/x", True),
        ("https://eu.media.example/x", False),
    ],
)
def test_wildcard_entry_allows_subdomains_only(url: str, allowed: bool) -> None:
    """`*.cdn.example` allows hosts under cdn.example (any port); `*.media.example:8443` only that port."""
    hosts = {"*.cdn.example", "*.media.example:8443"}
    if allowed:
        assert check_url_allowed(url, hosts) == url
    else:
        with pytest.raises(HostNotAllowedError):
            check_url_allowed(url, hosts)


def test_match_allowed_tells_exact_from_pattern() -> None:
    """A host listed by name is an exact match; one matched by a `*` entry is a pattern match."""
    hosts = {"cdn.example", "*.cdn.example", "127.0.0.1:8080"}
    assert match_allowed("CDN.example", 443, hosts) == "exact"
    assert match_allowed("127.0.0.1", 8080, hosts) == "exact"
    assert match_allowed("eu.cdn.example", 443, hosts) == "pattern"
    assert match_allowed("other.example", 443, hosts) is None


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.9", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("::1", True),
        ("fe80::1%eth0", True),
        ("fd00::1", True),
        ("::ffff:10.0.0.1", True),
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
        ("::ffff:93.184.216.34", False),
    ],
)
def test_internal_addresses_are_recognised(address: str, internal: bool) -> None:
    """Loopback, private, link-local (cloud metadata), unspecified, multicast and IPv4-mapped forms are internal."""
    assert is_internal_address(address) is internal


def test_peer_on_an_internal_address_needs_an_exact_entry() -> None:
    """A pattern-allowed host that connects to an internal address is refused; an exactly listed one is not."""
    with pytest.raises(HostNotAllowedError, match="internal address"):
        check_peer_allowed("eu.cdn.example", 443, "10.0.0.5", {"*.cdn.example"})
    check_peer_allowed("origin.internal", 443, "10.0.0.5", {"origin.internal"})
    check_peer_allowed("eu.cdn.example", 443, "93.184.216.34", {"*.cdn.example"})


def test_refused_url_is_a_permanent_error() -> None:
    """A host off the allow-list is permanent: retrying cannot help."""
    assert issubclass(HostNotAllowedError, PermanentError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("video.mp4", "video.mp4"),
        ("section 1/lecture-01.mp4", "section 1/lecture-01.mp4"),
        ("a//b", "a/b"),
        ("./a.bin", "a.bin"),
    ],
)
def test_clean_relative_path_is_accepted(raw: str, expected: str) -> None:
    """A plain relative manifest path comes back as a clean PurePosixPath."""
    assert safe_relative_path(raw) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "raw",
    [
        "../escape.bin",
        "a/../../escape.bin",
        "a/..",
        "/etc/passwd",
        "\\\\server\\share\\x",
        "\\windows\\system32",
        "..\\escape.bin",
        "a\\..\\..\\escape.bin",
        "C:/Windows/x",
        "c:relative",
        ".hidden",
        "a/.git/config",
        "a/b\x00c",
        "a/b\nc",
        "a/b:c",
        "",
        "   ",
        None,
        42,
    ],
)
def test_unsafe_manifest_path_is_refused(raw: object) -> None:
    """`..`, absolute, drive, backslash-rooted, hidden, control-character and empty paths are refused."""
    with pytest.raises(UnsafePathError):
        safe_relative_path(raw)


def test_backslash_separators_become_nested_folders() -> None:
    """A Windows-style relative path is read as nested folders, not one odd file name."""
    assert safe_relative_path("section\\video.mp4") == PurePosixPath("section/video.mp4")


def test_join_inside_returns_the_path_under_the_folder(tmp_path: Path) -> None:
    """A clean relative path joins under the folder."""
    folder = tmp_path / "task"
    folder.mkdir()
    assert join_inside(folder, PurePosixPath("a/b.bin")) == folder / "a" / "b.bin"


def test_join_inside_refuses_a_symlinked_folder_that_escapes(tmp_path: Path) -> None:
    """A folder inside the task folder that is a symlink to elsewhere cannot be written through."""
    folder, outside = tmp_path / "task", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        join_inside(folder, PurePosixPath("sub/file.bin"))
    assert list(outside.iterdir()) == []


def test_join_inside_refuses_a_symlinked_file_that_escapes(tmp_path: Path) -> None:
    """A file name that is a symlink to a file outside is refused (it would be overwritten)."""
    folder = tmp_path / "task"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    (folder / "file.bin").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        join_inside(folder, PurePosixPath("file.bin"))


def test_join_inside_refuses_a_symlink_even_when_it_points_inside(tmp_path: Path) -> None:
    """Any symlink on the way is refused: the folder's files must be real files."""
    folder = tmp_path / "task"
    (folder / "real").mkdir(parents=True)
    (folder / "alias").symlink_to(folder / "real", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        join_inside(folder, PurePosixPath("alias/file.bin"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("video.mp4", "video.mp4"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        (".bashrc", "bashrc"),
        ("..", "download"),
        ("", "download"),
        ("a<b>c|d?.mp4", "a_b_c_d_.mp4"),
    ],
)
def test_safe_filename_reduces_a_name_to_one_harmless_component(name: str, expected: str) -> None:
    """Names from URLs or Content-Disposition lose folders, leading dots and reserved characters."""
    assert safe_filename(name) == expected


# -- the host that is checked is the host that is connected to (issue 8, item 1) ------------------

PATTERN = frozenset({"*.cdn.example.com"})


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example\\.cdn.example.com/x",
        "http://evil.example\\@eu.cdn.example.com/x",
        "https://eu.cdn.example.com\\@evil.example/x",
        "http://eu.cdn.example.com/a\\b",
        "http://eu.cdn.example.com/a b",
        "http://eu.cdn.example.com/a\tb",
        "http://eu.cdn.example.com/x\nINFO forged line",
        "http://eu.cdn.example.com/x\r",
        "http://eu.cdn.example.com/x\x00",
        "http://eu.cdn.example.com/x\x1b[31m",
        "http://eu.cdn.example.com/x\x7f",
        "http://eu.cdn.example.com/x\x85",
        "http://eu.cdn.example.com/x\xa0",
        "http://eu.cdn.example.com/x\u2028",
        "http://eu.cdn.example.com/x\u3000",
        "http://eu.cdn.example.com/x\u202e",
        "http://eu.cdn.example.com/x\u200b",
        " http://eu.cdn.example.com/x",
    ],
)
def test_url_with_backslash_whitespace_or_control_character_is_refused(url: str) -> None:
    """Backslashes, whitespace (Unicode too) and control or format characters are refused anywhere in a URL."""
    with pytest.raises(HostNotAllowedError, match="whitespace, control characters and backslashes"):
        check_url_allowed(url, PATTERN)


def test_backslash_host_trick_is_judged_as_the_host_requests_connects_to() -> None:
    """The review's repro: requests ends the host at the backslash, so the URL is for evil.example."""
    url = "http://evil.example\\.cdn.example.com/x"
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, PATTERN)
    with pytest.raises(HostNotAllowedError):
        url_target(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://eu%2ecdn.example.com/x",
        "http://evil.example%2f.cdn.example.com/x",
        "http://evil.example%40x.cdn.example.com/x",
        "http://[fe80::1%25eth0]:9000/zone-id",
        "http://[fe80::1%eth0]:9000/zone-id",
    ],
)
def test_percent_encoded_host_or_zone_id_is_refused(url: str) -> None:
    """A host spelled with %-escapes (or an IPv6 zone id) is read differently by different parsers: refused."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, PATTERN | {"[fe80::1]:9000"})


@pytest.mark.parametrize(
    "url",
    [
        "http://a@b@eu.cdn.example.com/x",
        "http://@eu.cdn.example.com/x",
        "http://eu.cdn.example.com:443@evil.example/x",
        "http://:@eu.cdn.example.com/x",
    ],
)
def test_any_user_info_is_refused(url: str) -> None:
    """Whatever stands before an '@' in the authority, the URL is refused."""
    with pytest.raises(HostNotAllowedError, match="credentials"):
        check_url_allowed(url, PATTERN)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://Bücher.Example/x", "xn--bcher-kva.example", 80),
        ("https://BÜCHER.example./x", "xn--bcher-kva.example", 443),
        ("http://xn--bcher-kva.example:8080/x", "xn--bcher-kva.example", 8080),
        ("HTTPS://EU.CDN.Example.COM./x", "eu.cdn.example.com", 443),
        ("http://[0:0::1]:9000/x", "::1", 9000),
        ("http://[::FFFF:7F00:1]/x", "::ffff:7f00:1", 80),
        ("http://127.0.0.1:8080/x", "127.0.0.1", 8080),
    ],
)
def test_url_target_is_the_encoded_lowercase_host_requests_connects_to(url: str, host: str, port: int) -> None:
    """IDNA hosts are judged in their encoded form, case and one trailing dot do not matter, IPv6 is canonical."""
    target = url_target(url)
    assert (target.host, target.port) == (host, port)


def test_idna_host_is_allowed_by_its_encoded_entry() -> None:
    """requests IDNA-encodes hosts: an entry in either form allows the URL in either form."""
    assert check_url_allowed("http://bücher.example/x", {"xn--bcher-kva.example"})
    assert check_url_allowed("http://xn--bcher-kva.example/x", {"bücher.example"})
    with pytest.raises(HostNotAllowedError):
        check_url_allowed("http://bucher.example/x", {"bücher.example"})


def test_trailing_dot_and_case_do_not_change_the_verdict() -> None:
    """`cdn.example.` is the same name as `cdn.example`; case never matters."""
    assert check_url_allowed("https://CDN.example./x", {"cdn.example"})
    assert check_url_allowed("https://eu.cdn.example.com./x", PATTERN)
    with pytest.raises(HostNotAllowedError):
        check_url_allowed("https://cdn.example.com./x", PATTERN)


@pytest.mark.parametrize(
    "url",
    [
        "http://0x7f.1:8080/x",
        "http://2130706433:8080/x",
        "http://127.1:8080/x",
        "http://0127.0.0.1:8080/x",
        "http://127.0.0.01:8080/x",
    ],
)
def test_non_canonical_ipv4_is_refused(url: str) -> None:
    """Hex, octal, shortened or integer IPv4 forms reach an address the allow-list never sees written: refused."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, {"127.0.0.1:8080", "*.cdn.example.com"})


@pytest.mark.parametrize("url", ["http://cdn.example:0/x", "http://*.cdn.example.com/x", "http://.cdn.example.com/x"])
def test_url_requests_would_rewrite_or_refuse_is_refused(url: str) -> None:
    """Port 0 (requests drops it), a `*` or empty label: refused rather than guessed."""
    with pytest.raises(HostNotAllowedError):
        check_url_allowed(url, {"cdn.example", "*.cdn.example.com"})


def test_refusal_does_not_echo_credentials() -> None:
    """Even a URL refused for its characters does not show the user info it carries."""
    with pytest.raises(HostNotAllowedError) as caught:
        check_url_allowed("http://user:pw-secret@eu.cdn.example.com/a b", PATTERN)
    assert "pw-secret" not in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        "a/b\x7f",
        "a/b\x85",
        "a/b\u2028",
        "a/\u202egnp.exe",
        "a/b\u200b",
        "a/\ud800",
        "é" * 128,
        "a/" + "b" * 256,
        ".",
        "./",
        ".//.",
    ],
)
def test_manifest_path_with_unicode_controls_or_overlong_names_is_refused(raw: str) -> None:
    """DEL, C1 controls, line separators, bidi overrides, surrogates and names over 255 bytes are refused."""
    with pytest.raises(UnsafePathError):
        safe_relative_path(raw)


def test_join_inside_refuses_a_symlink_loop(tmp_path: Path) -> None:
    """A symlink loop in the folder is an UnsafePathError, not a RuntimeError from pathlib."""
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "loop").symlink_to("loop")
    with pytest.raises(UnsafePathError):
        join_inside(folder, PurePosixPath("loop/file.bin"))


def test_join_inside_refuses_the_folder_itself(tmp_path: Path) -> None:
    """An empty relative path would name the task folder, not a file in it."""
    with pytest.raises(UnsafePathError):
        join_inside(tmp_path, PurePosixPath())
