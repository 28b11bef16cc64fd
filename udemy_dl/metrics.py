"""Prometheus metrics: queue state read from Redis at scrape time, task events recorded in Redis.

Workers are forked processes on several hosts, so event counters and histograms live in Redis
(one hash each, updated with HINCRBY) rather than in process memory; any process can serve
them (`udemy-dl serve` at /metrics, or `udemy-dl metrics`). Recording never fails a task: a
Redis error there is logged and the event is dropped. While a worker runs a job, what the job
records is held back and written in one round trip when the job ends (deferred, flush): a job
whose process is killed records nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from .pausing import pause_state
from .queues import download_queues, webhook_queue
from .settings import Settings

log = logging.getLogger(__name__)

PREFIX = "udemy_dl"
COUNTERS_KEY = "udemy_dl:metrics:counters"
HISTOGRAM_KEY = "udemy_dl:metrics:histogram:{name}"

PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
HISTOGRAMS = {
    "pickup_latency_seconds": ("Seconds from enqueue to a download job's start.", PICKUP_BUCKETS),
    "task_duration_seconds": ("Seconds one download attempt took.", DURATION_BUCKETS),
}
COUNTERS = {
    "bytes_fetched": "Bytes received from the content origin.",
    "attempts": "Download attempts started.",
    "tasks": "Download attempts that ended, by outcome (completed, failed, retry, handed_back, cancelled).",
    "failures": "Download attempts that failed, by reason (the error's class).",
    "webhook_deliveries": "Webhook delivery attempts, by result (delivered, failed).",
    "origin_busy": "Download runs handed back, no attempt counted, because ORIGIN_CONCURRENCY tasks were "
    "already downloading from their origin.",
}


# -- recording (workers) ----------------------------------------------------------------------------


class _Add(NamedTuple):
    """One increment of one field of one hash."""

    connection: Redis
    key: str
    field: str
    amount: float
    whole: bool
    """HINCRBY (a count) rather than HINCRBYFLOAT."""


_held: list[_Add] | None = None
"""While a job runs under deferred(): what it has recorded and not yet written."""


def _field(name: str, labels: dict[str, str]) -> str:
    return name + "".join(f"|{key}={value}" for key, value in sorted(labels.items()))


def _record(name: str, adds: list[_Add]) -> None:
    if _held is not None:
        _held.extend(adds)
        return
    _write(adds, name)


def _write(adds: Sequence[_Add], what: str) -> None:
    """Write *adds* in one round trip per Redis client (there is one in practice)."""
    for connection in {id(add.connection): add.connection for add in adds}.values():
        try:
            with connection.pipeline(transaction=False) as pipe:
                for add in adds:
                    if add.connection is not connection:
                        continue
                    if add.whole:
                        pipe.hincrby(add.key, add.field, int(add.amount))
                    else:
                        pipe.hincrbyfloat(add.key, add.field, add.amount)
                pipe.execute()
        except RedisError as exc:
            log.warning("metric %s not recorded: %s", what, exc)


def inc(connection: Redis, name: str, amount: float = 1, **labels: str) -> None:
    """Add *amount* to counter *name* (one of COUNTERS) with *labels*."""
    _record(name, [_Add(connection, COUNTERS_KEY, _field(name, labels), amount, whole=False)])


def observe(connection: Redis, name: str, value: float, **labels: str) -> None:
    """Record *value* in histogram *name* (one of HISTOGRAMS)."""
    _, buckets = HISTOGRAMS[name]
    bucket = next((str(bound) for bound in buckets if value <= bound), "+Inf")
    base = _field("", labels)
    key = HISTOGRAM_KEY.format(name=name)
    _record(
        name,
        [
            _Add(connection, key, f"bucket{base}|le={bucket}", 1, whole=True),
            _Add(connection, key, f"count{base}", 1, whole=True),
            _Add(connection, key, f"sum{base}", value, whole=False),
        ],
    )


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back what inc() and observe() record in this process, and write it in one round trip
    at flush() or, at the latest, at the end of the block. The worker runs each job in one: a job
    records about ten events, and a round trip for each would cost more than the job's own work."""
    global _held
    _held = []
    try:
        yield
    finally:
        flush()
        _held = None


def flush() -> None:
    """Write what deferred() has held back so far."""
    if _held:
        adds = list(_held)
        _held.clear()
        _write(adds, "events of a job")


def observe_pickup(connection: Redis, job: Job | None) -> None:
    if job is None or job.enqueued_at is None or job.started_at is None:
        return
    enqueued = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=UTC)
    started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
    observe(connection, "pickup_latency_seconds", max((started - enqueued).total_seconds(), 0.0))


# -- collecting (scrapes) ----------------------------------------------------------------------------


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = field.split("|")
    return name, dict(pair.split("=", 1) for pair in pairs)


class ServiceCollector(Collector):
    """Everything /metrics shows, read fresh from Redis on each scrape."""

    def __init__(self, settings: Settings, connection: Redis) -> None:
        self.settings = settings
        self.connection = connection

    def queues(self) -> list[Queue]:
        return [*download_queues(self.settings, self.connection), webhook_queue(self.settings, self.connection)]

    def collect(self) -> Iterator[Metric]:
        yield from self._queue_state()
        yield from self._paused()
        yield from self._workers()
        yield from self._counters()
        yield from self._histograms()

    def _queue_state(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(f"{PREFIX}_queue_jobs", "Jobs per queue and state.", labels=["queue", "state"])
        oldest = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_waiting_seconds",
            "Age of the oldest job waiting in the queue (0 when empty).",
            labels=["queue"],
        )
        registries = {
            "started": StartedJobRegistry,
            "scheduled": ScheduledJobRegistry,
            "deferred": DeferredJobRegistry,
            "finished": FinishedJobRegistry,
            "failed": FailedJobRegistry,
        }
        for queue in self.queues():
            jobs.add_metric([queue.name, "waiting"], queue.count)
            for state, registry in registries.items():
                # ZCARD, not .count: RQ's count also cleans the registry up, and a scrape changes nothing.
                size: int = self.connection.zcard(registry(queue=queue).key)  # type: ignore[assignment]
                jobs.add_metric([queue.name, state], size)
            oldest.add_metric([queue.name], self._oldest_age(queue))
        return [jobs, oldest]

    def _oldest_age(self, queue: Queue) -> float:
        head: bytes | None = self.connection.lindex(queue.key, 0)  # type: ignore[assignment]
        if head is None:
            return 0.0
        raw: bytes | None = self.connection.hget(f"rq:job:{head.decode()}", "enqueued_at")  # type: ignore[assignment]
        if not raw:
            return 0.0
        text = raw.decode().rstrip("Z")
        try:
            enqueued = datetime.fromisoformat(text).replace(tzinfo=UTC)
        except ValueError:
            return 0.0
        return max(time.time() - enqueued.timestamp(), 0.0)

    def _paused(self) -> Iterable[Metric]:
        paused = GaugeMetricFamily(
            f"{PREFIX}_paused",
            "1 while workers take no new job from the queue (rq suspend, or udemy-dl pause [--queue]), else 0.",
            labels=["queue"],
        )
        names = [queue.name for queue in self.queues()]
        state = pause_state(self.connection, names)
        for name in names:
            paused.add_metric([name], 1.0 if state.holds(name) else 0.0)
        return [paused]

    def _workers(self) -> Iterable[Metric]:
        alive = GaugeMetricFamily(f"{PREFIX}_workers", "Workers registered in Redis, by state.", labels=["state"])
        counts: dict[str, int] = {"idle": 0, "busy": 0, "other": 0}
        for worker in Worker.all(connection=self.connection):
            state = str(worker.get_state())
            counts[state if state in counts else "other"] += 1
        for state, count in counts.items():
            alive.add_metric([state], count)
        return [alive]

    def _counters(self) -> Iterable[Metric]:
        raw: dict[bytes, bytes] = self.connection.hgetall(COUNTERS_KEY)  # type: ignore[assignment]
        samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in COUNTERS}
        for field, value in raw.items():
            name, labels = _parse_field(field.decode())
            if name in samples:
                samples[name].append((labels, float(value)))
        for name, help_text in COUNTERS.items():
            label_names = sorted({key for labels, _ in samples[name] for key in labels})
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=label_names)
            for labels, amount in samples[name]:
                family.add_metric([labels.get(key, "") for key in label_names], amount)
            yield family

    def _histograms(self) -> Iterable[Metric]:
        for name, (help_text, buckets) in HISTOGRAMS.items():
            raw: dict[bytes, bytes] = self.connection.hgetall(HISTOGRAM_KEY.format(name=name))  # type: ignore[assignment]
            values = {key.decode(): float(value) for key, value in raw.items()}
            family = HistogramMetricFamily(f"{PREFIX}_{name}", help_text)
            cumulative: list[tuple[str, float]] = []
            running = 0.0
            for bound in (*buckets, "+Inf"):
                running += values.get(f"bucket|le={bound}", 0.0)
                cumulative.append((str(bound) if bound != "+Inf" else "+Inf", running))
            family.add_metric([], cumulative, values.get("sum", 0.0))
            yield family


def render_latest(settings: Settings, connection: Redis) -> tuple[bytes, str]:
    """The metrics page: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(settings, connection))
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"


def reset(connection: Redis, names: Sequence[str] = tuple(HISTOGRAMS)) -> None:
    """Forget recorded events (tests, or an operator starting afresh)."""
    connection.delete(COUNTERS_KEY, *(HISTOGRAM_KEY.format(name=name) for name in names))
