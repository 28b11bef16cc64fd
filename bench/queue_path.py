"""Part (c): the queue path with 5 workers, ours against plain `rq worker` running a no-op, on the same Redis.

Pickup latency is RQ's own record read back from Redis after the job ended: `started_at` (set in
the work horse just before the job function is called) minus `enqueued_at`. Latency is measured
with one job at a time (nothing queues behind another); throughput with all jobs enqueued at once.
SQL statements are the server's per-user counters for the workers' own database user.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from rq import Queue
from rq.job import Job

from udemy_dl import defaults

from .harness import Bench, row_time
from .report import Part, Row
from .services import SqlCount
from .support import BenchError, Child, median, percentile, remove, say, wait_until

WORKERS = 5
BASELINE_QUEUE = "bench-noop"
OLD_POLLER_PICKUP_S = 5.0
OLD_POLLER_QUERIES_PER_HOUR = 8640 / 24
TARGET_PICKUP_RATIO = 1.5
TARGET_SQL_PER_TASK = 4


@dataclass
class Timings:
    pickup_ms: list[float]
    total_ms: list[float]
    """Enqueue to the job's end (RQ's ended_at)."""
    throughput: float
    """Jobs per second, all enqueued at once: count / (last ended_at - first enqueued_at)."""


def _when(value: datetime | None) -> datetime:
    if value is None:
        raise BenchError("a finished job lacks RQ's timestamps")
    return value


def _ms(later: datetime | None, earlier: datetime | None) -> float:
    return (_when(later) - _when(earlier)).total_seconds() * 1000


def _wait_finished(bench: Bench, jobs: list[Job], logs: list[Child], timeout: float) -> list[Job]:
    """Until every job has ended; return them fetched afresh (RQ's timestamps filled in)."""

    def ended() -> bool:
        pipe = bench.connection.pipeline()
        for job in jobs:
            pipe.hget(job.key, "status")
        statuses = [value.decode() if value else "" for value in pipe.execute()]
        failed = [job.id for job, status in zip(jobs, statuses, strict=True) if status in ("failed", "stopped")]
        if failed:
            tails = "\n".join(child.tail() for child in logs)
            raise BenchError(f"jobs failed: {failed[:5]}\n{tails}")
        return all(status == "finished" for status in statuses)

    wait_until(ended, timeout=timeout, what=f"{len(jobs)} job(s) to finish", interval=0.002)
    fetched = Job.fetch_many([job.id for job in jobs], connection=bench.connection)
    return [job for job in fetched if job is not None]


def _measure(bench: Bench, count: int, enqueue: Callable[[], Job], logs: list[Child]) -> Timings:
    """Latency with one job in flight at a time, then throughput with *count* jobs enqueued at once."""
    pickup: list[float] = []
    total: list[float] = []
    for _ in range(count):
        job = enqueue()
        (done,) = _wait_finished(bench, [job], logs, timeout=60)
        pickup.append(_ms(done.started_at, done.enqueued_at))
        total.append(_ms(done.ended_at, done.enqueued_at))
    jobs = [enqueue() for _ in range(count)]
    finished = _wait_finished(bench, jobs, logs, timeout=600)
    first = min(_when(job.enqueued_at) for job in finished)
    last = max(_when(job.ended_at) for job in finished)
    return Timings(pickup, total, count / ((last - first).total_seconds()))


def _baseline(bench: Bench, count: int) -> Timings:
    queue = Queue(BASELINE_QUEUE, connection=bench.connection)
    workers = [bench.start_rq_worker(f"bench-rq-{n}", BASELINE_QUEUE) for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    say(f"(c) plain rq worker x{WORKERS}: {count} no-op jobs one at a time, then {count} at once")
    timings = _measure(bench, count, lambda: queue.enqueue("bench.noop.noop"), workers)
    for worker in workers:
        bench.children.stop(worker)
    return timings


def _ours(bench: Bench, count: int) -> tuple[Timings, dict[str, float], SqlCount, int, list[Child]]:
    one_byte = bench.data / "files" / "one.bin"
    one_byte.parent.mkdir(parents=True, exist_ok=True)
    one_byte.write_bytes(b"x")
    url = bench.origin.base_url + "/files/one.bin"
    workers = [bench.start_worker(f"bench-c-{n}") for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    say(f"(c) ours x{WORKERS}: {count} one-byte tasks one at a time, then {count} at once")
    task_ids: list[int] = []

    def enqueue() -> Job:
        task_id = bench.new_task(url)  # as the admin user: not counted as the workers' SQL
        task_ids.append(task_id)
        job: Job = bench.enqueue(task_id, url)
        return job

    before = bench.db.settled_count()
    timings = _measure(bench, count, enqueue, workers)
    sql = bench.db.settled_count() - before
    rows = bench.store.get_many(task_ids)
    if len(rows) != len(task_ids) or any(row.status != "completed" for row in rows):
        raise BenchError("not every task's row ended `completed`")
    recorded: list[float] = []
    for row in rows[:count]:  # the one-at-a-time ones: how long until MySQL says the task started
        job = Job.fetch(f"download-{row.id}", connection=bench.connection)
        started = row_time(row.started_at)
        if started is not None and job.enqueued_at is not None:
            recorded.append((started - job.enqueued_at.timestamp()) * 1000)
    extra = {"db_started_p50_ms": median(recorded), "db_started_p99_ms": percentile(recorded, 99)}
    remove(bench.download_dir)
    return timings, extra, sql, len(task_ids), workers


def _idle(bench: Bench, seconds: float, interval: int) -> SqlCount:
    """Statements of 5 idle workers over *seconds*, their reconciler sweeping every *interval* seconds."""
    workers = [bench.start_worker(f"bench-idle-{n}", RECONCILE_INTERVAL=str(interval)) for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    say(f"(c) counting SQL statements of {WORKERS} idle workers for {seconds:g} s (RECONCILE_INTERVAL={interval})")
    time.sleep(1)  # start-up settles before the window opens
    before = bench.db.settled_count()
    time.sleep(seconds)  # the measurement window itself
    delta = bench.db.settled_count() - before
    for worker in workers:
        bench.children.stop(worker)
    return delta


def run_queue_path(bench: Bench) -> Part:
    count = bench.profile.queue_jobs
    part = Part(
        "c",
        f"queue path: {WORKERS} workers, {count} tasks whose fetch is trivial (a 1-byte file)",
        f"plain `rq worker` x{WORKERS} running a no-op function (bench.noop.noop) on the same Redis",
    )
    setup = bench.db.setup_statements_per_connection()
    base = _baseline(bench, count)
    ours, extra, sql, tasks, workers = _ours(bench, count)
    for worker in workers:
        bench.children.stop(worker)
    window = bench.profile.idle_seconds
    interval = max(1, round(window / 4))
    idle = _idle(bench, window, interval)

    p50, b50 = median(ours.pickup_ms), median(base.pickup_ms)
    p99, b99 = percentile(ours.pickup_ms, 99), percentile(base.pickup_ms, 99)
    per_task = sql.statements / tasks
    connections = sql.connections / tasks
    without_setup = per_task - connections * setup
    progress = sql.update / tasks - 2  # UPDATEs beyond begin_attempt and mark_completed
    per_sweep = idle.statements * interval / window
    sweeps_per_hour = 3600 / defaults.RECONCILE_INTERVAL
    per_hour = per_sweep * sweeps_per_hour
    part.rows += [
        Row(
            "pickup latency p50 (enqueue -> job start)",
            p50,
            b50,
            "ms",
            f"<= {TARGET_PICKUP_RATIO}x plain RQ",
            p50 <= TARGET_PICKUP_RATIO * b50,
        ),
        Row("pickup latency p99", p99, b99, "ms"),
        Row("enqueue -> job end p50", median(ours.total_ms), median(base.total_ms), "ms"),
        Row("enqueue -> job end p99", percentile(ours.total_ms, 99), percentile(base.total_ms, 99), "ms"),
        Row("enqueue -> row started in MySQL p50", extra["db_started_p50_ms"], None, "ms"),
        Row("throughput, all enqueued at once", ours.throughput, base.throughput, "jobs/s", digits=1),
        Row(
            "old poller: average pickup delay",
            p50 / 1000,
            OLD_POLLER_PICKUP_S,
            "s",
            "far below 5 s",
            p50 / 1000 < OLD_POLLER_PICKUP_S / 10,
            digits=3,
        ),
        Row(
            "SQL statements per task, progress updates aside",
            per_task - progress,
            None,
            target=f"<= {TARGET_SQL_PER_TASK}",
            met=per_task - progress <= TARGET_SQL_PER_TASK,
        ),
        Row(
            f"  connection set-up ({connections:.2f} connections/task x {setup})",
            connections * setup,
            None,
        ),
        Row(
            "  the task's own statements",
            without_setup - progress,
            None,
            target=f"<= {TARGET_SQL_PER_TASK}",
            met=without_setup - progress <= TARGET_SQL_PER_TASK,
        ),
        Row("  progress updates", progress, None),
        Row(
            "  SELECT / UPDATE / other per task",
            f"{sql.select / tasks:.2f} / {sql.update / tasks:.2f} / {sql.other / tasks:.2f}",
            None,
        ),
        Row(
            "SQL statements per reconciler sweep, 5 idle workers",
            per_sweep,
            None,
            target="<= 1",
            met=per_sweep <= 1,
        ),
        Row(
            f"SQL statements per idle hour (sweep every {defaults.RECONCILE_INTERVAL} s)",
            per_hour,
            OLD_POLLER_QUERIES_PER_HOUR,
            "/h",
            f"<= {sweeps_per_hour:g}/h",
            per_hour <= sweeps_per_hour,
            digits=1,
        ),
    ]
    part.notes += [
        "pickup = RQ's job.started_at - job.enqueued_at read back from Redis; job start is set in the forked "
        "work horse just before the function is imported and called, so module imports are not in it, but "
        "are in 'enqueue -> job end'",
        f"latency: {count} jobs one at a time (the next enqueued when the previous ended); throughput: {count} "
        "enqueued in a loop, count / (last ended_at - first enqueued_at); ours enqueue with "
        "Producer.add_download_job (per-task lock and dedup), plain RQ with Queue.enqueue",
        "SQL = MariaDB USER_STATISTICS of the workers' own user over all "
        f"{tasks} tasks (the bench's inserts and polls run as another user); a connection's set-up "
        f"({setup} statements) was measured on 3 connections of its own",
        "progress updates = UPDATEs per task beyond begin_attempt and mark_completed; set-up = what "
        "mysql-connector sends on connecting (each forked work horse opens its own connection)",
        f"idle: {idle.statements} statements from {WORKERS} fresh idle workers in a {window:g} s window with "
        f"RECONCILE_INTERVAL={interval} (so {window / interval:g} sweep intervals fit in it); per sweep = "
        f"statements x {interval} / {window:g}, per hour = per sweep x {sweeps_per_hour:g} sweeps at the default "
        f"{defaults.RECONCILE_INTERVAL} s; the old poller: 8,640 queries a day",
        "the old poller's 5 s is its average pickup delay (polling every 10 s); ours/baseline is p50 in seconds "
        "against it",
    ]
    part.raw = {
        "ours_pickup_ms": ours.pickup_ms,
        "baseline_pickup_ms": base.pickup_ms,
        "ours_total_ms": ours.total_ms,
        "baseline_total_ms": base.total_ms,
        "ours_throughput": ours.throughput,
        "baseline_throughput": base.throughput,
        "sql": sql.__dict__,
        "sql_tasks": tasks,
        "sql_setup_per_connection": setup,
        "idle_sql": idle.__dict__,
        "idle_seconds": window,
        "idle_reconcile_interval": interval,
        **extra,
    }
    return part
