"""Redis connections and the RQ queues the service uses."""

from __future__ import annotations

from redis import Redis
from rq import Queue

from .settings import Settings


def redis_connection(settings: Settings) -> Redis:
    """A Redis client for *settings*, with timeouts so a dead server is noticed, not waited on."""
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def download_queue(settings: Settings, connection: Redis, priority: str = "normal") -> Queue:
    return Queue(settings.queue_for(priority), connection=connection)


def download_queues(settings: Settings, connection: Redis) -> list[Queue]:
    """The VIP queue, then the normal one."""
    return [download_queue(settings, connection, "high"), download_queue(settings, connection)]


def webhook_queue(settings: Settings, connection: Redis) -> Queue:
    return Queue(settings.webhook_queue_name, connection=connection)


def worker_queues(settings: Settings, connection: Redis) -> list[Queue]:
    """Queues a worker listens to, in order: webhook deliveries are short, so they go first; then
    VIP downloads, then normal ones (DownloadWorker bounds the VIP run so normal ones still move)."""
    return [webhook_queue(settings, connection), *download_queues(settings, connection)]
