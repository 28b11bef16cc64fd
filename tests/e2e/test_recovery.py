"""Crashes: the pool replaces a killed worker; a task whose worker was killed mid-download still completes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus

from tests.support.deployment import Scripts
from tests.support.e2e import E2EEnv
from tests.support.files import sha256_of
from tests.support.http_servers import Origin, completed_ids
from tests.support.processes import (
    cmdline,
    descendants,
    kill,
    kill_pids,
    kill_tree,
    pid_running,
    proc_state,
    work_horses,
)
from tests.support.rq_state import live_workers
from tests.support.waiting import wait_for
from udemy_dl.store import COMPLETED, PROCESSING, MySQLStore
from udemy_dl.webhooks import FAILED as EVENT_FAILED

pytestmark = pytest.mark.e2e


# -- the pool (how the systemd unit runs the workers) -------------------------------------------


@pytest.fixture
def e2e_pool(e2e_env: E2EEnv, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`udemy-dl pool --count 2` in its own process group; killed with its group at teardown if still there."""
    pool = e2e_env.launch_pool(2, tmp_path / "pool.log")
    yield pool.process
    if pool.process.poll() is None:
        kill_pids(descendants(pool.pid))
        pool.kill()


def test_pool_replaces_dead_worker(e2e_env: E2EEnv, e2e_redis: Redis, e2e_pool: subprocess.Popen[bytes]) -> None:
    def pool_log() -> str:
        return (e2e_env.tmp / "pool.log").read_text(errors="replace")[-4000:]

    def two_live() -> dict[str, int]:
        assert e2e_pool.poll() is None, f"the pool exited with {e2e_pool.returncode}:\n{pool_log()}"
        live = live_workers(e2e_redis)
        return live if len(live) == 2 else {}

    first = wait_for(two_live, timeout=30, what="the pool's 2 workers to register", interval=0.1)
    pool_children = set(descendants(e2e_pool.pid))
    assert set(first.values()) <= pool_children, "the registered workers are the pool's own processes"

    victim_name, victim_pid = sorted(first.items())[0]
    victim_family = descendants(victim_pid)
    os.kill(victim_pid, signal.SIGKILL)

    def replaced() -> dict[str, int]:
        live = two_live()
        return live if victim_name not in live and victim_pid not in live.values() else {}

    second = wait_for(replaced, timeout=30, what="the pool to replace the killed worker", interval=0.1)
    survivor = next(name for name in first if name != victim_name)
    assert survivor in second and second[survivor] == first[survivor]
    assert all(pid_running(pid) for pid in second.values())

    # The unit stops the pool with SIGTERM to the main process alone (KillMode=mixed).
    e2e_pool.send_signal(signal.SIGTERM)
    try:
        code = e2e_pool.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the pool did not exit within 15 s of SIGTERM:\n{pool_log()}")
    assert code == 0, pool_log()
    wait_for(
        lambda: not any(pid_running(pid) for pid in second.values()),
        timeout=5,
        what="the workers to exit",
        interval=0.1,
    )
    assert live_workers(e2e_redis) == {}
    # Nothing of the pool is left but, at most, what the killed worker had forked: RQ's scheduler
    # child of a SIGKILLed worker is orphaned and lives on (the unit's KillMode=mixed SIGKILLs it at stop).
    left = set(e2e_env.leftover_processes())
    assert left <= set(victim_family), [(pid, cmdline(pid)) for pid in left]
    lingering = [w for w in Worker.all(connection=e2e_redis) if w.name != victim_name]
    assert not lingering, (
        "stopped workers deregister: "
        + repr([(w.name, w.pid, w.death_date, e2e_redis.hgetall(w.key)) for w in lingering])
        + "\n"
        + pool_log()
    )


# -- a worker killed mid-download ---------------------------------------------------------------

BIG = 30 * 1024 * 1024


def _slow_big_course(origin: Origin, slug: str, name: str) -> tuple[str, str, str]:
    """A course of one 30 MiB file *name*, served at 10 MiB/s (about 3 s: time enough to interrupt it).
    Returns the course URL, the file's URL path and its sha256."""
    url = origin.add_course(slug, {name: BIG})
    (entry,) = origin.manifests[f"/courses/{slug}"]["files"]
    origin.throttle = 10 * 1024 * 1024
    return url, entry["url"], entry["sha256"]


def test_killed_worker_task_is_recovered_on_restart(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    store, origin, receiver = e2e_env.store, e2e_env.origin, e2e_env.receiver
    size = BIG
    course_url, url_path, sha = _slow_big_course(origin, "long-course", "full-course.mp4")
    task_id = store.insert_task("buyer@example.com", course_url)

    e2e_env.vars["WORKER_COUNT"] = "1"
    started = e2e_scripts.start(adopt=True)
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    (worker_pid,) = e2e_scripts.pids().values()

    paid = e2e_env.cli("confirm-payment", "--json", str(task_id))
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert json.loads(paid.stdout)["enqueued"] == [task_id]

    # Caught mid-download: bytes in a .part file in the task's staging folder, progress recorded.
    staging = e2e_env.download_dir / ".staging" / str(task_id)

    def mid_download() -> bool:
        row = store.get(task_id)
        parts = list(staging.rglob("*.part")) if staging.is_dir() else []
        return bool(row and row.progress > 0 and parts and parts[0].stat().st_size > 0)

    wait_for(mid_download, timeout=30, what="the download to be under way", interval=0.05)

    # kill -9 the worker, then its horse (and scheduler): no chance to clean up or hand back.
    doomed = kill_tree(worker_pid)
    assert len(doomed) >= 2, "the worker had forked a work horse for the job"
    # Reaped, as a working init would (see test_restart_while_killed_worker_is_a_zombie for when it is not).
    e2e_scripts.reap(worker_pid)
    wait_for(lambda: not any(pid_running(pid) for pid in doomed), timeout=10, what="the kill", interval=0.1)
    row = store.get(task_id)
    assert row is not None and row.status == PROCESSING, "the kill leaves the task processing"
    assert row.attempts == 1
    assert 0 < origin.bytes_sent.get(url_path, 0) < size, "killed mid-way"

    # The next start finds the stale PID file and starts a fresh worker. The task goes back on the
    # queue through the reconciler (still running, it notices the dead worker) or the start's own
    # reconcile pass, whichever comes first.
    restarted = e2e_scripts.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + e2e_env.logs()
    assert "worker 1 already running" not in restarted.stdout

    def completed() -> bool:
        current = store.get(task_id)
        return bool(current and current.status == COMPLETED)

    try:
        wait_for(completed, timeout=40, what="the interrupted task to complete", interval=0.2)
    except AssertionError:
        raise AssertionError(f"{store.get(task_id)}\n{restarted.stdout}\n{e2e_env.logs()}") from None

    row = store.get(task_id)
    assert row is not None
    folder = e2e_env.download_dir / str(task_id)
    assert row.output_path == str(folder) and row.bytes == size and row.progress == 100
    assert row.attempts == 2
    assert sha256_of(folder / "full-course.mp4") == sha
    record = json.loads((folder / "manifest.json").read_text())
    assert record["files"] == [{"path": "full-course.mp4", "size": size, "sha256": sha}]
    assert sorted(p.name for p in folder.iterdir()) == ["full-course.mp4", "manifest.json"]
    assert not staging.exists()

    # The second attempt resumed where the first stopped (a Range request), not from byte 0.
    file_requests = [headers for _, path, headers in origin.requests.entries if path == url_path]
    assert len(file_requests) == 2
    assert "Range" not in file_requests[0]
    resumed_at = re.fullmatch(r"bytes=(\d+)-", file_requests[1].get("Range", ""))
    assert resumed_at is not None and 0 < int(resumed_at.group(1)) < size, file_requests[1]

    wait_for(lambda: task_id in completed_ids(receiver), timeout=20, what="the completed webhook", interval=0.1)
    assert len(completed_ids(receiver)[task_id]) == 1
    assert not [item for item in receiver.received if item.event_type == EVENT_FAILED]

    stopped = e2e_scripts.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert e2e_env.leftover_processes() == []


# -- what a kill -9 leaves behind -----------------------------------------------------------------


def test_restart_while_killed_worker_is_a_zombie(e2e_env: E2EEnv, e2e_scripts: Scripts, e2e_redis: Redis) -> None:
    e2e_env.vars["WORKER_COUNT"] = "1"
    # Adopt the worker when start_workers.sh exits, so that we, not init, decide when it is reaped:
    # the situation under a PID 1 that reaps late or never (`sleep infinity`, many container images).
    started = e2e_scripts.start(adopt=True)
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    (worker_pid,) = e2e_scripts.pids().values()
    assert worker_pid in e2e_scripts.adopted
    kill_tree(worker_pid)
    wait_for(lambda: proc_state(worker_pid) == "Z", timeout=10, what="the worker to be a zombie", interval=0.1)

    restarted = e2e_scripts.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    (new_pid,) = e2e_scripts.pids().values()
    assert new_pid != worker_pid and pid_running(new_pid)
    assert set(live_workers(e2e_redis).values()) == {new_pid}


def test_kill9_worker_leaves_nothing_running_after_stop(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    e2e_env.vars["WORKER_COUNT"] = "1"
    started = e2e_scripts.start(adopt=True)
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    (worker_pid,) = e2e_scripts.pids().values()
    children = wait_for(lambda: descendants(worker_pid), timeout=10, what="the worker's scheduler child", interval=0.1)

    # An operator (or the OOM killer) kills the worker process only.
    os.kill(worker_pid, signal.SIGKILL)
    e2e_scripts.reap(worker_pid)

    restarted = e2e_scripts.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + e2e_env.logs()
    stopped = e2e_scripts.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    left = e2e_env.leftover_processes()
    assert left == [], f"still running after stop_workers.sh: {[(pid, cmdline(pid)) for pid in left]}"
    assert not any(pid_running(pid) for pid in children)


def test_retry_scheduled_before_a_crash_runs_after_restart(
    e2e_env: E2EEnv,
    e2e_scripts: Scripts,
    e2e_store: MySQLStore,
    token_origin: Origin,
    e2e_redis: Redis,
) -> None:
    course_url, _, _ = _slow_big_course(token_origin, "retried", "lecture.mp4")
    task_id = e2e_store.insert_task("buyer@example.com", course_url)
    e2e_env.vars.update(WORKER_COUNT="1", RETRY_DELAY="4")
    started = e2e_scripts.start(adopt=True)
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    (worker_pid,) = e2e_scripts.pids().values()
    assert e2e_env.cli("confirm-payment", str(task_id)).returncode == 0

    # The work horse dies (say, the OOM killer): the worker schedules the retry, due in 4-5 s.
    def horse_at_work() -> list[int]:
        row = e2e_store.get(task_id)
        return work_horses(worker_pid) if row and row.progress > 0 else []

    (horse,) = wait_for(horse_at_work, timeout=30, what="the download to be under way", interval=0.05)
    kill(horse)

    def job_status() -> JobStatus:
        return Job.fetch(f"download-{task_id}", connection=e2e_redis).get_status()

    wait_for(lambda: job_status() == JobStatus.SCHEDULED, timeout=10, what="the retry to be scheduled", interval=0.1)

    # Before the retry is due, the worker (with its scheduler) is killed too, and restarted at once.
    family = kill_tree(worker_pid)
    e2e_scripts.reap(worker_pid)
    wait_for(lambda: not any(pid_running(pid) for pid in family), timeout=10, what="the kill", interval=0.1)
    assert job_status() == JobStatus.SCHEDULED
    restarted = e2e_scripts.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + e2e_env.logs()

    def completed() -> bool:
        row = e2e_store.get(task_id)
        return bool(row and row.status == COMPLETED)

    wait_for(completed, timeout=15, what="the retry that was due to run after the restart", interval=0.2)
