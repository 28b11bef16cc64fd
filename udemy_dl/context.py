"""What one worker process shares between the jobs its work horses run: settings, the status
store's connection, Redis and the HTTP session. A worker prepares it before forking a horse, so
each horse inherits it instead of connecting again."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from . import defaults
from .connection import redis_connection
from .fetch import Fetcher
from .fetch_command import CommandFetcher
from .limits import ByteRate
from .settings import Settings, get_settings
from .store import TaskStore, open_store


@dataclass
class Context:
    """What one process shares between the jobs it runs: settings, store, Redis, HTTP session."""

    settings: Settings
    store: TaskStore
    redis: Redis
    fetcher: Fetcher | CommandFetcher


_context: Context | None = None


def get_context(redis: Redis | None = None) -> Context:
    """The process's context, built on first use. *redis*: the client it uses, if this call builds
    it (a worker passes its own, so each work horse keeps to one Redis connection)."""
    global _context
    if _context is None:
        settings = get_settings()
        connection = redis if redis is not None else redis_connection(settings)
        _context = Context(
            settings=settings,
            store=open_store(settings.require_database(), retry_for=defaults.STORE_RETRY_SECONDS),
            redis=connection,
            fetcher=_fetcher(settings, connection),
        )
    return _context


def _fetcher(settings: Settings, connection: Redis) -> Fetcher | CommandFetcher:
    if settings.fetch_command:
        return CommandFetcher(settings.fetch_command, settings.allowed_hosts, timeout=settings.job_timeout)
    return Fetcher(
        settings.allowed_hosts,
        token=settings.content_token,
        concurrency=settings.fetch_concurrency,
        max_task_bytes=settings.max_task_bytes,
        pacer=ByteRate(connection, settings.fetch_rate_limit) if settings.fetch_rate_limit else None,
    )


def reset_context() -> None:
    """Forget the process's settings and connections (tests change the environment between jobs)."""
    global _context
    if _context is not None:
        _context.store.close()
    _context = None
    get_settings.cache_clear()
