"""Crash and partition at every step boundary of a download (issue 8, "close the class").

Each case arms one named crash point of udemy_dl/crashpoints.py through the environment of the
pool it starts (UDEMY_DL_CRASH_AT, once per scenario thanks to a marker file), so the fault lands
exactly between two steps instead of where a timer happens to fall:

- the work horse killed (kill -9) at each step of `process_download`, with three attempts, and
  with one attempt at the steps reached once the files are complete;
- the worker killed with its horse at each step;
- the reconciler killed while it settles a task whose attempts are used up;
- Redis emptied at each step;
- a run cut off from Redis (a TCP relay in front of it) for longer than its lease;
- `udemy-dl reconcile` run with its clock two minutes ahead while a last attempt downloads.

Every case ends with one check (`_assert_once`): the task is `completed` with verified files and
exactly one final event id (or `failed` with one download.failed id where the origin's bytes
truly could not be had), nothing fetched in full twice, the outbox empty, no two runs at once.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.faults import Faults
from tests.support.http_servers import Task
from tests.support.processes import pid_running
from tests.support.relay import Relay
from tests.support.scripts import venv_bin
from tests.support.waiting import wait_for
from udemy_dl import crashpoints
from udemy_dl.crashpoints import (
    AFTER_ATTEMPT,
    AFTER_RECORD,
    FILES_COMPLETE_POINTS,
    FLUSH_REDIS,
    JOB_POINTS,
    KILL,
    KILL_WORKER,
    MID_FETCH,
    PAUSE,
    RECONCILER_LEASED,
    RECONCILER_SETTLED,
)
from udemy_dl.defaults import LEASE_TTL
from udemy_dl.folders import read_record
from udemy_dl.lease import lease_key
from udemy_dl.store import COMPLETED, FAILED, PROCESSING
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED

from .test_worker_crashes import POISON_FETCHER

MIB = 1024 * 1024
FILE_SIZE = 2 * MIB
FILES = 2
"""Two files of 2 MiB each, fetched at once, at every point but mid_fetch: there one file of
4 MiB, for the chunks that come before the kill may all be the other file's, and a file with no
byte on disk is rightly fetched again from its start."""

MID_FETCH_SKIP = 4
"""mid_fetch is reached at every chunk received: the kill comes at the fifth, with bytes on disk."""

SETTLE_TIMEOUT = 120.0
SKEW_DIR = Path(__file__).with_name("skew")
CLOCK_SKEW = 120


# -- arming a point, and the one outcome check ------------------------------------------------------


def _arm(faults: Faults, point: str, action: str = KILL) -> Path:
    """Arm *point* with *action* for every process started from now on; returns its marker file
    (created by the first process to reach the point)."""
    marker = faults.tmp / f"crash-{point}"
    faults.set_env(
        **{
            crashpoints.CRASH_AT: point,
            crashpoints.CRASH_MARKER: str(marker),
            crashpoints.CRASH_ACTION: action,
            crashpoints.CRASH_SKIP: str(MID_FETCH_SKIP if point == MID_FETCH else 0),
        }
    )
    return marker


def _wait_fired(faults: Faults, marker: Path, timeout: float = 60) -> None:
    wait_for(marker.exists, timeout=timeout, interval=0.05, what=lambda: f"crash point {marker.name}\n{faults.logs()}")


def _assert_once(faults: Faults, task: Task, status: str = COMPLETED, settle_timeout: float = SETTLE_TIMEOUT) -> None:
    """The outcome every crash-point case must reach.

    `completed`: verified files in place (sha256 of each matches the origin's), the record of the
    final folder lists them, none kept aside in FAILED_DIR, exactly one download.completed id and no
    download.failed; `failed`: exactly one download.failed id and no download.completed. Either way
    nothing was fetched in full twice, the payment service acknowledged the event (the outbox is
    empty, so nothing is left to be sent again under another id), and no two runs overlapped.
    """
    completed = status == COMPLETED
    try:
        faults.assert_outcome(
            completed=[task] if completed else [], failed=[] if completed else [task], settle_timeout=settle_timeout
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_evidence(faults, task)}") from exc
    wait_for(
        lambda: faults.row(task).pending_event is None,
        timeout=60,
        interval=0.2,
        what=lambda: f"task {task.id}: the final event to be acknowledged ({faults.row(task)})\n{faults.logs()}",
    )
    expected, other = (EVENT_COMPLETED, EVENT_FAILED) if completed else (EVENT_FAILED, EVENT_COMPLETED)
    ids = faults.event_ids(expected).get(task.id, set())
    assert len(ids) == 1, f"task {task.id}: {expected} ids {ids}"
    assert task.id not in faults.event_ids(other), f"task {task.id}: {other} sent too"
    kept = sorted((faults.tmp / "failed").glob(f"{task.id}-*"))
    if completed:
        record = read_record(faults.download_dir / str(task.id))
        assert record is not None, f"task {task.id}: no record in the final folder"
        listed = {(item["path"], item["sha256"]) for item in record["files"]}
        assert listed == {(item.rel, item.sha256) for item in task.files}, record
        assert not kept, f"task {task.id}: completed, yet files were kept aside as failed: {kept}"
    else:
        assert len(kept) == 1, f"task {task.id}: failed folders kept {kept}"
    spans = faults.run_spans(task)
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[1] < a[2]]
    assert not overlaps, f"two runs of task {task.id} at once (pid, start, end): {overlaps}\n{faults.logs()}"


def _evidence(faults: Faults, task: Task) -> str:
    """The origin's requests for the task's files and the task's log lines, for a failure message."""
    lines = [f"row: {faults.row(task)}"]
    for item in task.files:
        for at, headers in faults.origin.timed.for_path(item.url_path):
            lines.append(f"origin: {at:.2f} GET {item.url_path} Range={headers.get('Range', '-')}")
    lines += [line for line in faults.log_text().splitlines() if f"task {task.id}" in line or "crash point" in line]
    return "\n".join(lines[-80:])


def _one_task(faults: Faults, point: str) -> Task:
    """The paid order of a case that arms *point* (see FILES)."""
    if point == MID_FETCH:
        (task,) = faults.make_tasks(1, FILE_SIZE * FILES)
    else:
        (task,) = faults.make_tasks(1, FILE_SIZE, files=FILES)
    return task


# -- the work horse killed ------------------------------------------------------------------------


def _kill_at(faults: Faults, point: str, **settings: str) -> Task:
    """One task through a one-worker pool whose horse is killed at *point*; it must end completed once."""
    faults.set_env(**settings)
    marker = _arm(faults, point)
    task = _one_task(faults, point)
    faults.start_pool(1)
    faults.pay([task])
    _wait_fired(faults, marker)
    _assert_once(faults, task)
    return task


@pytest.mark.parametrize("point", JOB_POINTS)
def test_horse_killed_at_each_step(faults: Faults, point: str) -> None:
    """kill -9 of the work horse at each step boundary of a download, MAX_ATTEMPTS=3: RQ retries
    the job, and the task ends `completed` once, with verified files, one download.completed id, the
    bytes fetched once (a kill mid-fetch resumes with a Range request) and two attempts at most."""
    task = _kill_at(faults, point, RECONCILE_INTERVAL="5")
    assert "Work-horse terminated unexpectedly" in faults.log_text()
    assert faults.row(task).attempts <= 2, faults.row(task)


@pytest.mark.parametrize("point", FILES_COMPLETE_POINTS)
def test_horse_killed_on_last_attempt_after_the_files_are_complete(faults: Faults, point: str) -> None:
    """kill -9 of the work horse on its last attempt (MAX_ATTEMPTS=1) once every byte is fetched
    and verified (record written, folder moved into place, row marked, webhook queued): no retry
    comes, the reconciler's sweep finds the task, and it must end `completed`, never `failed`
    (issue 8 item 2: a finished download was marked failed and its files moved aside)."""
    task = _kill_at(faults, point, MAX_ATTEMPTS="1", RECONCILE_INTERVAL="5")
    assert faults.row(task).attempts == 1, faults.row(task)


# -- the worker killed ----------------------------------------------------------------------------


@pytest.mark.parametrize("point", JOB_POINTS)
def test_worker_killed_at_each_step(faults: Faults, point: str) -> None:
    """kill -9 of the worker (then of its horse) at each step boundary: the pool starts another
    worker, the reconciler sees the started job's worker is gone and enqueues it again, and the
    task ends `completed` once, the bytes fetched once, two attempts at most."""
    faults.set_env(RECONCILE_INTERVAL="5")
    marker = _arm(faults, point, KILL_WORKER)
    task = _one_task(faults, point)
    pool = faults.start_pool(1)
    before = faults.pool_workers(pool)
    faults.pay([task])
    _wait_fired(faults, marker)
    wait_for(
        lambda: not any(pid_running(pid) for pid in before.values()),
        timeout=15,
        what="the worker to die",
    )
    _assert_once(faults, task)
    assert faults.row(task).attempts <= 2, faults.row(task)
    assert pool.process.poll() is None, "the pool survived"


# -- the reconciler killed ------------------------------------------------------------------------


@pytest.mark.parametrize("point", (RECONCILER_LEASED, RECONCILER_SETTLED))
def test_reconciler_killed_settling_an_exhausted_task(faults: Faults, point: str) -> None:
    """A poison task kills its work horse on every attempt (MAX_ATTEMPTS=2); the reconciler's sweep
    settles it and is killed (kill -9) holding the task's lease, before or just after settling.
    The pool starts another reconciler, which takes the dead one's lease: the task ends `failed`
    once, with one download.failed id and its folder kept aside once."""
    faults.use_fetch_command(POISON_FETCHER, MAX_ATTEMPTS="2", RECONCILE_INTERVAL="5")
    marker = _arm(faults, point)
    (poison,) = faults.make_tasks(1, 64 * 1024, prefix="poison")
    pool = faults.start_pool(1)
    faults.pay([poison])
    _wait_fired(faults, marker, timeout=90)
    _assert_once(faults, poison, FAILED)
    row = faults.row(poison)
    assert row.attempts == 2, row
    assert row.error_message and "no attempts left" in row.error_message, row.error_message
    wait_for(
        lambda: re.search(r"reconciler \(pid \d+\) died; starting another", pool.log()),
        timeout=30,
        interval=0.2,
        what=lambda: f"the pool to start another reconciler\n{pool.log()}",
    )


# -- Redis emptied --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", JOB_POINTS)
def test_redis_emptied_at_each_step(faults: Faults, point: str) -> None:
    """Redis loses every key (FLUSHALL, as a restart without persistence) at each step boundary
    while the run goes on: the run takes its lease back, the reconciler sweeps after its grace, a
    final event whose delivery was lost is queued again under its own id; the task ends
    `completed` once, with one download.completed id, the bytes fetched once."""
    faults.set_env(RECONCILE_INTERVAL="5")
    marker = _arm(faults, point, FLUSH_REDIS)
    task = _one_task(faults, point)
    faults.start_pool(1)
    faults.pay([task])
    _wait_fired(faults, marker)
    _assert_once(faults, task)
    assert faults.row(task).attempts == 1, faults.row(task)


def test_redis_emptied_under_a_last_attempt_then_a_sweep(faults: Faults) -> None:
    """Redis loses every key just after a last attempt (MAX_ATTEMPTS=1) was counted, and the run
    goes on (paused there) until it has taken its lease back; a sweep then finds the task
    `processing` with its attempts used up and no job in Redis. A run that holds (or retakes) its
    lease must not be settled from under it: the task ends `completed` once (issue 8 item 16)."""
    faults.set_env(MAX_ATTEMPTS="1", RECONCILE_INTERVAL="5")
    marker = _arm(faults, AFTER_ATTEMPT, f"{FLUSH_REDIS},{PAUSE}")
    task = _one_task(faults, AFTER_ATTEMPT)
    faults.start_pool(1)
    faults.pay([task])
    _wait_fired(faults, marker)
    wait_for(
        lambda: faults.redis.exists(lease_key(task.id)),
        timeout=LEASE_TTL,
        interval=0.1,
        what=lambda: f"the run to take its lease back\n{faults.logs()}",
    )
    assert faults.job(task) is None, "Redis lost the task's job"
    swept = faults.cli("reconcile")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    print(f"[faults] after the flush: udemy-dl reconcile: {swept.stdout.strip()}")
    assert faults.row(task).status == PROCESSING, f"the sweep settled a running task: {faults.row(task)}"
    Path(f"{marker}{crashpoints.GO_SUFFIX}").touch()
    _assert_once(faults, task)
    assert faults.row(task).attempts == 1, faults.row(task)


# -- a run cut off from Redis for longer than its lease ----------------------------------------------


def test_run_cut_off_from_redis_past_its_lease_moves_nothing_into_place(faults: Faults) -> None:
    """A run whose files are fetched and recorded (paused at after_record) is cut off from Redis
    (the pool reaches Redis through a relay, which is cut) until its lease has expired in Redis,
    and another run (on another host) holds the lease then. Let go, the cut-off run cannot confirm
    its lease: it must not move the files into place nor settle the task. Once the relay is back
    and the other run has let the lease go, the task ends `completed` once."""
    relay = Relay(("127.0.0.1", faults.redis_server.port)).start()
    try:
        faults.set_env(REDIS_URL=f"redis://127.0.0.1:{relay.port}/0", RECONCILE_INTERVAL="5")
        marker = _arm(faults, AFTER_RECORD, PAUSE)
        task = _one_task(faults, AFTER_RECORD)
        faults.start_pool(1)
        faults.pay([task])
        _wait_fired(faults, marker)
        _, horse = faults.runner(task)

        relay.cut()
        cut_at = time.monotonic()
        key = lease_key(task.id)
        wait_for(
            lambda: not faults.redis.exists(key),
            timeout=LEASE_TTL + 15,
            interval=0.1,
            what="the cut-off run's lease to expire",
        )
        print(f"[faults] lease expired {time.monotonic() - cut_at:.1f} s after the cut")
        other = f"elsewhere.example|1|download-{task.id}|another-run"
        assert faults.redis.set(key, other, nx=True, px=LEASE_TTL * 1000)
        Path(f"{marker}{crashpoints.GO_SUFFIX}").touch()

        wait_for(
            lambda: f"task {task.id}: lease lost" in faults.log_text(),
            timeout=30,
            interval=0.1,
            what=lambda: f"the cut-off run to give up its lease\n{faults.logs()}",
        )
        wait_for(
            lambda: "leaving the task to the run that holds it" in faults.log_text() or not pid_running(horse),
            timeout=30,
            interval=0.1,
            what=lambda: f"the cut-off run to stop\n{faults.logs()}",
        )
        assert not (faults.download_dir / str(task.id)).exists(), "the cut-off run moved the files into place"
        row = faults.row(task)
        assert row.status == PROCESSING, f"the cut-off run settled the task: {row}"
        assert faults.redis.get(key) == other.encode(), "the other run's lease was touched"
        assert faults.accepted() == [] or task.id not in faults.event_ids(EVENT_COMPLETED)

        assert faults.redis.delete(key) == 1  # the other run ends and lets its lease go
        relay.restore()
        _assert_once(faults, task)
    finally:
        relay.cut()


# -- the reconciler's clock two minutes ahead -------------------------------------------------------


def _skewed_env(faults: Faults) -> dict[str, str]:
    """The environment of a process whose wall clock runs CLOCK_SKEW seconds ahead (tests/faults/skew)."""
    path = os.pathsep.join(part for part in (str(SKEW_DIR), faults.vars.get("PYTHONPATH", "")) if part)
    return {**faults.vars, "PYTHONPATH": path, "UDEMY_DL_CLOCK_SKEW": str(CLOCK_SKEW)}


def test_reconciler_clock_ahead_spares_a_last_attempt(faults: Faults) -> None:
    """`udemy-dl reconcile` on a host whose clock is two minutes ahead, while a healthy download
    runs its last attempt (MAX_ATTEMPTS=1): liveness is judged by leases and the workers' own keys,
    not by comparing two hosts' clocks, so the task is neither failed nor run twice; it ends
    `completed` once."""
    faults.set_env(MAX_ATTEMPTS="1")
    (task,) = faults.make_tasks(1, 12 * MIB)
    faults.origin.throttle = 1.5 * MIB  # about 8 s: the sweep comes while it runs
    faults.start_pool(1)
    faults.pay([task])
    faults.wait_under_way(task, 0.05)

    env = _skewed_env(faults)
    clock = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"], env=env, capture_output=True, text=True
    )
    ahead = float(clock.stdout) - time.time()
    assert CLOCK_SKEW - 5 < ahead < CLOCK_SKEW + 5, f"the skewed clock is {ahead:.1f} s ahead"
    swept = subprocess.run(
        [str(venv_bin("udemy-dl")), "reconcile"], env=env, cwd=faults.tmp, capture_output=True, text=True, timeout=60
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    print(f"[faults] udemy-dl reconcile, clock {CLOCK_SKEW} s ahead: {swept.stdout.strip()}")
    assert "failed" not in swept.stdout, swept.stdout
    row = faults.row(task)
    assert row.status == PROCESSING and faults.job_started(task), f"the sweep came while the task ran: {row}"

    _assert_once(faults, task)
    assert faults.row(task).attempts == 1, faults.row(task)
