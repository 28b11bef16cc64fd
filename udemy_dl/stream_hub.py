"""One serve process's reader of the task status streams, shared by every open browser stream.

A single asyncio task reads all watched streams with XREAD BLOCK on one Redis connection, up to BATCH_KEYS keys
per call (several calls in turn when more are watched), and hands each entry to the queues of the clients
watching that task. A thousand open streams cost one blocking connection, not a thousand. A client's own short
reads (its backlog after a reconnect, the newest entry for its snapshot) go through `StreamReads`, a few
connections at most.

Ids only grow, so a client that gets an entry both from its backlog and from the hub drops the second copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

BATCH_KEYS = 256
"""Stream keys per XREAD call."""

BLOCK_MS = 1000
"""How long one XREAD waits for news when every watched key fits in one call."""

TURN_BLOCK_MS = 50
"""How long each of several XREAD calls in turn waits: an entry waits at most the other batches' turns."""

ENTRIES_PER_KEY = 100
"""Most entries one XREAD returns per key (a client far behind reads its backlog itself)."""

QUEUE_SIZE = 256
"""Entries waiting for one client; a client that falls this far behind is closed and reconnects from its last id."""

RETRY_SECONDS = 1.0
"""Pause after a Redis error before the reader tries again."""

READ_CONNECTIONS = 4
"""Most commands (so connections) the clients' own reads use at once in one process."""


Entry = tuple[str, Mapping[Any, Any]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair (`1700000000000-3` -> (1700000000000, 3))."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


@dataclass(eq=False)
class Watcher:
    """One client's view of one task's stream: entries arrive on `queue`; None means "close, reconnect"."""

    key: str
    queue: asyncio.Queue[Entry | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))


class StreamHub:
    """The process's single reader of the watched status streams (see the module docstring)."""

    def __init__(self, reader: AsyncRedis, batch_keys: int = BATCH_KEYS) -> None:
        self._reader = reader
        self._batch_keys = batch_keys
        self._cursors: dict[str, str] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reads = 0

    @property
    def watched(self) -> int:
        return len(self._cursors)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="status-stream-reader")

    def watch(self, key: str, after: str) -> Watcher:
        """Deliver entries of *key* newer than the hub's cursor for it (*after*, for a key not yet watched)."""
        watcher = Watcher(key)
        self._watchers.setdefault(key, set()).add(watcher)
        if key not in self._cursors:
            self._cursors[key] = after
            self._changed.set()
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        watchers = self._watchers.get(watcher.key)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._watchers[watcher.key]
            self._cursors.pop(watcher.key, None)

    def close_all(self) -> None:
        """Tell every client to close (the server is stopping): each reconnects, to this process or another."""
        for watchers in list(self._watchers.values()):
            for watcher in list(watchers):
                _end(watcher)
                self.unwatch(watcher)

    async def stop(self) -> None:
        self.close_all()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._reader.aclose()

    async def _run(self) -> None:
        while True:
            if not self._cursors:
                self._changed.clear()
                await self._changed.wait()
                continue
            keys = list(self._cursors)
            batches = [keys[start : start + self._batch_keys] for start in range(0, len(keys), self._batch_keys)]
            block = BLOCK_MS if len(batches) == 1 else TURN_BLOCK_MS
            for batch in batches:
                streams = {key: self._cursors[key] for key in batch if key in self._cursors}
                if not streams:
                    continue
                try:
                    answer = await self._reader.xread(streams, count=ENTRIES_PER_KEY, block=block)  # type: ignore[arg-type]
                    self.reads += 1
                    self._fan_out(answer or [])
                except RedisError as exc:
                    log.warning("status streams: reading failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(RETRY_SECONDS)
                    break
                except Exception:  # the reader must outlive anything: every open stream depends on it
                    log.exception("status streams: unexpected error; retrying")
                    await asyncio.sleep(RETRY_SECONDS)
                    break

    def _fan_out(self, answer: list[Any]) -> None:
        for raw_key, entries in answer:
            key = _text(raw_key)
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                if key not in self._cursors:
                    break  # nobody watches it any more
                self._cursors[key] = entry_id
                for watcher in list(self._watchers.get(key, ())):
                    try:
                        watcher.queue.put_nowait((entry_id, fields))
                    except asyncio.QueueFull:
                        log.info("status stream %s: a client fell %d entries behind; closing it", key, QUEUE_SIZE)
                        _end(watcher)
                        self.unwatch(watcher)


def _end(watcher: Watcher) -> None:
    """Make None the next thing the client reads, whatever is queued."""
    while not watcher.queue.empty():
        watcher.queue.get_nowait()
    watcher.queue.put_nowait(None)


class StreamReads:
    """A client's own short reads of one stream, at most READ_CONNECTIONS at once per process."""

    def __init__(self, client: AsyncRedis, limit: int = READ_CONNECTIONS) -> None:
        self._client = client
        self._limit = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[AsyncRedis]:
        async with self._limit:
            yield self._client

    async def latest(self, key: str) -> Entry | None:
        async with self._turn() as client:
            found = await client.xrevrange(key, count=1)
        return (_text(found[0][0]), found[0][1]) if found else None

    async def entry(self, key: str, entry_id: str) -> Entry | None:
        async with self._turn() as client:
            found = await client.xrange(key, min=entry_id, max=entry_id, count=1)
        return (_text(found[0][0]), found[0][1]) if found else None

    async def after(self, key: str, entry_id: str, count: int = 1000) -> list[Entry]:
        """Entries strictly newer than *entry_id*, oldest first."""
        async with self._turn() as client:
            found = await client.xrange(key, min=f"({entry_id}", max="+", count=count)
        return [(_text(raw_id), fields) for raw_id, fields in found]

    async def close(self) -> None:
        await self._client.aclose()
