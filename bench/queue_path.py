"""Part (c): the queue path with 5 workers, ours against plain `rq worker` running a no-op, on the same Redis.

Pickup latency is RQ's own record read back from Redis after the job ended: `started_at` (set in
the work horse just before the job function is called) minus `enqueued_at`. Latency is measured
with one job at a time (nothing queues behind another); throughput with all jobs enqueued at once.
SQL statements are the server's per-user counters for the workers' own database user.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from rq import Queue
from rq.job import Job

from udemy_dl import defaults
from udemy_dl.reconciler import SWEEP_LOCK

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


def wait_finished(bench: Bench, jobs: list[Job], logs: list[Child], timeout: float) -> list[Job]:
    """Until every job has ended; return them fetched afresh (RQ's timestamps filled in).

    Each poll asks only about the jobs not yet seen finished, so watching a large batch takes
    little from the workers being measured (the times themselves are RQ's, not the poll's).
    """
    waiting = [job.key for job in jobs]

    def ended() -> bool:
        pipe = bench.connection.pipeline(transaction=False)
        for key in waiting:
            pipe.hget(key, "status")
        statuses = [value.decode() if value else "" for value in pipe.execute()]
        failed = [key for key, status in zip(waiting, statuses, strict=True) if status in ("failed", "stopped")]
        if failed:
            tails = "\n".join(child.tail() for child in logs)
            raise BenchError(f"jobs failed: {failed[:5]}\n{tails}")
        waiting[:] = [key for key, status in zip(waiting, statuses, strict=True) if status != "finished"]
        return not waiting

    interval = 0.002 if len(jobs) == 1 else 0.01
    wait_until(ended, timeout=timeout, what=f"{len(jobs)} job(s) to finish", interval=interval)
    fetched = Job.fetch_many([job.id for job in jobs], connection=bench.connection)
    return [job for job in fetched if job is not None]


def _measure(bench: Bench, count: int, enqueue: Callable[[int], Job], logs: list[Child]) -> Timings:
    """Latency with one job in flight at a time, then throughput with *count* jobs enqueued at once.
    *enqueue(n)* enqueues the n-th job (0 <= n < 2 * count)."""
    pickup: list[float] = []
    total: list[float] = []
    for number in range(count):
        job = enqueue(number)
        (done,) = wait_finished(bench, [job], logs, timeout=60)
        pickup.append(_ms(done.started_at, done.enqueued_at))
        total.append(_ms(done.ended_at, done.enqueued_at))
    jobs = [enqueue(number) for number in range(count, 2 * count)]
    return Timings(pickup, total, drain_rate(bench, jobs, logs))


def drain_rate(bench: Bench, jobs: list[Job], logs: list[Child], timeout: float = 600) -> float:
    """Jobs per second of a batch enqueued at once: count / (last ended_at - first enqueued_at)."""
    finished = wait_finished(bench, jobs, logs, timeout)
    first = min(_when(job.enqueued_at) for job in finished)
    last = max(_when(job.ended_at) for job in finished)
    return len(jobs) / (last - first).total_seconds()


@contextlib.contextmanager
def plain_rq_workers(bench: Bench, prefix: str) -> Iterator[tuple[Queue, list[Child]]]:
    """The baseline: WORKERS plain `rq worker` processes on BASELINE_QUEUE, registered, and that queue;
    stopped when the block ends."""
    workers = [bench.start_rq_worker(f"{prefix}-{n}", BASELINE_QUEUE) for n in range(1, WORKERS + 1)]
    try:
        bench.wait_registered(workers)
        yield Queue(BASELINE_QUEUE, connection=bench.connection), workers
    finally:
        for worker in workers:
            bench.children.stop(worker)


def _baseline(bench: Bench, count: int) -> Timings:
    with plain_rq_workers(bench, "bench-rq") as (queue, workers):
        say(f"(c) plain rq worker x{WORKERS}: {count} no-op jobs one at a time, then {count} at once")
        return _measure(bench, count, lambda number: queue.enqueue("bench.noop.noop"), workers)


def _ours(bench: Bench, count: int) -> tuple[Timings, dict[str, float], SqlCount, int, list[Child]]:
    one_byte = bench.data / "files" / "one.bin"
    one_byte.parent.mkdir(parents=True, exist_ok=True)
    one_byte.write_bytes(b"x")
    url = bench.origin.base_url + "/files/one.bin"
    workers = [bench.start_worker(f"bench-c-{n}") for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    say(f"(c) ours x{WORKERS}: {count} one-byte tasks one at a time, then {count} at once")
    # The shop's rows first (as the admin user: not the workers' SQL, and not in the enqueue loop).
    task_ids = [bench.new_task(url) for _ in range(2 * count)]

    def enqueue(number: int) -> Job:
        job: Job = bench.enqueue(task_ids[number], url)
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


@dataclass
class Idle:
    sql: SqlCount
    sweeps: int
    """Reconciler sweeps seen in the window (each takes the sweep lock afresh)."""


def _count_sweeps(bench: Bench, seconds: float) -> int:
    """Sweeps in the next *seconds*: each sweep sets SWEEP_LOCK with a fresh expiry, so its time to
    live jumps up (or the key reappears) once per sweep."""
    sweeps = 0
    last = int(bench.connection.pttl(SWEEP_LOCK))  # type: ignore[arg-type]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)  # polling period of the count, not a synchronisation
        ttl = int(bench.connection.pttl(SWEEP_LOCK))  # type: ignore[arg-type]
        if ttl > 0 and (last < 0 or ttl > last + 500):
            sweeps += 1
        last = ttl
    return sweeps


def _idle(bench: Bench, seconds: float, interval: int) -> Idle:
    """Statements of 5 idle workers and the reconciler beside them (as start_workers.sh deploys
    them) over *seconds*, the reconciler sweeping every *interval* seconds."""
    workers = [bench.start_worker(f"bench-idle-{n}", RECONCILE_INTERVAL=str(interval)) for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    reconciler = bench.start_reconciler("bench-idle-reconciler", RECONCILE_INTERVAL=str(interval))
    wait_until(
        lambda: bench.connection.exists(SWEEP_LOCK),
        timeout=30,
        what="the reconciler's first sweep",
        interval=0.05,
        on_timeout=reconciler.tail,
    )
    say(
        f"(c) counting SQL statements of {WORKERS} idle workers and the reconciler for {seconds:g} s "
        f"(RECONCILE_INTERVAL={interval})"
    )
    time.sleep(1)  # start-up (and the first sweep's connection) settles before the window opens
    before = bench.db.settled_count()
    sweeps = _count_sweeps(bench, seconds)  # the measurement window itself
    delta = bench.db.settled_count() - before
    for child in [reconciler, *workers]:
        bench.children.stop(child)
    return Idle(delta, sweeps)


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
    # The reconciler looks every RECOVERY_INTERVAL seconds whether a sweep is due: one a shade
    # shorter makes it sweep at each look.
    interval = defaults.RECOVERY_INTERVAL - 1
    idle = _idle(bench, window, interval)

    p50, b50 = median(ours.pickup_ms), median(base.pickup_ms)
    p99, b99 = percentile(ours.pickup_ms, 99), percentile(base.pickup_ms, 99)
    per_task = sql.statements / tasks
    connections = sql.connections / tasks
    without_setup = per_task - connections * setup
    progress = sql.update / tasks - 2  # UPDATEs beyond begin_attempt and mark_completed
    per_sweep = idle.sql.statements / max(idle.sweeps, 1)
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
            f"SQL statements per reconciler sweep, {WORKERS} idle workers and the reconciler",
            per_sweep,
            None,
            target="<= 1",
            met=idle.sweeps > 0 and per_sweep <= 1,
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
        "pickup = RQ's job.started_at - job.enqueued_at read back from Redis; job start is set in the work "
        "horse just before the function is imported and called, so module imports are not in it, but are in "
        "'enqueue -> job end'; plain RQ forks a horse for each job, ours keeps its horse from one download to "
        f"the next (a fresh one after {defaults.HORSE_MAX_JOBS})",
        f"latency: {count} jobs one at a time (the next enqueued when the previous ended); throughput: {count} "
        "enqueued in a loop, count / (last ended_at - first enqueued_at); ours enqueue with "
        "Producer.add_download_job (per-task lock and dedup), plain RQ with Queue.enqueue; the tasks' rows are "
        "inserted before either (the shop's work, as another database user)",
        "SQL = MariaDB USER_STATISTICS of the workers' own user over all "
        f"{tasks} tasks (the bench's inserts and polls run as another user); a connection's set-up "
        f"({setup} statements) was measured on 3 connections of its own",
        "progress updates = UPDATEs per task beyond begin_attempt and mark_completed; set-up = what "
        "mysql-connector sends on connecting (each worker opens one connection, which its work horse uses)",
        f"idle: {idle.sql.statements} statements from {WORKERS} fresh idle workers and the reconciler beside "
        f"them (`udemy-dl reconciler`, as start_workers.sh runs it) in a {window:g} s window with "
        f"RECONCILE_INTERVAL={interval}, in which the reconciler swept {idle.sweeps} times (it looks every "
        f"{defaults.RECOVERY_INTERVAL} s whether a sweep is due, so it sweeps at each look); per sweep = "
        f"statements / sweeps, per hour = per sweep x {sweeps_per_hour:g} sweeps at the default "
        f"{defaults.RECONCILE_INTERVAL} s; the workers themselves send none while idle; the old poller: 8,640 "
        "queries a day",
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
        "idle_sql": idle.sql.__dict__,
        "idle_sweeps": idle.sweeps,
        "idle_seconds": window,
        "idle_reconcile_interval": interval,
        **extra,
    }
    return part
