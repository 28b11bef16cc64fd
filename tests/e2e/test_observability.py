"""What an operator sees is true: a dead worker leaves every count, a task's history is one grep
away, and `pgrep -f "rq worker"` finds every worker and work horse by name and task."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from dev.devservers import write_sample_file
from tests.support.deployment import Scripts
from tests.support.e2e import HOSTNAME, E2EEnv, host_workers, worker_gauge, worker_titles
from tests.support.http_servers import Origin
from tests.support.processes import descendants, pid_running, work_horses
from tests.support.scripts import rq_info_workers
from tests.support.waiting import wait_for
from udemy_dl.store import COMPLETED, MySQLStore

pytestmark = pytest.mark.e2e

DEATH_NOTICED = 30
"""Seconds within which every count must drop a worker killed with SIGKILL (the issue's promise)."""


def _stop_reconciler(env: E2EEnv) -> None:
    """The reconciler retires this host's dead workers itself: the counts must not need it."""
    pid = int((env.pid_dir / "reconciler.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_running(pid), timeout=20, what="the reconciler to stop")


def _counts(env: E2EEnv) -> dict[str, object]:
    """The live workers as each tool an operator has reports them."""
    health = env.cli("health")
    stats = env.cli("stats", "--json")
    metrics = env.cli("metrics")
    assert stats.returncode == 0 and metrics.returncode == 0, stats.stderr + metrics.stderr
    return {
        "health": health.stdout.strip().splitlines()[-1],  # after any WARNING line (a low disk)
        "stats": json.loads(stats.stdout)["queue"]["workers"],
        "metrics": worker_gauge(metrics.stdout),
        "rq info": host_workers(env.rq_info()),
    }


def test_a_force_killed_worker_leaves_every_count_within_30_s(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    """A frozen worker SIGKILLed (as stop_workers.sh's force path does) never unregisters. Without the
    reconciler, `health`, `stats --json`, the metrics' worker gauge and `rq info` (which cleans RQ's
    registries as it reads them) all stop counting it within 30 s, and go on counting its peer."""
    started = e2e_scripts.start(WORKER_COUNT="2")
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    pids = e2e_scripts.pids()
    _stop_reconciler(e2e_env)
    names = {number: f"udemy-dl.{HOSTNAME}.{number}" for number in pids}
    both = {
        "health": "healthy: redis ok, database ok, 2 worker(s)",
        "stats": 2,
        "metrics": 2,
        "rq info": {names[n]: pid for n, pid in pids.items()},
    }
    wait_for(lambda: _counts(e2e_env) == both, timeout=20, interval=0.5, what=lambda: f"{_counts(e2e_env)}")

    victim = pids[1]
    family = [victim, *descendants(victim)]  # its RQ scheduler
    os.kill(victim, signal.SIGSTOP)
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    one = {
        "health": "healthy: redis ok, database ok, 1 worker(s)",
        "stats": 1,
        "metrics": 1,
        "rq info": {names[2]: pids[2]},
    }
    seen: list[dict[str, object]] = []

    def agree() -> bool:
        seen.append(_counts(e2e_env))
        return seen[-1] == one

    wait_for(agree, timeout=DEATH_NOTICED + 10, interval=0.5, what=lambda: f"every count to drop it: {seen[-3:]}")
    assert time.monotonic() - killed <= DEATH_NOTICED + 10


def test_titles_follow_the_task_and_every_line_about_it_names_it(
    e2e_env: E2EEnv, e2e_scripts: Scripts, e2e_store: MySQLStore, token_origin: Origin
) -> None:
    """`pgrep -f "rq worker"` finds every worker, titled with its name and state, and the work horse
    titled with the task it runs, back to idle after it. A download handed back by a stop and then
    completed leaves a log in which every line naming the task carries `task <id>:`, the hand-back
    its own line, and RQ's "Successfully completed" only for the run that completed."""
    url_path = "/files/titled/lecture.mp4"
    write_sample_file(token_origin.file_path(url_path), 12 * 1024 * 1024, "titled")
    token_origin.throttle = 2 * 1024 * 1024  # about 6 s for the file
    task_id = e2e_store.insert_task("buyer@example.com", f"{token_origin.base_url}{url_path}")
    e2e_env.vars.update(STOP_TIMEOUT="20")
    started = e2e_scripts.start(WORKER_COUNT="2")
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    pids = e2e_scripts.pids()
    names = {f"udemy-dl.{HOSTNAME}.{n}": pid for n, pid in pids.items()}
    idle = {name: [(pid, "idle")] for name, pid in names.items()}
    wait_for(lambda: worker_titles(e2e_env.run_id) == idle, timeout=15, what=lambda: f"{worker_titles(e2e_env.run_id)}")

    assert e2e_env.cli("confirm-payment", str(task_id)).returncode == 0
    wait_for(lambda: (row := e2e_store.get(task_id)) is not None and row.progress > 0, timeout=30, what="progress")
    titles = worker_titles(e2e_env.run_id)
    busy = next(name for name, found in titles.items() if len(found) == 2)
    horse = work_horses(names[busy])
    assert len(horse) == 1, (titles, horse)
    label = f"task {task_id} (downloads)"
    assert sorted(titles[busy]) == sorted(
        [(names[busy], f"busy {label}, horse {horse[0]}"), (horse[0], f"horse {label}")]
    )
    assert [state for name, found in titles.items() if name != busy for _, state in found] == ["idle"]

    stopped = e2e_scripts.stop()  # hands the download back
    assert stopped.returncode == 0 and "killed" not in stopped.stdout, stopped.stdout + stopped.stderr
    token_origin.throttle = None
    restarted = e2e_scripts.start(WORKER_COUNT="1")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    wait_for(lambda: (row := e2e_store.get(task_id)) is not None and row.status == COMPLETED, timeout=30, what="done")
    worker = e2e_scripts.pids()[1]

    def back_to_idle() -> bool:
        horses = work_horses(worker)
        expected = {f"udemy-dl.{HOSTNAME}.1": sorted([(worker, "idle"), *((pid, "horse idle") for pid in horses)])}
        return {name: sorted(found) for name, found in worker_titles(e2e_env.run_id).items()} == expected

    wait_for(back_to_idle, timeout=15, what=lambda: f"idle titles: {worker_titles(e2e_env.run_id)}")

    logs = e2e_env.logs(tail=10_000_000)
    about = re.compile(rf"\b(download-{task_id}|task {task_id}|msg_{task_id}_)\b")
    lines = [line for line in logs.splitlines() if about.search(line)]
    unlabelled = [line for line in lines if f"task {task_id}:" not in line]
    assert lines and not unlabelled, "\n".join(unlabelled)
    assert sum("handed back to the front of downloads" in line for line in lines) == 1, logs
    assert sum("Successfully completed" in line and "download task" in line for line in lines) == 1, logs


def test_pgrep_finds_the_pools_workers_by_name(e2e_env: E2EEnv, tmp_path: Path) -> None:
    """Under the systemd unit's `udemy-dl pool`, too, `pgrep -f "rq worker"` lists every worker, by the
    name `rq info` shows, idle: the pool's own processes and nothing else."""
    pool = e2e_env.launch_pool(2, tmp_path / "pool.log")
    try:

        def titled() -> dict[str, list[tuple[int, str]]]:
            assert pool.process.poll() is None, pool.log()
            found = worker_titles(e2e_env.run_id)
            return found if len(found) == 2 and all(state == "idle" for f in found.values() for _, state in f) else {}

        found = wait_for(titled, timeout=30, interval=0.3, what=lambda: f"{worker_titles(e2e_env.run_id)}")
        pids = {pid for listed in found.values() for pid, _ in listed}
        assert len(pids) == 2 and pids <= set(descendants(pool.pid)), (found, descendants(pool.pid))
        listed = {name: pid for name, host, pid in rq_info_workers(e2e_env.rq_info()) if host == HOSTNAME}
        assert {name: pid for name, [(pid, _)] in found.items()} == listed
    finally:
        pool.stop()
    assert pool.process.returncode == 0, pool.log()
    assert worker_titles(e2e_env.run_id) == {}
