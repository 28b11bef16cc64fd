"""Guards on what comes from the network: URLs must point to allowed hosts, paths stay in their folder."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .errors import HostNotAllowedError, UnsafePathError

_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"|?*\\]")


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
    default_port = 443 if parts.scheme == "https" else 80
    effective_port = port or default_port
    host_label = f"[{host}]" if ":" in host else host
    if host in allowed_hosts or f"{host_label}:{effective_port}" in allowed_hosts:
        return url
    raise HostNotAllowedError(f"host {host_label}:{effective_port} of {url!r} is not in ALLOWED_HOSTS")


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
