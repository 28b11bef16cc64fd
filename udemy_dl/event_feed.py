"""A task's live status as Server-Sent Events (docs/STATUS.md): what `GET /tasks/<id>/events` sends.

A stream starts with a snapshot of the task (or, on a reconnect with Last-Event-ID, the entries after that id),
then passes on each entry the workers append to the task's Redis Stream, with a keep-alive comment while
quiet, and ends after the final entry (completed or failed). The watch is opened before anything is read: an
entry added meanwhile arrives twice at worst, and is dropped once by its id, never not at all.

All of one process's streams share the StreamHub's few Redis connections; the task's row (the record) is read
through a function the web front gives, in its own worker threads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from . import status_stream
from .intake import HttpError
from .store import TaskRow, utcnow
from .stream_hub import Entry, StreamHub, StreamReads, Watcher, id_key

KEEPALIVE_SECONDS = 15.0
"""Seconds between `: keep-alive` comments on an idle event stream (proxies drop silent connections)."""

ROW_CHECK_EVERY = 4
"""An event stream quiet for this many keep-alive intervals (a minute) reads its task's row once: a task settled
while Redis refused its final entry still ends the stream."""

SETTLED_GRACE = timedelta(seconds=30)
"""How long after a task settled its final entry may still be on its way (the row is written first)."""

KEEPALIVE_COMMENT = b": keep-alive\n\n"

RowLookup = Callable[[int], Awaitable[TaskRow | None]]


def sse_event(entry_id: str | None, data: Mapping[str, Any]) -> bytes:
    head = f"id: {entry_id}\n" if entry_id is not None else ""
    return f"{head}event: status\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class StreamPlan:
    """How an event stream starts: a snapshot (or none, on a resume), the entries after it, and the watch."""

    watcher: Watcher
    after: str
    snapshot: dict[str, Any] | None
    backlog: list[Entry]


class EventFeed:
    """The event streams of one serve process."""

    def __init__(self, hub: StreamHub, reads: StreamReads, row: RowLookup, keepalive: float) -> None:
        self.hub = hub
        self.reads = reads
        self._row = row
        self.keepalive = keepalive

    async def plan(self, task_id: int, resume: str | None) -> StreamPlan | None:
        """Open the watch, then read the row and the backlog. None: a resume after the final event (nothing more
        will come). HttpError 404 for a task with no row."""
        key = status_stream.stream_key(task_id)
        if resume is not None and resume != "0-0":
            seen = await self.reads.entry(key, resume)
            if seen is None:
                resume = None  # trimmed, expired, or never ours: start again from a snapshot
            elif status_stream.is_final(status_stream.event_data(task_id, seen[1])):
                if await self._row(task_id) is None:
                    raise HttpError(404, "no such task", None)
                return None
        if resume is None:
            latest = await self.reads.latest(key)
            after = latest[0] if latest else "0-0"
        else:
            latest, after = None, resume
        watcher = self.hub.watch(key, after)
        try:
            row = await self._row(task_id)
            if row is None:
                raise HttpError(404, "no such task")
            backlog = await self.reads.after(key, after)
            snapshot = None
            if resume is None:
                snapshot = status_stream.snapshot_data(task_id, row, latest[1] if latest else None)
            elif status_stream.is_final(status_stream.snapshot_data(task_id, row, None)) and not any(
                status_stream.is_final(status_stream.event_data(task_id, fields)) for _, fields in backlog
            ):
                # settled, but its final entry is not in the stream (Redis refused it): say it from the row
                snapshot, backlog = status_stream.snapshot_data(task_id, row, None), []
        except BaseException:
            self.hub.unwatch(watcher)
            raise
        return StreamPlan(watcher, after, snapshot, backlog)

    async def stream(self, task_id: int, plan: StreamPlan) -> AsyncIterator[bytes]:
        """The stream's bytes: the snapshot, each entry once in id order, keep-alives; it ends after the final
        event, or when the hub lets the watch go (stopping, or a client that fell behind: it reconnects with
        its Last-Event-ID)."""
        last = id_key(plan.after)
        try:
            if plan.snapshot is not None:
                yield sse_event(plan.after, plan.snapshot)
                if status_stream.is_final(plan.snapshot):
                    return
            quiet = 0
            async with aclosing(self._entries(plan)) as entries:
                async for entry in entries:
                    if entry is None:
                        yield KEEPALIVE_COMMENT
                        quiet += 1
                        settled = await self._settled_without_event(task_id) if quiet % ROW_CHECK_EVERY == 0 else None
                        if settled is not None:
                            yield sse_event(None, settled)
                            return
                        continue
                    quiet = 0
                    entry_id, fields = entry
                    if id_key(entry_id) <= last:
                        continue
                    last = id_key(entry_id)
                    data = status_stream.event_data(task_id, fields)
                    yield sse_event(entry_id, data)
                    if status_stream.is_final(data):
                        return
        finally:
            self.hub.unwatch(plan.watcher)

    async def _entries(self, plan: StreamPlan) -> AsyncGenerator[Entry | None, None]:
        """The backlog, then what the watch brings; None for each keep-alive interval that brought nothing."""
        for entry in plan.backlog:
            yield entry
        while True:
            try:
                item = await asyncio.wait_for(plan.watcher.queue.get(), timeout=self.keepalive)
            except TimeoutError:
                yield None
                continue
            if item is None:
                return
            yield item

    async def _settled_without_event(self, task_id: int) -> dict[str, Any] | None:
        """The row's final snapshot when the task settled over SETTLED_GRACE seconds ago, yet its stream (still
        quiet) never said so: Redis refused the final entry. The record has the last word."""
        row = await self._row(task_id)
        if row is None or row.finished_at is None or utcnow() - row.finished_at < SETTLED_GRACE:
            return None
        snapshot = status_stream.snapshot_data(task_id, row, None)
        return snapshot if status_stream.is_final(snapshot) else None

    def close_all(self) -> None:
        """End every open stream now (clients reconnect)."""
        self.hub.close_all()

    async def close(self) -> None:
        await self.hub.stop()
        await self.reads.close()
