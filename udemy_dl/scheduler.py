"""RQ's scheduler (it moves due retries and delayed jobs onto their queues), kept alive through Redis outages.

RQ's scheduler process ends at the first connection error: a Redis restart or a Sentinel
failover stops every scheduled retry until some worker notices and starts another, and a worker
that does not hold the scheduler lock cannot start one until the lock expires. This one waits for
Redis instead and goes on with the same name, so it takes its own lock back at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.scheduler import RQScheduler

from .logs import set_task
from .process_control import die_with_parent, set_process_title

log = logging.getLogger(__name__)

OUTAGE_BACKOFF_MAX = 5.0
"""Longest pause, in seconds, between two tries while Redis is unreachable."""


class ResilientScheduler(RQScheduler):
    """RQ's scheduler whose process survives Redis outages and dies with its worker."""

    def work(self) -> None:
        die_with_parent()  # a worker killed with -9 must not leave a scheduler holding its lock
        set_task(None)  # forked from a worker, maybe while it ran a job: its lines are about no task
        set_process_title(f"rq scheduler udemy_dl {self.name}")  # not the worker's title: pgrep finds workers
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        self._until_redis_answers(self.register_birth)
        while not self._stop_requested:
            if self._until_redis_answers(self._tick):
                time.sleep(self.interval)  # RQ's own pace between two passes
        self._until_redis_answers(self.stop, give_up_after=self.interval + 5)

    def _tick(self) -> None:
        if self.should_reacquire_locks:
            self.acquire_locks()  # type: ignore[no-untyped-call]
        self.heartbeat()  # type: ignore[no-untyped-call]
        self.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]

    def _until_redis_answers(self, step: Callable[[], Any], give_up_after: float | None = None) -> bool:
        """Run *step*; while Redis is unreachable, try again with backoff. False if it gave up
        (a stop was asked for, or *give_up_after* seconds passed)."""
        delay = 0.5
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            try:
                step()
                return True
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if (deadline is not None and time.monotonic() >= deadline) or (
                    deadline is None and self._stop_requested
                ):
                    log.warning("scheduler %s: Redis unreachable, giving up: %s", self.name, exc)
                    return False
                log.warning("scheduler %s: Redis unreachable (%s); trying again in %.1fs", self.name, exc, delay)
                time.sleep(delay)  # backoff while Redis is away
                delay = min(delay * 2, OUTAGE_BACKOFF_MAX)
