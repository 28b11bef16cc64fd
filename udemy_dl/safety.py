"""Guards on what comes from the network: URLs must point to allowed hosts, paths stay in their folder.

The allow-list judges the host that requests (urllib3) will really connect to: a URL is read with
requests' own preparation (urllib3's `parse_url`, IDNA encoding) and then as `HTTPAdapter` picks
its connection pool; every other reading of the URL must agree, and URLs holding whitespace,
control characters or backslashes (on which parsers disagree) are refused outright.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse, urlsplit

import idna
import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from .errors import HostNotAllowedError, UnsafePathError

_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"|?*\\]")
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control, format (bidi overrides, zero-width), surrogate and line/paragraph separator characters."""
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL_RE = re.compile(r"0x[0-9a-f]*|[0-9]+")
_NAME_MAX = 255
"""Bytes in one file name on Linux file systems."""
DEFAULT_PORTS = {"http": 80, "https": 443}


def first_control_char(text: str) -> str | None:
    """The first control, format, surrogate or line-separator character in *text*, or None."""
    for char in text:
        if unicodedata.category(char) in _CONTROL_CATEGORIES:
            return char
    return None


def first_url_unsafe_char(text: str) -> str | None:
    """The first character of *text* that a URL must not hold: control, whitespace (any) or backslash."""
    for char in text:
        if char == "\\" or char.isspace() or unicodedata.category(char) in _CONTROL_CATEGORIES:
            return char
    return None


def describe_char(char: str) -> str:
    """A character named so that a log line or message cannot be forged with it: `'\\n' (U+000A)`."""
    return f"{char!r} (U+{ord(char):04X})"


def _host_label(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _shown(url: str) -> str:
    """*url* with any user info masked, for messages: a refused URL must not leak a password."""
    return re.sub(r"^([^:/?#]*:)?//[^/?#]*@", lambda m: f"{m.group(1) or ''}//***@", url, count=1)


def canonical_host(host: str) -> str:
    """*host* as the allow-list compares it, or ValueError saying what is wrong with it.

    Lowercase; IDNA-encoded as requests encodes it; one trailing dot dropped (`cdn.example.` is
    `cdn.example`); IPv6 without brackets in its compressed form; IPv4 only as a canonical dotted
    quad (hex, octal, integer or shortened forms reach addresses nobody wrote down).
    """
    name = host.lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
        if ":" not in name:
            raise ValueError(f"only IPv6 addresses go in brackets, got {host!r}")
    if ":" in name:
        if "%" in name:
            raise ValueError(f"IPv6 zone ids are not allowed, got {host!r}")
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            raise ValueError(f"not a valid IPv6 address: {host!r}") from None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ValueError(f"not a valid internationalised host name: {host!r}") from None
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(
            f"not a valid host name: {host!r} (labels of 1-63 letters, digits, '-' or '_', separated by dots)"
        )
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        try:
            address = ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f"not a valid host name or dotted-quad IPv4 address: {host!r}") from None
        return str(address)
    return name


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedEntry:
    """One ALLOWED_HOSTS entry: a host (or, for a pattern, the domain its hosts lie under) and maybe a port."""

    host: str
    port: int | None = None
    pattern: bool = False

    def __str__(self) -> str:
        name = f"*.{self.host}" if self.pattern else _host_label(self.host)
        return name if self.port is None else f"{name}:{self.port}"

    def matches(self, host: str, port: int) -> bool:
        """Whether canonical *host*:*port* is allowed by this entry."""
        if self.port is not None and port != self.port:
            return False
        if self.pattern:
            return host.endswith(f".{self.host}")
        return host == self.host


ENTRY_FORMS = "host, host:port, [IPv6]:port or *.domain[:port]"
_IPV6_ENTRY_RE = re.compile(r"(?P<host>\[[^\[\]]*\])(?::(?P<port>.*))?")
_UNRELATED_PROBES = ("evil.example", "attacker.invalid", "a.b.c.test")
"""Hosts no operator means to allow: a pattern matching all of them would allow every host."""


def _refuse_wildcards(entry: str, text: str) -> None:
    body = text[2:] if text.startswith("*.") else text
    if (
        "*" not in body
        and "?" not in text
        and (("[" not in text and "]" not in text) or _IPV6_ENTRY_RE.fullmatch(text))
    ):
        return
    host = text if _IPV6_ENTRY_RE.fullmatch(text) else text.split(":", 1)[0]
    if all(fnmatchcase(probe, host) for probe in _UNRELATED_PROBES):
        raise ValueError(f"pattern {entry!r} would allow every host: expected {ENTRY_FORMS}")
    raise ValueError(
        f"pattern {entry!r} is not supported: the only pattern is a leading '*.' label, as in *.cdn.example.com "
        "(the hosts under cdn.example.com); '?', '[...]' and other uses of '*' are refused, and a port is a number "
        "(leave it out to allow any port)"
    )


@lru_cache(maxsize=4096)
def parse_allowed_entry(entry: str) -> AllowedEntry:
    """Read one ALLOWED_HOSTS entry, or raise ValueError with a message naming it.

    A pattern is exactly a leading `*.` label over a domain of two labels or more
    (`*.cdn.example.com` allows every host under cdn.example.com, at any depth, never
    cdn.example.com itself). Other `*` uses, `?` and `[...]` classes are refused: they are easy to
    get wrong and several of them would allow every host. Hosts are stored as requests connects
    to them: lowercase, IDNA-encoded, without a trailing dot, IPv6 in its compressed form.
    """
    text = entry.strip().lower()
    if not text:
        raise ValueError(f"empty entry: expected {ENTRY_FORMS}")
    bad = first_url_unsafe_char(text)
    if bad is not None:
        raise ValueError(f"entry {entry!r} holds {describe_char(bad)}: expected {ENTRY_FORMS}")
    if any(char in text for char in "/@#%"):
        raise ValueError(f"entry {entry!r} is not a host: expected {ENTRY_FORMS}, not a URL")
    _refuse_wildcards(entry, text)
    bracketed = _IPV6_ENTRY_RE.fullmatch(text)
    if bracketed:
        host, port_text = bracketed["host"], bracketed["port"]
    elif text.count(":") > 1:
        raise ValueError(f"entry {entry!r} is not {ENTRY_FORMS} (an IPv6 address goes in brackets: [::1]:8080)")
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
    port: int | None = None
    if port_text is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(
                f"entry {entry!r}: port must be a number from 1 to 65535 (leave it out to allow any port), "
                f"got {port_text!r}"
            )
        port = int(port_text)
    pattern = host.startswith("*.")
    try:
        name = canonical_host(host[2:] if pattern else host)
    except ValueError as exc:
        raise ValueError(f"entry {entry!r}: {exc}") from None
    if pattern and (_is_ip(name) or "." not in name):
        raise ValueError(
            f"pattern {entry!r} is too broad: '*.' must be followed by a domain of two labels or more, "
            "as in *.cdn.example.com"
        )
    return AllowedEntry(host=name, port=port, pattern=pattern)


def match_allowed(host: str, port: int, allowed_hosts: Collection[str]) -> str | None:
    """How *host*:*port* is allowed: "exact" (listed by name), "pattern" (under a `*.` entry), or None."""
    try:
        name = canonical_host(host)
    except ValueError:
        return None
    found = None
    for text in allowed_hosts:
        try:
            entry = parse_allowed_entry(text)
        except ValueError:
            continue  # settings refuse such entries at start-up; here they simply allow nothing
        if entry.matches(name, port):
            if not entry.pattern:
                return "exact"
            found = "pattern"
    return found


@dataclass(frozen=True)
class UrlTarget:
    """Where requests connects for a URL: scheme, canonical host and port."""

    scheme: str
    host: str
    port: int

    @property
    def label(self) -> str:
        return f"{_host_label(self.host)}:{self.port}"


def url_target(url: str) -> UrlTarget:
    """Where requests (urllib3) would connect for *url*; HostNotAllowedError if it is unsafe or ambiguous.

    The URL is prepared exactly as requests prepares it (urllib3's `parse_url`, IDNA encoding) and
    its host read as `HTTPAdapter` reads it to pick a connection pool. Python's `urlsplit` and
    urllib3's `parse_url` must read the same host and port, or the URL is refused.
    """
    if not isinstance(url, str):
        raise HostNotAllowedError(f"URL must be a string, got {type(url).__name__}")
    bad = first_url_unsafe_char(url)
    if bad is not None:
        raise HostNotAllowedError(
            f"URL holds {describe_char(bad)}; whitespace, control characters and backslashes are refused "
            f"anywhere in a URL: {_shown(url)!r}"
        )
    try:
        parsed = parse_url(url)
        split = urlsplit(url)
        split_port = split.port
    except (LocationParseError, ValueError):
        raise HostNotAllowedError(f"malformed URL: {_shown(url)!r}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or split.scheme.lower() != scheme:
        raise HostNotAllowedError(f"URL scheme must be http or https: {_shown(url)!r}")
    if parsed.auth is not None or "@" in split.netloc:
        raise HostNotAllowedError(f"URL must not carry credentials: host {parsed.host!r}")
    if not parsed.host or not split.hostname:
        raise HostNotAllowedError(f"URL has no host: {_shown(url)!r}")
    if "%" in split.netloc:
        raise HostNotAllowedError(f"URL host must not be percent-encoded (nor carry an IPv6 zone id): {url!r}")
    if parsed.port == 0:
        raise HostNotAllowedError(f"URL port must be from 1 to 65535: {url!r}")
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
        sent = urlparse(prepared.url or "")  # as HTTPAdapter reads it to choose the connection pool
        sent_host, sent_port = sent.hostname or "", sent.port
        host = canonical_host(sent_host)
        others = {canonical_host(parsed.host), canonical_host(split.hostname)}
    except (requests.RequestException, LocationParseError, ValueError) as exc:
        raise HostNotAllowedError(f"URL host is not usable ({exc}): {url!r}") from None
    default = DEFAULT_PORTS[scheme]
    port = sent_port or default
    if sent.scheme.lower() != scheme or others != {host} or {parsed.port or default, split_port or default} != {port}:
        raise HostNotAllowedError(f"URL is read as different hosts by different parsers: {url!r}")
    return UrlTarget(scheme=scheme, host=host, port=port)


def check_url_allowed(url: str, allowed_hosts: Collection[str]) -> str:
    """Return *url* if its scheme is http(s) and the host (or host:port) requests connects to is allowed."""
    target = url_target(url)
    if match_allowed(target.host, target.port, allowed_hosts):
        return url
    raise HostNotAllowedError(f"host {target.label} of {_shown(url)!r} is not in ALLOWED_HOSTS")


def is_internal_address(address: str) -> bool:
    """Private, loopback, link-local, reserved, multicast or unspecified: not the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_peer_allowed(host: str, port: int, peer_address: str, allowed_hosts: Collection[str]) -> None:
    """Refuse a connection whose actual peer is an internal address, unless that exact host is listed.

    Checked on the address the socket really connected to, so DNS cannot smuggle one in.
    """
    if not is_internal_address(peer_address):
        return
    if match_allowed(host, port, allowed_hosts) == "exact":
        return
    raise HostNotAllowedError(
        f"host {_host_label(host)}:{port} resolved to internal address {peer_address}; "
        "list that exact host in ALLOWED_HOSTS to allow it"
    )


def safe_relative_path(raw: object) -> PurePosixPath:
    """Return a manifest file path as a clean relative path, or raise UnsafePathError naming it."""
    if not isinstance(raw, str) or not raw.strip():
        raise UnsafePathError(f"file path must be a non-empty string, got {raw!r}")
    bad = first_control_char(raw)
    if bad is not None:
        raise UnsafePathError(f"file path holds control character {describe_char(bad)}: {raw!r}")
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise UnsafePathError(f"file path must be relative: {raw!r}")
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if not parts:
        raise UnsafePathError(f"file path names no file: {raw!r}")
    if any(part in ("..", ".") for part in parts):
        raise UnsafePathError(f"file path must not contain '.' or '..': {raw!r}")
    if any(_UNSAFE_CHARS.search(part) for part in parts):
        raise UnsafePathError(f"file path holds control or reserved characters: {raw!r}")
    if any(part.startswith(".") for part in parts):
        raise UnsafePathError(f"file path must not name hidden files: {raw!r}")
    if any(len(part.encode("utf-8")) > _NAME_MAX for part in parts):
        raise UnsafePathError(f"file path has a name longer than {_NAME_MAX} bytes: {raw!r}")
    return PurePosixPath(*parts)


def join_inside(folder: Path, relative: PurePosixPath) -> Path:
    """Join *relative* under *folder* and prove the result does not leave it, symlinks included."""
    target = folder.joinpath(*relative.parts)
    try:
        base = folder.resolve()
        resolved = target.resolve()
        if base not in resolved.parents:
            raise UnsafePathError(f"file path leaves the task folder: {str(relative)!r}")
        for parent in [target, *target.parents]:
            if parent == folder:
                break
            if parent.is_symlink():
                raise UnsafePathError(f"refusing to write through a symlink: {str(relative)!r}")
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long for the file system
        raise UnsafePathError(f"file path cannot be used in the task folder: {str(relative)!r}: {exc}") from None
    return target


def safe_filename(name: str, fallback: str = "download") -> str:
    """Reduce a name from a URL or header to one harmless path component (at most 200 bytes)."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join("_" if unicodedata.category(char) in _CONTROL_CATEGORIES else char for char in name)
    name = _UNSAFE_CHARS.sub("_", name).strip().lstrip(".")
    name = name.encode("utf-8")[:200].decode("utf-8", errors="ignore")
    return name or fallback
