"""Settings: parsed once from the environment (and `.env`) into one frozen, typed object."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, quote, unquote

from dotenv import dotenv_values

from . import defaults
from .errors import ConfigError
from .safety import parse_allowed_entry

ENV_FILE = Path(".env")

VARIABLES = (
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_SENTINEL_PASSWORD",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "DB_NAME",
    "DATABASE_URL",
    "API_SECRET_KEY",
    "WEBHOOK_URL",
    "WEBHOOK_RETRY_INTERVALS",
    "CONTENT_TOKEN",
    "ALLOWED_HOSTS",
    "DOWNLOAD_DIR",
    "FAILED_DIR",
    "LOG_DIR",
    "PID_DIR",
    "WORKER_COUNT",
    "QUEUE_NAME",
    "MAX_ATTEMPTS",
    "RETRY_DELAY",
    "JOB_TIMEOUT",
    "RESULT_TTL",
    "FAILURE_TTL",
    "STOP_TIMEOUT",
    "FETCH_CONCURRENCY",
    "MAX_TASK_BYTES",
    "FETCH_COMMAND",
    "ORIGIN_CONCURRENCY",
    "FETCH_RATE_LIMIT",
    "RECONCILE_INTERVAL",
    "HORSE_MAX_JOBS",
    "DISK_WARN_BYTES",
    "DASHBOARD_USERNAME",
    "DASHBOARD_PASSWORD",
    "STATUS_TOKEN_SECRET",
    "CORS_ORIGINS",
)
"""Every environment variable the settings read (tests and tools clear or pass exactly these)."""


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_HOSTPORT_SHAPE = re.compile(r"(?:\[[0-9A-Za-z:.%_~-]*\]|[A-Za-z0-9._~%-]*)(?::[A-Za-z0-9]*)?")
"""What a host[:port] may look like for redact_url to trust its own split (validation is stricter)."""
_SECRET_QUERY_NAME = re.compile(r"pass|secret|token|auth|^key$|api_?key", re.IGNORECASE)


class _UrlParts(NamedTuple):
    scheme: str
    userinfo: str | None
    """Everything between `://` and the last `@` of the authority: None when there is no `@`."""
    hostport: str
    tail: str
    """Path, query and fragment: empty, or starting with `/`, `?` or `#`."""


def _split_url(url: str) -> _UrlParts | None:
    """Split `scheme://userinfo@host:port/tail`, or None when *url* does not start with `scheme://`.

    The userinfo runs to the LAST `@` of the authority, whatever `/`, `?` or `#` it holds (a password
    with an unencoded `/` must not turn into the host, the port or the path, as urlsplit makes it). An
    authority that starts with `/` (sqlite:///path, unix:///socket) is empty.
    """
    match = _SCHEME.match(url)
    if match is None:
        return None
    rest = url[match.end() :]
    userinfo: str | None = None
    if "@" in rest and not rest.startswith(("/", "?", "#")):
        userinfo, _, rest = rest.rpartition("@")
    end = next((index for index, char in enumerate(rest) if char in "/?#"), len(rest))
    return _UrlParts(match.group(1), userinfo, rest[:end], rest[end:])


def _redact_query(tail: str) -> str:
    """The tail with the value of every query parameter that names a password, token or key as `***`."""
    path, question, rest = tail.partition("?")
    if not question:
        return tail
    query, hash_mark, fragment = rest.partition("#")
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        items.append(f"{name}=***" if equals and _SECRET_QUERY_NAME.search(unquote(name)) else item)
    return f"{path}?{'&'.join(items)}{hash_mark}{fragment}"


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by `***`, for logs and messages.

    The password is everything after the first `:` of the userinfo (see _split_url), so one holding
    `/`, `?`, `#`, `@` or `:` is hidden whole. A URL that cannot be split with confidence (no
    `scheme://` but an `@`, a space or control character, a host part that is no host, a user name
    holding `/`, `?` or `#`: an `@` in a query string's password) shows its scheme and nothing else.
    """
    parts = _split_url(url)
    if parts is None:
        return "***" if "@" in url or not url.isprintable() else url
    user = (parts.userinfo or "").partition(":")[0]
    confident = (
        not any(char.isspace() or not char.isprintable() or char == "\\" for char in url)
        and _HOSTPORT_SHAPE.fullmatch(parts.hostport) is not None
        and not any(char in user for char in "/?#")  # `h/0?password=s3c@x`: no user name looks like that
    )
    if not confident:
        return f"{parts.scheme}://***"
    shown = parts.hostport + _redact_query(parts.tail)
    if parts.userinfo is None:
        return f"{parts.scheme}://{shown}"
    user, colon, _ = parts.userinfo.partition(":")
    return f"{parts.scheme}://{user}{':***' if colon else ''}@{shown}"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment. Secret fields stay out of `repr`."""

    redis_url: str = field(default=f"redis://localhost:{defaults.REDIS_PORT}/0", repr=False)
    database_url: str | None = field(default=None, repr=False)
    api_secret_key: str | None = field(default=None, repr=False)
    content_token: str | None = field(default=None, repr=False)
    webhook_url: str | None = field(default=None, repr=False)
    allowed_hosts: frozenset[str] = frozenset()
    download_dir: Path = Path(defaults.DOWNLOAD_DIR)
    failed_dir: Path = Path(defaults.FAILED_DIR)
    log_dir: Path = Path(defaults.LOG_DIR)
    pid_dir: Path = Path(defaults.PID_DIR)
    worker_count: int = defaults.WORKER_COUNT
    queue_name: str = defaults.DOWNLOAD_QUEUE
    webhook_queue_name: str = defaults.WEBHOOK_QUEUE
    max_attempts: int = defaults.MAX_ATTEMPTS
    retry_delay: int = defaults.RETRY_DELAY
    job_timeout: int = defaults.JOB_TIMEOUT
    result_ttl: int = defaults.RESULT_TTL
    failure_ttl: int = defaults.FAILURE_TTL
    stop_timeout: int = defaults.STOP_TIMEOUT
    fetch_concurrency: int = defaults.FETCH_CONCURRENCY
    max_task_bytes: int = defaults.MAX_TASK_BYTES
    fetch_command: tuple[str, ...] | None = None
    origin_concurrency: int = 0
    """Tasks that may download from one origin host at once, across every worker and host (0: no cap)."""
    fetch_rate_limit: int = 0
    """Bytes per second all HTTP downloads of one host may take together (0: no limit)."""
    reconcile_interval: int = defaults.RECONCILE_INTERVAL
    horse_max_jobs: int = defaults.HORSE_MAX_JOBS
    disk_warn_bytes: int = 0
    """Free bytes on the download disk below which health, stats and the alert warn; 0: DISK_WARN_SHARE of it."""
    webhook_retry_intervals: tuple[int, ...] = defaults.WEBHOOK_RETRY_INTERVALS
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = defaults.REDIS_SENTINEL_MASTER
    redis_sentinel_password: str | None = field(default=None, repr=False)
    dashboard_username: str | None = None
    dashboard_password: str | None = field(default=None, repr=False)
    status_token_secret: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()

    def require_status_tokens(self) -> str:
        """STATUS_TOKEN_SECRET, or stop with a message saying how to make one."""
        if not self.status_token_secret:
            raise ConfigError("STATUS_TOKEN_SECRET", "not set (generate one with: udemy-dl gen-secret --status)")
        return self.status_token_secret

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @property
    def database_url_redacted(self) -> str:
        return redact_url(self.database_url) if self.database_url else "(not set)"

    @property
    def high_queue_name(self) -> str:
        return self.queue_name + defaults.HIGH_QUEUE_SUFFIX

    def queue_for(self, priority: str) -> str:
        return self.high_queue_name if priority == "high" else self.queue_name

    @property
    def staging_dir(self) -> Path:
        return self.download_dir / defaults.STAGING_DIRNAME

    def require_database(self) -> str:
        """Return DATABASE_URL, or stop with a message naming the variables to set."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "not set (set DATABASE_URL, or DB_HOST, DB_USER and DB_NAME)")
        return self.database_url

    def require_worker_ready(self) -> None:
        """Check what a download worker needs and start-up must refuse without."""
        self.require_database()
        if not self.allowed_hosts:
            raise ConfigError("ALLOWED_HOSTS", "required: the hosts course and file URLs may point to")
        if self.webhook_url and not self.api_secret_key:
            raise ConfigError("API_SECRET_KEY", "required when WEBHOOK_URL is set")


def _get(env: Mapping[str, str | None], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


MAX_INT = 2**31 - 1
"""Largest count or number of seconds a setting takes (what a shell's arithmetic and Redis TTLs hold)."""
MAX_WORKERS = 1000
"""Most worker processes (WORKER_COUNT) or parallel fetches (FETCH_CONCURRENCY): more is a typo."""

_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


def _shown(raw: str) -> str:
    """*raw* for a message: quoted with control characters escaped, and cut short."""
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def _in_range(text: str, minimum: int, maximum: int) -> bool:
    """True when *text* is ASCII digits (an optional `-`) for a number in [minimum, maximum]."""
    return _WHOLE_NUMBER.fullmatch(text) is not None and len(text) <= 30 and minimum <= int(text) <= maximum


def _whole_number(variable: str, raw: str, minimum: int, maximum: int, what: str = "") -> int:
    """*raw* as a whole number in [minimum, maximum]: ASCII digits only (no `1_000`, `+5`, `٣` or `1.5`)."""
    if not _WHOLE_NUMBER.fullmatch(raw):
        raise ConfigError(variable, f"{what}expected a whole number, got {_shown(raw)}")
    if not _in_range(raw, minimum, maximum):
        raise ConfigError(variable, f"{what}must be from {minimum} to {maximum}, got {_shown(raw)}")
    return int(raw)


def _int(env: Mapping[str, str | None], name: str, default: int, minimum: int = 0, maximum: int = MAX_INT) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    return _whole_number(name, raw, minimum, maximum)


_RATE = re.compile(r"([0-9]{1,15})([KMG]?)")
_RATE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
MAX_RATE = 1000**4
"""Largest FETCH_RATE_LIMIT (1 TB/s): more is a typo."""


def _rate(env: Mapping[str, str | None], name: str) -> int:
    """Bytes per second: ASCII digits with an optional K, M or G (powers of 1000, either case); 0 is off."""
    raw = _get(env, name)
    if raw is None:
        return 0
    match = _RATE.fullmatch(raw.upper())
    if match is None:
        raise ConfigError(name, f"expected bytes per second such as 2000000, 500K or 5M, got {_shown(raw)}")
    value = int(match.group(1)) * _RATE_UNITS[match.group(2)]
    if value > MAX_RATE:
        raise ConfigError(name, f"must be at most {MAX_RATE} (1T) bytes per second, got {_shown(raw)}")
    return value


_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _host(variable: str, text: str) -> str:
    """A host name or IP address; an IPv6 address comes back in brackets, ready for a URL."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in inner and _is_ipv6(inner):
        return f"[{inner}]"
    if inner != text or len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise ConfigError(
            variable, f"expected a host name or IP address (an IPv6 address in brackets), got {_shown(text)}"
        )
    return text


def _hostport(variable: str, hostport: str) -> tuple[str, int | None]:
    """The host (possibly empty: the caller decides) and port of a URL's `host:port`."""
    if hostport.startswith("["):
        end = hostport.find("]") + 1
        host, rest = (hostport[:end], hostport[end:]) if end else (hostport, "")
    else:
        host, colon, port = hostport.partition(":")
        rest = colon + port
    if host:
        host = _host(variable, host)
    if not rest:
        return host, None
    if not rest.startswith(":"):
        raise ConfigError(variable, f"expected host:port after the '@', got {_shown(hostport)}")
    return host, _whole_number(variable, rest[1:], 1, 65535, "the port: ")


def _parse_url(variable: str, url: str, schemes: tuple[str, ...], any_case: bool = False) -> _UrlParts:
    """Split *url* (see _split_url), refusing what could be read two ways. Never echoes a password."""
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ConfigError(variable, "holds a space or a control character (percent-encode it, e.g. a space as %20)")
    parts = _split_url(url)
    scheme = parts.scheme.lower() if parts is not None and any_case else parts.scheme if parts else None
    if parts is None or scheme not in schemes:
        expected = ", ".join(f"{name}://" for name in schemes)
        raise ConfigError(variable, f"must start with one of {expected} (in lower case), got {redact_url(url)!r}")
    if parts.userinfo is not None and any(char in parts.userinfo for char in "/?#[]"):
        # urlsplit (and so redis-py and the store) would read part of the password as the host, the
        # port or the path: refuse rather than guess, and say how to write it.
        raise ConfigError(
            variable,
            "the user name or password holds an unencoded '/', '?', '#', '[' or ']' (or an '@' follows the "
            "host): percent-encode them (/ as %2F, ? as %3F, # as %23, [ as %5B, ] as %5D, @ as %40)",
        )
    return parts


def _no_fragment(variable: str, tail: str) -> str:
    if "#" in tail:
        raise ConfigError(variable, "holds a '#' after the host: percent-encode it as %23 (a #fragment means nothing)")
    return tail


_REDIS_OPTIONS = {
    "db": "database",
    "socket_timeout": "seconds",
    "socket_connect_timeout": "seconds",
    "timeout": "seconds",
    "retry_on_timeout": "flag",
    "health_check_interval": "count",
    "max_connections": "positive",
    "client_name": "text",
    "username": "text",
    "password": "text",
}
"""`?name=value` options redis-py takes from a URL for every scheme, and what their values are."""
_REDIS_TCP_OPTIONS = {"socket_keepalive": "flag"}
_REDIS_TLS_OPTIONS = {
    "ssl_cert_reqs": "cert_reqs",
    "ssl_check_hostname": "flag",
    "ssl_ca_certs": "text",
    "ssl_ca_path": "text",
    "ssl_certfile": "text",
    "ssl_keyfile": "text",
    "ssl_password": "text",
    "ssl_ciphers": "text",
}
_FLAGS = frozenset({"0", "1", "true", "false", "yes", "no"})
"""Values redis-py reads as a boolean the way they read (it takes `off` as true)."""
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")


def _redis_options(variable: str, scheme: str, query: str) -> dict[str, str]:
    """The URL's `?name=value&...` options, each known to redis-py for *scheme* and well-formed."""
    known = {**_REDIS_OPTIONS, **(_REDIS_TLS_OPTIONS if scheme == "rediss" else {})}
    known.update(_REDIS_TCP_OPTIONS if scheme != "unix" else {})
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ConfigError(variable, "the ?options must be name=value pairs joined by '&'") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        kind = known.get(name)
        if kind is None:
            raise ConfigError(
                variable, f"unknown option {_shown(name)} for {scheme}:// (known: {', '.join(sorted(known))})"
            )
        if name in options:
            raise ConfigError(variable, f"option ?{name}= is given twice")
        shown = "(hidden)" if _SECRET_QUERY_NAME.search(name) else _shown(value)
        valid = {
            "database": _in_range(value, 0, MAX_INT),
            "seconds": _SECONDS.fullmatch(value) is not None and float(value) > 0,
            "count": _in_range(value, 0, MAX_INT),
            "positive": _in_range(value, 1, MAX_INT),
            "flag": value.lower() in _FLAGS,
            "cert_reqs": value in ("none", "optional", "required"),
            "text": value != "",
        }[kind]
        if not valid:
            expected = {
                "database": "a database number of 0 or more",
                "seconds": "seconds above 0",
                "count": "a whole number of 0 or more",
                "positive": "a whole number of 1 or more",
                "flag": "one of " + ", ".join(sorted(_FLAGS)),
                "cert_reqs": "none, optional or required",
                "text": "a value",
            }[kind]
            raise ConfigError(variable, f"option ?{name}= expects {expected}, got {shown}")
        options[name] = value
    return options


def _check_redis_url(url: str, sentinels: bool) -> None:
    """Refuse a REDIS_URL that redis-py would read other than as written (`/ten` as db 0, say) or not at all."""
    variable = "REDIS_URL"
    parts = _parse_url(variable, url, ("redis", "rediss", "unix"))
    path, _, query = _no_fragment(variable, parts.tail).partition("?")
    options = _redis_options(variable, parts.scheme, query)
    host, port = _hostport(variable, parts.hostport)
    if parts.scheme == "unix":
        if host or port is not None:
            raise ConfigError(variable, "unix:// takes no host: unix:///path/to/redis.sock[?db=N]")
        if path.strip("/") == "":
            raise ConfigError(variable, "unix:// needs the socket's path: unix:///path/to/redis.sock[?db=N]")
        if sentinels:
            raise ConfigError(
                variable, "a unix:// socket cannot be used with REDIS_SENTINELS (use redis:// or rediss://)"
            )
        return
    if not host:
        raise ConfigError(variable, f"needs a host: {parts.scheme}://[[user]:password@]host[:port][/db]")
    number = unquote(path[1:])
    if number:
        _whole_number(variable, number, 0, MAX_INT, "the database number after the host: ")
        if "db" in options:
            raise ConfigError(variable, "the database is given twice (after the host and as ?db=)")


def redis_db_of(url: str) -> int:
    """The database number a REDIS_URL (checked at load) names: after the host, or `?db=`; else 0."""
    parts = _split_url(url)
    if parts is None:
        return 0
    path, _, query = parts.tail.partition("?")
    chosen = dict(parse_qsl(query)).get("db") or (unquote(path[1:]) if parts.scheme != "unix" else "")
    return int(chosen) if chosen.isdigit() else 0


def _redis_url(env: Mapping[str, str | None], sentinels: bool = False) -> str:
    # REDIS_HOST/PORT/DB are checked even when REDIS_URL overrides them: a bad value is a mistake either way.
    host = _host("REDIS_HOST", _get(env, "REDIS_HOST") or "localhost")
    port = _int(env, "REDIS_PORT", defaults.REDIS_PORT, minimum=1, maximum=65535)
    db = _int(env, "REDIS_DB", 0)
    url = _get(env, "REDIS_URL")
    if url is None:
        password = _get(env, "REDIS_PASSWORD")
        auth = f":{quote(password, safe='')}@" if password else ""
        url = f"redis://{auth}{host}:{port}/{db}"
    _check_redis_url(url, sentinels)
    return url


def _db_name(variable: str, name: str) -> str:
    if not name:
        raise ConfigError(variable, "needs a database name")
    if len(name) > 64 or "/" in name or not name.isprintable() or name.endswith(" "):
        raise ConfigError(
            variable, f"the database name must be at most 64 printable characters, no '/', got {_shown(name)}"
        )
    return name


def _check_database_url(url: str) -> None:
    """Refuse a DATABASE_URL the store would read other than as written, or not at all."""
    variable = "DATABASE_URL"
    parts = _parse_url(variable, url, ("mysql", "sqlite"))
    path, question, _ = _no_fragment(variable, parts.tail).partition("?")
    if question:
        raise ConfigError(variable, "takes no ?options (percent-encode a '?' in a name or path as %3F)")
    if parts.scheme == "sqlite":
        file = unquote(path)[1:]
        if parts.userinfo is not None or parts.hostport or not file or file.endswith("/"):
            raise ConfigError(
                variable, "expected sqlite:/// then a file path: sqlite:///./udemy_dl.sqlite3 or sqlite:////abs/path.db"
            )
        return
    usage = "mysql://user[:password]@host[:port]/database"
    if parts.userinfo is None or not parts.userinfo.partition(":")[0]:
        raise ConfigError(variable, f"needs a user: {usage}")
    host, _ = _hostport(variable, parts.hostport)
    if not host:
        raise ConfigError(variable, f"needs a host: {usage}")
    if not path[1:]:
        raise ConfigError(variable, f"needs a database name after the host: {usage}")
    if "/" in path[1:]:
        raise ConfigError(variable, f"the database name after the host holds a '/' (percent-encode it as %2F): {usage}")
    _db_name(variable, unquote(path[1:]))


def _database_url(env: Mapping[str, str | None]) -> str | None:
    # DB_* are checked even when DATABASE_URL overrides them: a bad value is a mistake either way.
    raw_host = _get(env, "DB_HOST")
    host = _host("DB_HOST", raw_host) if raw_host else None
    port = _int(env, "DB_PORT", defaults.MYSQL_PORT, minimum=1, maximum=65535)
    user = _get(env, "DB_USER")
    name = _get(env, "DB_NAME")
    if user is not None and not user.isprintable():
        raise ConfigError("DB_USER", f"holds a control character, got {_shown(user)}")
    if name is not None:
        _db_name("DB_NAME", name)
    url = _get(env, "DATABASE_URL")
    if url:
        _check_database_url(url)
        return url
    if not host:
        return None
    if not user:
        raise ConfigError("DB_USER", "required when DB_HOST is set")
    if not name:
        raise ConfigError("DB_NAME", "required when DB_HOST is set")
    password = _get(env, "DB_PASSWORD")
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    url = f"mysql://{auth}@{host}:{port}/{quote(name, safe='')}"
    _check_database_url(url)
    return url


def _allowed_hosts(env: Mapping[str, str | None]) -> frozenset[str]:
    """Comma-separated entries, each checked by rule (safety.parse_allowed_entry) and kept in canonical form."""
    raw = _get(env, "ALLOWED_HOSTS") or ""
    hosts = set()
    for item in raw.split(","):
        if not item.strip():
            continue
        try:
            entry = parse_allowed_entry(item.strip())
        except ValueError as exc:
            raise ConfigError("ALLOWED_HOSTS", str(exc)) from None
        hosts.add(str(entry))
    return frozenset(hosts)


def _webhook_url(env: Mapping[str, str | None]) -> str | None:
    url = _get(env, "WEBHOOK_URL")
    if url is None:
        return None
    parts = _parse_url("WEBHOOK_URL", url, ("http", "https"), any_case=True)
    host, _ = _hostport("WEBHOOK_URL", parts.hostport)
    if not host:
        raise ConfigError("WEBHOOK_URL", f"needs a host: http(s)://host[:port]/path, got {redact_url(url)!r}")
    return url


def _token(env: Mapping[str, str | None], variable: str) -> str | None:
    """A secret sent in an HTTP header: printable ASCII (a newline would forge a header). Never echoed."""
    value = _get(env, variable)
    if value is not None and not (value.isascii() and value.isprintable()):
        raise ConfigError(variable, "must be printable ASCII (it is sent in an HTTP header)")
    return value


def _secret_key(env: Mapping[str, str | None]) -> str | None:
    key = _get(env, "API_SECRET_KEY")
    if key is None:
        return None
    if not key.startswith("whsec_"):
        raise ConfigError("API_SECRET_KEY", "must start with 'whsec_' (generate one with: udemy-dl gen-secret)")
    try:
        decoded = base64.b64decode(key[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("API_SECRET_KEY", "the part after 'whsec_' is not valid base64") from None
    if len(decoded) < 24:
        raise ConfigError("API_SECRET_KEY", f"too short: {len(decoded)} bytes, need at least 24")
    return key


def _path(env: Mapping[str, str | None], variable: str, default: str) -> Path:
    """A folder setting, made absolute so logs and the database name the real place."""
    raw = _get(env, variable) or default
    if not raw.isprintable():
        raise ConfigError(variable, f"holds a control character, got {_shown(raw)}")
    path = Path(raw).expanduser().absolute()
    try:
        not_a_folder = path.exists() and not path.is_dir()
    except OSError:  # not ours to look at (yet): whoever uses it reports why
        not_a_folder = False
    if not_a_folder:
        raise ConfigError(variable, f"{str(path)!r} exists and is not a folder")
    return path


def _sentinels(env: Mapping[str, str | None], variable: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` of the Redis Sentinels (empty: no Sentinel, REDIS_URL is the server)."""
    raw = _get(env, variable)
    if raw is None:
        return ()
    found = []
    for item in raw.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            raise ConfigError(variable, f"expected host:port[,host:port...], got {_shown(item.strip())}")
        host = _host(variable, host)
        found.append((host.strip("[]"), _whole_number(variable, port, 1, 65535, "the port: ")))
    return tuple(found)


def _intervals(env: Mapping[str, str | None], variable: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """Comma-separated seconds between delivery attempts, e.g. `10,30,60`."""
    raw = _get(env, variable)
    if raw is None:
        return default
    parts = [part.strip() for part in raw.split(",")]
    if not all(_in_range(part, 0, MAX_INT) for part in parts):
        raise ConfigError(variable, f"expected comma-separated whole seconds, got {_shown(raw)}")
    return tuple(int(part) for part in parts)


def _command(env: Mapping[str, str | None], variable: str) -> tuple[str, ...] | None:
    """An argument list (shell-style quoting, never run through a shell) with {url} and {dest}."""
    raw = _get(env, variable)
    if raw is None:
        return None
    try:
        argv = tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(variable, f"cannot split into arguments: {exc}") from None
    if not argv:
        raise ConfigError(variable, "empty command")
    joined = " ".join(argv)
    if "{url}" not in joined or "{dest}" not in joined:
        raise ConfigError(variable, f"must contain the placeholders {{url}} and {{dest}}, got {raw!r}")
    return argv


def _dashboard_login(env: Mapping[str, str | None]) -> tuple[str | None, str | None]:
    """DASHBOARD_USERNAME and DASHBOARD_PASSWORD: both or neither (HTTP basic auth of `udemy-dl dashboard`).

    The name holds no ':' (basic auth splits on the first one); neither holds a control character, which
    no browser's login box can type. The password is never echoed.
    """
    username = _get(env, "DASHBOARD_USERNAME")
    password = _get(env, "DASHBOARD_PASSWORD")
    if username is not None and (":" in username or not username.isprintable()):
        raise ConfigError("DASHBOARD_USERNAME", f"no ':' and no control character, got {_shown(username)}")
    if password is not None and not password.isprintable():
        raise ConfigError("DASHBOARD_PASSWORD", "holds a control character")
    if username is not None and password is None:
        raise ConfigError("DASHBOARD_PASSWORD", "required when DASHBOARD_USERNAME is set")
    if password is not None and username is None:
        raise ConfigError("DASHBOARD_USERNAME", "required when DASHBOARD_PASSWORD is set")
    return username, password


MIN_STATUS_SECRET = 32
"""Fewest characters of STATUS_TOKEN_SECRET (`udemy-dl gen-secret --status` makes 43)."""


def _status_secret(env: Mapping[str, str | None]) -> str | None:
    """STATUS_TOKEN_SECRET: printable ASCII, long enough, and not API_SECRET_KEY (a token sits in a browser).
    Never echoed."""
    value = _get(env, "STATUS_TOKEN_SECRET")
    if value is None:
        return None
    if not (value.isascii() and value.isprintable()):
        raise ConfigError("STATUS_TOKEN_SECRET", "must be printable ASCII")
    if len(value) < MIN_STATUS_SECRET:
        raise ConfigError(
            "STATUS_TOKEN_SECRET",
            f"too short: {len(value)} characters, need at least {MIN_STATUS_SECRET} (udemy-dl gen-secret --status)",
        )
    if value == _get(env, "API_SECRET_KEY"):
        raise ConfigError("STATUS_TOKEN_SECRET", "must not be API_SECRET_KEY: give status tokens their own secret")
    return value


_ORIGIN = re.compile(r"(https?)://([^/?#@\\\s]+)")


def _cors_origins(env: Mapping[str, str | None]) -> tuple[str, ...]:
    """CORS_ORIGINS: comma-separated origins (`https://shop.example`, `http://localhost:3000`) whose pages may
    open the status stream directly. An origin is a scheme, a host and an optional port: no path, no `*`."""
    raw = _get(env, "CORS_ORIGINS")
    if raw is None:
        return ()
    origins: list[str] = []
    for item in raw.split(","):
        text = item.strip()
        if not text:
            continue
        match = _ORIGIN.fullmatch(text)
        if match is None:
            raise ConfigError(
                "CORS_ORIGINS",
                f"expected origins like https://shop.example[:port], comma-separated; got {_shown(text)}",
            )
        host, _ = _hostport("CORS_ORIGINS", match.group(2))
        if not host:
            raise ConfigError("CORS_ORIGINS", f"an origin needs a host, got {_shown(text)}")
        origin = f"{match.group(1)}://{match.group(2).lower()}"
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def _name(env: Mapping[str, str | None], variable: str, default: str) -> str:
    value = _get(env, variable) or default
    if not (value.isascii() and len(value) <= 200 and value.replace("-", "").replace("_", "").isalnum()):
        raise ConfigError(variable, f"ASCII letters, digits, '-' and '_' only (at most 200), got {_shown(value)}")
    return value


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = ENV_FILE) -> Settings:
    """Build Settings from *environ* (default: os.environ) over the values in *env_file*."""
    env: dict[str, str | None] = {}
    if env_file is not None and env_file.is_file():
        env.update(dotenv_values(env_file))
    env.update(os.environ if environ is None else environ)
    dashboard_username, dashboard_password = _dashboard_login(env)
    return Settings(
        redis_url=_redis_url(env, sentinels=_get(env, "REDIS_SENTINELS") is not None),
        database_url=_database_url(env),
        api_secret_key=_secret_key(env),
        content_token=_token(env, "CONTENT_TOKEN"),
        webhook_url=_webhook_url(env),
        allowed_hosts=_allowed_hosts(env),
        download_dir=_path(env, "DOWNLOAD_DIR", defaults.DOWNLOAD_DIR),
        failed_dir=_path(env, "FAILED_DIR", defaults.FAILED_DIR),
        log_dir=_path(env, "LOG_DIR", defaults.LOG_DIR),
        pid_dir=_path(env, "PID_DIR", defaults.PID_DIR),
        worker_count=_int(env, "WORKER_COUNT", defaults.WORKER_COUNT, minimum=1, maximum=MAX_WORKERS),
        queue_name=_name(env, "QUEUE_NAME", defaults.DOWNLOAD_QUEUE),
        max_attempts=_int(env, "MAX_ATTEMPTS", defaults.MAX_ATTEMPTS, minimum=1),
        retry_delay=_int(env, "RETRY_DELAY", defaults.RETRY_DELAY),
        job_timeout=_int(env, "JOB_TIMEOUT", defaults.JOB_TIMEOUT, minimum=1),
        result_ttl=_int(env, "RESULT_TTL", defaults.RESULT_TTL),
        failure_ttl=_int(env, "FAILURE_TTL", defaults.FAILURE_TTL),
        stop_timeout=_int(env, "STOP_TIMEOUT", defaults.STOP_TIMEOUT, minimum=1),
        fetch_concurrency=_int(env, "FETCH_CONCURRENCY", defaults.FETCH_CONCURRENCY, minimum=1, maximum=MAX_WORKERS),
        max_task_bytes=_int(env, "MAX_TASK_BYTES", defaults.MAX_TASK_BYTES, maximum=2**63 - 1),
        fetch_command=_command(env, "FETCH_COMMAND"),
        origin_concurrency=_int(env, "ORIGIN_CONCURRENCY", 0),
        fetch_rate_limit=_rate(env, "FETCH_RATE_LIMIT"),
        reconcile_interval=_int(env, "RECONCILE_INTERVAL", defaults.RECONCILE_INTERVAL, minimum=0),
        horse_max_jobs=_int(env, "HORSE_MAX_JOBS", defaults.HORSE_MAX_JOBS, minimum=1),
        disk_warn_bytes=_int(env, "DISK_WARN_BYTES", 0, maximum=2**63 - 1),
        webhook_retry_intervals=_intervals(env, "WEBHOOK_RETRY_INTERVALS", defaults.WEBHOOK_RETRY_INTERVALS),
        redis_sentinels=_sentinels(env, "REDIS_SENTINELS"),
        redis_sentinel_master=_name(env, "REDIS_SENTINEL_MASTER", defaults.REDIS_SENTINEL_MASTER),
        redis_sentinel_password=_get(env, "REDIS_SENTINEL_PASSWORD"),
        dashboard_username=dashboard_username,
        dashboard_password=dashboard_password,
        status_token_secret=_status_secret(env),
        cors_origins=_cors_origins(env),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, parsed on first use and shared by every job it runs."""
    return load_settings()
