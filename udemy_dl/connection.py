"""Redis connections and the RQ queues the service uses."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from .settings import Settings, redis_db_of

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py before 7: the version is passed on its own
    from redis.utils import get_lib_version

    _IDENTITY: dict[str, Any] = {"lib_version": get_lib_version()}  # type: ignore[no-untyped-call]
else:
    _IDENTITY = {"driver_info": DriverInfo()}
"""How each connection names its client library to the server (CLIENT SETINFO), read from the
installed package once per process: redis-py would read it again for every connection it opens,
and a work horse opens one for each job."""

CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    # Longer than a worker's blocking dequeue (WORKER_TTL - 15 s), so only a dead server trips it.
    "socket_timeout": 75,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "retry_on_timeout": True,
    **_IDENTITY,
}


def redis_connection(settings: Settings) -> Redis:
    """A Redis client for *settings*, with timeouts so a dead server is noticed, not waited on.

    With REDIS_SENTINELS set, the client asks the Sentinels for the current master of
    REDIS_SENTINEL_MASTER and follows a failover (password and database from REDIS_URL/REDIS_*).
    """
    if not settings.redis_sentinels:
        options = dict(CLIENT_OPTIONS)
        if settings.redis_url.startswith("unix:"):
            del options["socket_keepalive"]  # a TCP option: redis-py's socket connection refuses it
        return Redis.from_url(settings.redis_url, **options)
    sentinel_kwargs, master_kwargs = _sentinel_options(settings)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels), sentinel_kwargs=sentinel_kwargs, **master_kwargs
    )
    master: Redis = sentinel.master_for(settings.redis_sentinel_master, **CLIENT_OPTIONS)  # type: ignore[no-untyped-call]
    return master


def _sentinel_options(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Sentinels' own options, and those of the master's connections (password and db from REDIS_URL)."""
    parts = urlsplit(settings.redis_url)
    return (
        {"socket_connect_timeout": 5, "socket_timeout": 5, "password": settings.redis_sentinel_password},
        {
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "db": redis_db_of(settings.redis_url),
            "ssl": parts.scheme == "rediss",
        },
    )


def async_redis_connection(settings: Settings) -> AsyncRedis:
    """An asyncio Redis client for *settings* (the web front's status streams), Sentinel included, with the
    same timeouts as redis_connection. Callers bound how many commands they run at once: each running command
    holds one connection of its pool."""
    if not settings.redis_sentinels:
        options = dict(CLIENT_OPTIONS)
        if settings.redis_url.startswith("unix:"):
            del options["socket_keepalive"]
        return AsyncRedis.from_url(settings.redis_url, **options)
    sentinel_kwargs, master_kwargs = _sentinel_options(settings)
    sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels), sentinel_kwargs=sentinel_kwargs, **master_kwargs
    )
    master: AsyncRedis = sentinel.master_for(settings.redis_sentinel_master, **CLIENT_OPTIONS)
    return master
