"""Guards on what comes from the network: URLs must point to allowed hosts, paths stay in their folder."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .errors import HostNotAllowedError, UnsafePathError

_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"|?*\\]")


def _host_label(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def match_allowed(host: str, port: int, allowed_hosts: Collection[str]) -> str | None:
    """How *host*:*port* is allowed: "exact" (listed by name), "pattern" (matched a `*` entry), or None."""
    host = host.lower()
    label = f"{_host_label(host)}:{port}"
    if host in allowed_hosts or label in allowed_hosts:
        return "exact"
    for entry in allowed_hosts:
        if "*" in entry and (fnmatchcase(host, entry) or fnmatchcase(label, entry)):
            return "pattern"
    return None


def check_url_allowed(url: str, allowed_hosts: Collection[str]) -> str:
    """Return *url* if its scheme is http(s) and its host (or host:port) is allowed; raise otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HostNotAllowedError(f"malformed URL: {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise HostNotAllowedError(f"URL scheme must be http or https: {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise HostNotAllowedError(f"URL has no host: {url!r}")
    if parts.username or parts.password:
        raise HostNotAllowedError(f"URL must not carry credentials: host {host!r}")
    effective_port = port or (443 if parts.scheme == "https" else 80)
    if match_allowed(host, effective_port, allowed_hosts):
        return url
    raise HostNotAllowedError(f"host {_host_label(host)}:{effective_port} of {url!r} is not in ALLOWED_HOSTS")


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
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise UnsafePathError(f"file path must be relative: {raw!r}")
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if any(part in ("..", ".") for part in parts):
        raise UnsafePathError(f"file path must not contain '.' or '..': {raw!r}")
    if any(_UNSAFE_CHARS.search(part) for part in parts):
        raise UnsafePathError(f"file path holds control or reserved characters: {raw!r}")
    if any(part.startswith(".") for part in parts):
        raise UnsafePathError(f"file path must not name hidden files: {raw!r}")
    return PurePosixPath(*parts)


def join_inside(folder: Path, relative: PurePosixPath) -> Path:
    """Join *relative* under *folder* and prove the result does not leave it, symlinks included."""
    target = folder.joinpath(*relative.parts)
    base = folder.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"file path leaves the task folder: {str(relative)!r}")
    for parent in [target, *target.parents]:
        if parent == folder:
            break
        if parent.is_symlink():
            raise UnsafePathError(f"refusing to write through a symlink: {str(relative)!r}")
    return target


def safe_filename(name: str, fallback: str = "download") -> str:
    """Reduce a name from a URL or header to one harmless path component."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("_", name).strip().lstrip(".")
    return name[:200] or fallback
