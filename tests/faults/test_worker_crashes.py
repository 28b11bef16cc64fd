"""Crashed work: kill -9 of a worker, of its work horse, or of both, mid-download; a poison task;
a second run of a task that is already running.

Workers are started with the real start_workers.sh (or `udemy-dl pool` where the scenario is
about the pool); RECONCILE_INTERVAL keeps its default (300 s) in the kill scenarios, so recovery
is shown not to wait for the database sweep.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from rq import Queue, Retry

from tests.support.faults import Faults
from tests.support.processes import pid_running
from tests.support.waiting import wait_for

MIB = 1024 * 1024
FILE_SIZE = 6 * MIB
THROTTLE = 1.5 * MIB
"""Bytes per second per response: each file takes about 4 s, time enough to be caught mid-way."""

RECOVERY_LIMIT = 120.0
"""Issue 4: a killed worker's job runs again within 120 s (stretch goal 30 s)."""


def _kill_mid_download(faults: Faults, measure: Callable[..., float], victims: str) -> None:
    """Three paid tasks on four workers; one run is killed mid-download (*victims*: worker, horse
    or both); the job must run again (resuming with a Range request) within RECOVERY_LIMIT."""
    tasks = faults.make_tasks(3, FILE_SIZE)
    faults.origin.throttle = THROTTLE
    faults.start_workers(4)
    faults.pay(tasks)
    victim = tasks[0]
    faults.wait_under_way(victim, fraction=0.2)
    worker_pid, horse_pid = faults.runner(victim)

    killed_at = time.monotonic()
    if victims in ("worker", "both"):
        os.kill(worker_pid, signal.SIGKILL)
    if victims in ("horse", "both"):
        os.kill(horse_pid, signal.SIGKILL)
    wait_for(lambda: not pid_running(horse_pid), timeout=10, what="the work horse to die")
    if victims == "worker":
        died = time.monotonic() - killed_at
        assert died < 5, f"the horse outlived its worker by {died:.1f} s (PR_SET_PDEATHSIG)"
    if victims == "horse":
        assert pid_running(worker_pid), "the worker survives its horse"
    bytes_before = faults.part_bytes(victim)
    assert 0 < bytes_before < victim.size, "killed mid-way"

    resumed_at = faults.wait_resumed(victim, killed_at, timeout=RECOVERY_LIMIT + 30)
    recovery = measure("kill -9 -> job running again", resumed_at - killed_at, limit=RECOVERY_LIMIT)
    assert recovery <= RECOVERY_LIMIT

    faults.assert_outcome(tasks)
    (_, first), (_, second) = faults.origin.timed.for_path(victim.files[0].url_path)
    assert "Range" not in first and second.get("Range", "").startswith("bytes="), second
    assert faults.row(victim).attempts == 2, "the killed run used one attempt, the resumed run another"


def test_kill_worker_mid_download(faults: Faults, measure: Callable[..., float]) -> None:
    """kill -9 of the worker's main process: its horse dies with it (PR_SET_PDEATHSIG); the
    reconciler started by start_workers.sh sees the dead worker and enqueues the job again."""
    _kill_mid_download(faults, measure, "worker")


def test_kill_horse_mid_download(faults: Faults, measure: Callable[..., float]) -> None:
    """kill -9 of the work horse only: RQ's worker sees it die and retries after RETRY_DELAY."""
    _kill_mid_download(faults, measure, "horse")


def test_kill_worker_and_horse_mid_download(faults: Faults, measure: Callable[..., float]) -> None:
    """kill -9 of both the worker and its horse (as the OOM killer might): the reconciler recovers it."""
    _kill_mid_download(faults, measure, "both")


# -- a poison task ----------------------------------------------------------------------------

POISON_FETCHER = '''\
"""FETCH_COMMAND of the poison scenario: a poison course kills the work horse; others are fetched."""
import json, os, shutil, signal, sys, urllib.request

url, dest = sys.argv[1], sys.argv[2]
if "/courses/poison" in url:
    os.kill(os.getppid(), signal.SIGKILL)  # the work horse dies, as if the task had exhausted its memory
    sys.exit(1)
headers = {"Authorization": "Bearer " + os.environ.get("CONTENT_TOKEN", "")}
def get(target):
    return urllib.request.urlopen(urllib.request.Request(target, headers=headers), timeout=30)
with get(url) as response:
    manifest = json.load(response)
origin = url.split("/courses/", 1)[0]
for entry in manifest["files"]:
    with get(origin + entry["url"]) as response, open(os.path.join(dest, entry["path"]), "wb") as out:
        shutil.copyfileobj(response, out)
'''


def test_poison_task_fails_after_max_attempts(faults: Faults, measure: Callable[..., float]) -> None:
    """A task that kills its work horse every time ends `failed` after MAX_ATTEMPTS=3 with a clear
    reason and a download.failed webhook, while good tasks complete on the same pool, whose workers
    all survive.

    FETCH_COMMAND applies to every task of a pool, so the pool runs a small fetcher that SIGKILLs
    its parent (the work horse) for the poison course and fetches any other course itself.
    """
    faults.use_fetch_command(POISON_FETCHER, MAX_ATTEMPTS="3", RECONCILE_INTERVAL="5")
    poison = faults.make_tasks(1, 64 * 1024, prefix="poison")
    good = faults.make_tasks(3, 2 * MIB)
    pool = faults.start_pool(2)
    workers = faults.pool_workers(pool)

    paid_at = time.monotonic()
    faults.pay([*poison, *good])
    faults.assert_outcome(completed=good, failed=poison, settle_timeout=120)
    measure("paid -> poison task failed", time.monotonic() - paid_at, note="3 attempts, each killed its horse")

    row = faults.row(poison[0])
    assert row.attempts == 3, row
    assert row.error_message and "no attempts left" in row.error_message, row.error_message
    assert faults.log_text().count("Work-horse terminated unexpectedly") >= 3
    assert pool.process.poll() is None, "the pool survived"
    assert faults.pool_workers(pool) == workers, "every worker survived its horses' deaths"


# -- never two runs of one task at once ---------------------------------------------------------


def test_second_run_steps_aside(faults: Faults) -> None:
    """A second job for a task already running (enqueued past the producer's dedup) finds the
    task's lease taken and steps aside (LeaseBusyError, retried later, then finds the task
    completed): one fetch, one completion, one webhook, no attempt used by the second run."""
    (task,) = faults.make_tasks(1, 2 * FILE_SIZE)  # about 8 s: the second run comes while the first runs
    faults.origin.throttle = THROTTLE
    faults.start_workers(2)
    faults.pay([task])
    faults.wait_under_way(task, fraction=0.05)

    payload = {"taskId": task.id, "email": faults.row(task).email, "courseUrl": task.course_url}
    duplicate = Queue("downloads", connection=faults.redis).enqueue(
        "udemy_dl.worker_rq.process_download",
        payload,
        job_id=f"dup-{task.id}",
        retry=Retry(max=4, interval=[1, 2, 4, 8]),
    )
    wait_for(lambda: "LeaseBusyError" in faults.log_text(), timeout=30, what=lambda: f"the step-aside\n{faults.logs()}")
    assert faults.job_started(task), "the first run is still at it"

    faults.assert_outcome([task])
    requests = faults.origin.timed.for_path(task.files[0].url_path)
    assert len(requests) == 1, f"the file was requested {len(requests)} times"
    assert faults.row(task).attempts == 1, "the second run used no attempt"

    def dup_done() -> str:
        status = duplicate.get_status(refresh=True)
        return status if status in ("finished", "failed") else ""

    assert wait_for(dup_done, timeout=30, what="the duplicate job to end") == "finished"
    result = duplicate.return_value(refresh=True)
    assert result is not None and result.get("skipped") is True, result
