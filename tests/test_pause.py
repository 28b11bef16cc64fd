"""Pause and resume on real Redis, MariaDB and real worker processes: `rq suspend` (RQ's own command
line) and `udemy-dl pause [--queue Q]` hold a worker already blocked on its queues, running tasks
finish, `health`, `stats` and /metrics say so, and a resume lets the held tasks complete."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from redis import Redis
from rq import Queue, Worker
from rq.job import JobStatus

from tests.support.processes import LoggedProcess
from tests.support.scripts import run_cli, run_rq
from tests.support.service import Service
from tests.support.waiting import holds_for, wait_for
from udemy_dl import defaults
from udemy_dl.metrics import render_latest
from udemy_dl.store import COMPLETED, PROCESSING

HELD_FOR = 3.0
"""Seconds a held task is watched not starting (a deadline on a negative)."""


def worker_log(worker: LoggedProcess) -> Callable[[], str]:
    return lambda: f"worker log:\n{worker.log()}"


def blocked_on_its_queues(redis: Redis) -> bool:
    """A client of this test's Redis database waits in BLPOP: the idle worker's dequeue."""
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    clients: list[dict[str, object]] = redis.client_list()  # type: ignore[assignment]
    return any(client.get("cmd") == "blpop" and str(client.get("db")) == str(db) for client in clients)


def still_waiting(svc: Service, task_id: int) -> bool:
    """The task has not started: its job is queued in its queue, and no attempt is counted.
    (A worker blocked on the queue when the pause came pops the job and puts it back at once.)"""
    job = svc.job(task_id)
    row = svc.row(task_id)
    return (
        job.get_status(refresh=True) == JobStatus.QUEUED
        and job.id in Queue(job.origin, connection=svc.redis).job_ids
        and (row.status, row.attempts) == (PROCESSING, 0)
    )


def held(svc: Service, task_id: int, worker: LoggedProcess) -> None:
    """The task is back in its queue (if a blocked worker had popped it), and stays there."""
    wait_for(lambda: still_waiting(svc, task_id), timeout=5, what=worker_log(worker))
    holds_for(lambda: still_waiting(svc, task_id), HELD_FOR, what=worker_log(worker))


def paused_gauge(svc: Service) -> dict[str, float]:
    body, _ = render_latest(svc.settings, svc.redis)
    gauge = {}
    for line in body.decode().splitlines():
        if line.startswith("udemy_dl_paused{"):
            labels, value = line.rsplit(" ", 1)
            gauge[labels.split('queue="', 1)[1].split('"', 1)[0]] = float(value)
    return gauge


def test_rq_suspend_holds_an_idle_worker_already_blocked_on_its_queue(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """After `rq suspend`, a task confirmed while a worker waits in BLPOP does not start; `health`
    (exit 0) and `stats` say paused, the gauge is 1 for every queue; after `rq resume` it completes."""
    worker = start_worker()
    wait_for(lambda: blocked_on_its_queues(svc.redis), timeout=20, what=worker_log(worker))
    suspended = run_rq("suspend", "--url", svc.settings.redis_url)
    assert suspended.returncode == 0, suspended.stderr

    task_id = svc.confirm(svc.origin.add_course("held", {"a.bin": 1000}))

    held(svc, task_id, worker)
    health = run_cli("health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert "healthy" in health.stdout and "paused: every queue" in health.stdout, health.stdout
    stats = run_cli("stats", "--json")
    assert json.loads(stats.stdout)["paused"] == {"all": True, "queues": ["webhooks", "downloads-high", "downloads"]}
    assert "PAUSED" in run_cli("stats").stdout
    assert paused_gauge(svc) == {"downloads-high": 1.0, "downloads": 1.0, "webhooks": 1.0}
    assert "paused; job download-" in worker.log()

    resumed = run_rq("resume", "--url", svc.settings.redis_url)
    assert resumed.returncode == 0, resumed.stderr
    wait_for(lambda: svc.row(task_id).status == COMPLETED, timeout=30, what=worker_log(worker))
    assert svc.row(task_id).attempts == 1
    assert "paused" not in run_cli("health").stdout
    assert paused_gauge(svc) == {"downloads-high": 0.0, "downloads": 0.0, "webhooks": 0.0}


def test_an_idle_worker_shows_a_pause_without_waiting_for_a_task(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """With nothing queued, `udemy-dl pause` turns an idle worker `suspended` in `rq info` within a dequeue
    timeout or two, and `resume` turns it back to `idle`: the operator sees the pause took hold."""
    worker = start_worker()
    key = Worker.redis_worker_namespace_prefix + worker.name

    def state() -> str:
        raw = svc.redis.hget(key, "state")
        return raw.decode() if isinstance(raw, bytes) else ""

    wait_for(lambda: state() == "idle", timeout=20, what=worker_log(worker))
    assert run_cli("pause").returncode == 0
    within = 2 * defaults.WORKER_HEARTBEAT + 2
    wait_for(lambda: state() == "suspended", timeout=within, what=lambda: f"{state()}\n{worker.log()}")
    info = run_rq("info", "--url", svc.settings.redis_url, "-W").stdout
    assert re.search(rf"{worker.name} \(.*\): suspended", info), info
    assert run_cli("resume").returncode == 0
    wait_for(lambda: state() == "idle", timeout=within, what=lambda: f"{state()}\n{worker.log()}")


def test_pause_lets_a_running_task_finish_and_starts_no_other(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """`udemy-dl pause` while a download runs: it finishes, and the next task waits for `resume`."""
    svc.origin.throttle = 500_000  # bytes/s: the first download runs about two seconds
    first = svc.confirm(svc.origin.add_course("running", {"a.bin": 1_000_000}))
    worker = start_worker()
    wait_for(lambda: svc.job(first).get_status(refresh=True) == JobStatus.STARTED, timeout=20, what=worker_log(worker))

    paused = run_cli("pause")
    second = svc.confirm(svc.origin.add_course("next", {"a.bin": 1000}))

    assert paused.returncode == 0 and "paused: every queue" in paused.stdout, paused.stdout + paused.stderr
    wait_for(lambda: svc.row(first).status == COMPLETED, timeout=30, what=worker_log(worker))
    held(svc, second, worker)
    assert run_cli("resume").stdout.strip() == "resumed: every queue"
    wait_for(lambda: svc.row(second).status == COMPLETED, timeout=30, what=worker_log(worker))


def test_pausing_one_queue_holds_only_that_queue(svc: Service, start_worker: Callable[..., LoggedProcess]) -> None:
    """`pause --queue downloads`: a VIP task completes, a normal one waits until `resume --queue downloads`."""
    worker = start_worker()
    wait_for(lambda: blocked_on_its_queues(svc.redis), timeout=20, what=worker_log(worker))
    paused = run_cli("pause", "--queue", "downloads")
    assert paused.returncode == 0 and "paused: queue(s) downloads" in paused.stdout, paused.stdout + paused.stderr

    normal = svc.confirm(svc.origin.add_course("normal", {"a.bin": 1000}))
    vip = svc.store.insert_task("vip@shop.example", svc.origin.add_course("vip", {"a.bin": 1000}), "pending")
    assert svc.producer().confirm_payment([vip], priority="high").enqueued == [vip]

    wait_for(lambda: svc.row(vip).status == COMPLETED, timeout=30, what=worker_log(worker))
    held(svc, normal, worker)
    assert paused_gauge(svc) == {"downloads-high": 0.0, "downloads": 1.0, "webhooks": 0.0}
    assert "paused: queue(s) downloads" in run_cli("health").stdout

    assert run_cli("resume", "--queue", "downloads").returncode == 0
    wait_for(lambda: svc.row(normal).status == COMPLETED, timeout=30, what=worker_log(worker))


def test_pause_of_an_unknown_queue_names_it_and_pauses_nothing(svc: Service) -> None:
    result = run_cli("pause", "--queue", "downlods")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'downlods'" in result.stderr and "downloads" in result.stderr
    assert set(paused_gauge(svc).values()) == {0.0}
