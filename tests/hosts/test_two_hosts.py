"""Two servers on one Redis and one MariaDB; one of them dies mid-run.

Hosts A and B are network namespaces with their own hostname, reaching Redis, MariaDB, the content
origin and the webhook receiver over their own veth link; each runs the real start_workers.sh (two
workers and a reconciler). Twenty paid tasks are downloaded slowly, so both hosts have work in
flight when every process of host A gets SIGKILL. A's worker registrations then expire (WORKER_TTL,
within 25 s of their last heartbeat), and A's orphaned jobs run again on B.

Host A starts first, so its worker holds RQ's scheduler locks when it dies: the worst case, as
retries (RQ's own retry of an abandoned job among them) need a scheduler. One scenario (module
fixture) feeds two tests: the main outcome, and a retry scheduled after A's scheduler locks expired.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler

from tests.support.files import sha256_of
from tests.support.hosts import TwoHosts
from tests.support.http_servers import Task
from tests.support.measurements import record
from tests.support.waiting import wait_for
from udemy_dl.store import COMPLETED

MIB = 1024 * 1024
TASKS = 20
FILE_SIZE = 3 * MIB
THROTTLE = 384 * 1024
"""Bytes per second per response: each file takes about 8 s, so work is always in flight."""

WORKERS_PER_HOST = 2
SETTLE_DEADLINE = 240.0
"""Seconds after the kill by which every task must have settled (A's keys expire within 25 s)."""

PROBE_WINDOW = 60.0
"""A retry scheduled once A's scheduler locks have expired must fire within this many seconds."""

QUEUES = ("webhooks", "downloads-high", "downloads")


def scheduler_locks(world: TwoHosts) -> dict[str, str | None]:
    """queue -> name of the scheduler holding its lock (None: nobody holds it)."""
    owners: dict[str, str | None] = {}
    for queue in QUEUES:
        owner = world.redis.get(RQScheduler.get_locking_key(queue))
        owners[queue] = owner.decode() if isinstance(owner, bytes) else None
    return owners


def scheduler_hosts(world: TwoHosts) -> dict[str, str | None]:
    """queue -> hostname of the scheduler holding its lock (None: nobody holds it; "?": unknown)."""
    hosts: dict[str, str | None] = {}
    for queue, name in scheduler_locks(world).items():
        hostname = world.redis.hget(SCHEDULER_KEY_TEMPLATE % name, "hostname") if name else None
        hosts[queue] = hostname.decode() if isinstance(hostname, bytes) else ("?" if name else None)
    return hosts


def running_on(world: TwoHosts, tasks: list[Task], prefix: str) -> list[Task]:
    """Tasks whose job is started by a worker named *prefix*... and whose file is flowing."""
    found = []
    for task in tasks:
        job = world.job(task)
        if job is None or not (job.worker_name or "").startswith(prefix):
            continue
        if job.get_status(refresh=False) == "started" and world.origin.bytes_sent.get(task.files[0].url_path, 0) > 0:
            found.append(task)
    return found


@dataclass
class HostLoss:
    """What the scenario saw; the tests judge it."""

    world: TwoHosts
    tasks: list[Task]
    probe: Task
    rq_before: dict[str, str]
    schedulers_before: dict[str, str | None]
    in_flight_b: list[Task]
    killed_at: float
    killed: list[int]
    sent_at_kill: dict[str, int]
    orphans: list[Task]
    resumed_at: dict[int, float] = field(default_factory=dict)
    probe_paid_at: float | None = None
    probe_done_at: float | None = None
    schedulers_at_probe: dict[str, str | None] = field(default_factory=dict)
    rq_after: dict[str, str] = field(default_factory=dict)
    settled_at: float | None = None


@pytest.fixture(scope="module")
def host_loss(two_hosts: TwoHosts) -> HostLoss:
    world = two_hosts
    a, b = world.a, world.b
    tasks = world.make_tasks(TASKS, FILE_SIZE)
    (probe,) = world.make_tasks(1, 256 * 1024, prefix="probe")
    world.origin.throttle = THROTTLE

    # A first, and A's scheduler takes RQ's scheduler locks before B starts.
    a.start_workers(WORKERS_PER_HOST)
    wait_for(
        lambda: all(host == a.hostname for host in scheduler_hosts(world).values()),
        timeout=30,
        interval=0.1,
        what=lambda: f"host A's scheduler to hold the locks: {scheduler_hosts(world)}\n{world.logs()}",
    )
    b.start_workers(WORKERS_PER_HOST)
    rq_before = world.rq_info_workers()
    schedulers_before = scheduler_hosts(world)
    a_schedulers = {name for name in scheduler_locks(world).values() if name}

    world.pay(tasks)
    wait_for(
        lambda: (
            len(running_on(world, tasks, a.worker_prefix)) == WORKERS_PER_HOST
            and len(running_on(world, tasks, b.worker_prefix)) == WORKERS_PER_HOST
        ),
        timeout=60,
        interval=0.05,
        what=lambda: f"downloads in flight on both hosts\n{world.logs()}",
    )
    in_flight_b = running_on(world, tasks, b.worker_prefix)
    with world.origin.lock:
        sent_at_kill = dict(world.origin.bytes_sent)
    killed_at = time.monotonic()
    killed = a.net.kill_everything()
    orphans = [
        task
        for task in tasks
        if (job := world.job(task)) is not None
        and (job.worker_name or "").startswith(a.worker_prefix)
        and world.rows([task])[task.id].status != COMPLETED
    ]
    loss = HostLoss(
        world, tasks, probe, rq_before, schedulers_before, in_flight_b, killed_at, killed, sent_at_kill, orphans
    )

    deadline = killed_at + SETTLE_DEADLINE
    while time.monotonic() < deadline:
        for task in orphans:
            if task.id not in loss.resumed_at:
                later = [at for at, _ in world.origin.timed.for_path(task.files[0].url_path) if at > killed_at]
                if later:
                    loss.resumed_at[task.id] = later[0]
        if loss.probe_paid_at is None and not a_schedulers & set(scheduler_locks(world).values()):
            # A's scheduler locks have expired: a retry scheduled now needs another scheduler.
            loss.schedulers_at_probe = scheduler_hosts(world)
            world.origin.fail_next(probe.files[0].url_path, 1)
            world.pay([probe], priority="high")
            loss.probe_paid_at = time.monotonic()
        if loss.probe_done_at is None and world.rows([probe])[probe.id].status == COMPLETED:
            loss.probe_done_at = time.monotonic()
        rows = world.rows(tasks)
        if loss.settled_at is None and all(row.status == COMPLETED for row in rows.values()):
            loss.settled_at = time.monotonic()
        probe_over = loss.probe_done_at is not None or (
            loss.probe_paid_at is not None and time.monotonic() > loss.probe_paid_at + PROBE_WINDOW
        )
        if loss.settled_at is not None and probe_over:
            break
        time.sleep(0.2)

    if loss.settled_at is not None:
        # Deliveries follow completion by a moment; the test judges what arrived.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: all(task.id in world.completed_ids() for task in tasks), timeout=60, interval=0.2)
    loss.rq_after = world.rq_info_workers()
    return loss


def test_two_hosts_share_redis_and_mysql_and_survive_losing_one(
    host_loss: HostLoss, request: pytest.FixtureRequest
) -> None:
    """Every task ends completed exactly once after host A dies mid-run; A's jobs finish on B."""
    loss = host_loss
    world = loss.world
    a, b = world.a, world.b

    # Both hosts ran as one site: each with its own names, over its own link.
    assert set(loss.rq_before) == {f"{host.worker_prefix}{n}" for host in (a, b) for n in (1, 2)}, loss.rq_before
    assert loss.rq_before == {
        name: (a.hostname if name.startswith(a.worker_prefix) else b.hostname) for name in loss.rq_before
    }
    for relay in ("db", "origin"):
        arrivals = world.relays[relay].arrivals
        assert arrivals[a.net.root_ip] > 0 and arrivals[b.net.root_ip] > 0, (relay, arrivals)
    assert loss.orphans, "host A had no download in flight when it died"
    assert loss.in_flight_b, "host B had no download in flight"
    assert loss.killed and not a.net.pids(), "host A's processes are gone"

    # A's orphans ran again on B.
    missing = [task.id for task in loss.orphans if task.id not in loss.resumed_at]
    assert not missing, f"orphaned tasks never resumed: {missing}\n{world.logs()}"
    recovery = max(loss.resumed_at.values()) - loss.killed_at
    first = min(loss.resumed_at.values()) - loss.killed_at
    record(
        request.config,
        "hosts",
        "two_hosts",
        "kill -9 of host A -> its orphaned jobs running on B",
        recovery,
        note=f"{len(loss.orphans)} orphans, first after {first:.1f} s",
    )
    assert loss.settled_at is not None, f"not every task completed within {SETTLE_DEADLINE:g} s\n{world.logs()}"
    record(
        request.config,
        "hosts",
        "two_hosts",
        "kill -9 of host A -> all tasks completed",
        loss.settled_at - loss.killed_at,
    )

    # Every task completed once: files verified where the row says, in one host's folder only.
    rows = world.rows(loss.tasks)
    for task in loss.tasks:
        row = rows[task.id]
        assert row.status == COMPLETED, row
        assert row.bytes == task.size, row
        folders = [host.download_dir / str(task.id) for host in (a, b)]
        assert row.output_path in {str(folder) for folder in folders}, row
        assert [folder.is_dir() for folder in folders].count(True) == 1, f"task {task.id} in {folders}"
        for item in task.files:
            assert sha256_of(Path(str(row.output_path)) / item.rel) == item.sha256, f"task {task.id}: {item.rel}"
    for task in loss.orphans:
        assert rows[task.id].output_path == str(b.download_dir / str(task.id)), rows[task.id]
    assert [pid for pid in world.processing_ids() if pid != loss.probe.id] == [], "a task was left processing"

    # One verified download.completed webhook id per task.
    completed = world.completed_ids()
    for task in loss.tasks:
        assert len(completed[task.id]) == 1, f"task {task.id}: completed webhook ids {completed[task.id]}"

    # No file fetched in full twice: a fetch after A's death is a Range request, or A never got the whole file.
    for task in loss.tasks:
        for item in task.files:
            sent = world.origin.bytes_sent.get(item.url_path, 0)
            assert sent < 2 * item.size, f"task {task.id}: {item.rel}: {sent} bytes sent for {item.size}"
            after = [headers for at, headers in world.origin.timed.for_path(item.url_path) if at > loss.killed_at]
            full_again = [headers for headers in after if "Range" not in headers]
            if full_again and task in loss.orphans:
                assert loss.sent_at_kill.get(item.url_path, 0) < item.size, (
                    f"task {task.id}: A had fetched {item.rel} whole, and B fetched it in full again"
                )

    # rq info (root namespace): B's workers, and none of A's once their keys expired.
    assert set(loss.rq_after) == {f"{b.worker_prefix}{n}" for n in (1, 2)}, loss.rq_after


def test_a_retry_fires_after_the_host_holding_the_scheduler_died(host_loss: HostLoss) -> None:
    """After A died holding RQ's scheduler locks (and they expired), a VIP task whose first fetch
    fails transiently on B is retried RETRY_DELAY (1 s) later and completes within PROBE_WINDOW."""
    loss = host_loss
    a = loss.world.a
    assert all(host == a.hostname for host in loss.schedulers_before.values()), loss.schedulers_before
    assert loss.probe_paid_at is not None, "A's scheduler locks never expired"
    probe = loss.world.rows([loss.probe])[loss.probe.id]
    assert probe.attempts == 2 or loss.probe_done_at is None, f"the probe's first fetch did not fail: {probe}"
    took = (loss.probe_done_at or time.monotonic()) - loss.probe_paid_at
    scheduled = loss.world.redis.zrange("rq:scheduled:downloads-high", 0, -1)
    assert loss.probe_done_at is not None and took <= PROBE_WINDOW, (
        f"the probe's retry had not run {took:.0f} s after it was scheduled; scheduler locks when paid: "
        f"{loss.schedulers_at_probe}, now: {scheduler_hosts(loss.world)}; scheduled: {scheduled}"
    )
