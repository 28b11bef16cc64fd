"""Settings: parsed once from the environment (and `.env`) into one frozen, typed object."""

from __future__ import annotations

import base64
import binascii
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values

from . import defaults
from .errors import ConfigError

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
    "RECONCILE_INTERVAL",
)
"""Every environment variable the settings read (tests and tools clear or pass exactly these)."""


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


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
    reconcile_interval: int = defaults.RECONCILE_INTERVAL
    webhook_retry_intervals: tuple[int, ...] = defaults.WEBHOOK_RETRY_INTERVALS
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = defaults.REDIS_SENTINEL_MASTER
    redis_sentinel_password: str | None = field(default=None, repr=False)

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


def _int(env: Mapping[str, str | None], name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _redis_url(env: Mapping[str, str | None]) -> str:
    url = _get(env, "REDIS_URL")
    if url:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("REDIS_URL", f"scheme must be redis://, rediss:// or unix://, got {redact_url(url)!r}")
        return url
    host = _get(env, "REDIS_HOST") or "localhost"
    port = _int(env, "REDIS_PORT", defaults.REDIS_PORT, minimum=1)
    db = _int(env, "REDIS_DB", 0)
    password = _get(env, "REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def _database_url(env: Mapping[str, str | None]) -> str | None:
    url = _get(env, "DATABASE_URL")
    if url:
        scheme = urlsplit(url).scheme
        if scheme not in ("mysql", "sqlite"):
            raise ConfigError("DATABASE_URL", f"scheme must be mysql:// or sqlite:///, got {scheme!r}")
        return url
    host = _get(env, "DB_HOST")
    if not host:
        return None
    port = _int(env, "DB_PORT", defaults.MYSQL_PORT, minimum=1)
    user = _get(env, "DB_USER")
    name = _get(env, "DB_NAME")
    if not user:
        raise ConfigError("DB_USER", "required when DB_HOST is set")
    if not name:
        raise ConfigError("DB_NAME", "required when DB_HOST is set")
    password = _get(env, "DB_PASSWORD")
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return f"mysql://{auth}@{host}:{port}/{quote(name, safe='')}"


def _allowed_hosts(env: Mapping[str, str | None]) -> frozenset[str]:
    raw = _get(env, "ALLOWED_HOSTS") or ""
    hosts = set()
    for item in raw.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if "/" in item or "@" in item or " " in item:
            raise ConfigError("ALLOWED_HOSTS", f"expected host, host:port or a *.pattern, got {item!r}")
        if item.strip("*.:") == "":
            raise ConfigError("ALLOWED_HOSTS", f"pattern {item!r} would allow every host")
        hosts.add(item)
    return frozenset(hosts)


def _webhook_url(env: Mapping[str, str | None]) -> str | None:
    url = _get(env, "WEBHOOK_URL")
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError("WEBHOOK_URL", f"must be an http:// or https:// URL, got {redact_url(url)!r}")
    return url


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
    return Path(_get(env, variable) or default).expanduser().absolute()


def _sentinels(env: Mapping[str, str | None], variable: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` of the Redis Sentinels (empty: no Sentinel, REDIS_URL is the server)."""
    raw = _get(env, variable)
    if raw is None:
        return ()
    found = []
    for item in raw.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(variable, f"expected host:port[,host:port...], got {item.strip()!r}")
        found.append((host.strip("[]"), int(port)))
    return tuple(found)


def _intervals(env: Mapping[str, str | None], variable: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """Comma-separated seconds between delivery attempts, e.g. `10,30,60`."""
    raw = _get(env, variable)
    if raw is None:
        return default
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(variable, f"expected comma-separated whole seconds, got {raw!r}") from None
    if not values or any(value < 0 for value in values):
        raise ConfigError(variable, f"expected comma-separated whole seconds, got {raw!r}")
    return values


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


def _name(env: Mapping[str, str | None], variable: str, default: str) -> str:
    value = _get(env, variable) or default
    if not value.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(variable, f"letters, digits, '-' and '_' only, got {value!r}")
    return value


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = ENV_FILE) -> Settings:
    """Build Settings from *environ* (default: os.environ) over the values in *env_file*."""
    env: dict[str, str | None] = {}
    if env_file is not None and env_file.is_file():
        env.update(dotenv_values(env_file))
    env.update(os.environ if environ is None else environ)
    return Settings(
        redis_url=_redis_url(env),
        database_url=_database_url(env),
        api_secret_key=_secret_key(env),
        content_token=_get(env, "CONTENT_TOKEN"),
        webhook_url=_webhook_url(env),
        allowed_hosts=_allowed_hosts(env),
        download_dir=_path(env, "DOWNLOAD_DIR", defaults.DOWNLOAD_DIR),
        failed_dir=_path(env, "FAILED_DIR", defaults.FAILED_DIR),
        log_dir=_path(env, "LOG_DIR", defaults.LOG_DIR),
        pid_dir=_path(env, "PID_DIR", defaults.PID_DIR),
        worker_count=_int(env, "WORKER_COUNT", defaults.WORKER_COUNT, minimum=1),
        queue_name=_name(env, "QUEUE_NAME", defaults.DOWNLOAD_QUEUE),
        max_attempts=_int(env, "MAX_ATTEMPTS", defaults.MAX_ATTEMPTS, minimum=1),
        retry_delay=_int(env, "RETRY_DELAY", defaults.RETRY_DELAY),
        job_timeout=_int(env, "JOB_TIMEOUT", defaults.JOB_TIMEOUT, minimum=1),
        result_ttl=_int(env, "RESULT_TTL", defaults.RESULT_TTL),
        failure_ttl=_int(env, "FAILURE_TTL", defaults.FAILURE_TTL),
        stop_timeout=_int(env, "STOP_TIMEOUT", defaults.STOP_TIMEOUT, minimum=1),
        fetch_concurrency=_int(env, "FETCH_CONCURRENCY", defaults.FETCH_CONCURRENCY, minimum=1),
        max_task_bytes=_int(env, "MAX_TASK_BYTES", defaults.MAX_TASK_BYTES),
        fetch_command=_command(env, "FETCH_COMMAND"),
        reconcile_interval=_int(env, "RECONCILE_INTERVAL", defaults.RECONCILE_INTERVAL, minimum=0),
        webhook_retry_intervals=_intervals(env, "WEBHOOK_RETRY_INTERVALS", defaults.WEBHOOK_RETRY_INTERVALS),
        redis_sentinels=_sentinels(env, "REDIS_SENTINELS"),
        redis_sentinel_master=_name(env, "REDIS_SENTINEL_MASTER", defaults.REDIS_SENTINEL_MASTER),
        redis_sentinel_password=_get(env, "REDIS_SENTINEL_PASSWORD"),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, parsed on first use and shared by every job it runs."""
    return load_settings()
