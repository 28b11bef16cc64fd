"""Cancelling a task (a refund, a chargeback, a mistake) on real Redis, MariaDB, origin, receiver and
workers: a queued or scheduled task never starts, a running one stops, nothing is retried, the row
becomes `failed` with `cancelled…` and the payment service gets download.cancelled."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from rq.job import JobStatus
from rq.registry import CanceledJobRegistry, ScheduledJobRegistry

from tests.support.intake import Intake
from tests.support.processes import LoggedProcess
from tests.support.scripts import run_cli
from tests.support.service import Service
from tests.support.waiting import wait_for
from udemy_dl.cancellation import cancel_key, cancel_text
from udemy_dl.folders import staging_lock, staging_path
from udemy_dl.lease import TaskLease
from udemy_dl.outcome import record_cancelled
from udemy_dl.payload import TaskPayload
from udemy_dl.producer import ALREADY_CANCELLED, CANCEL_REQUESTED, CANCELLED, REFUSED
from udemy_dl.store import COMPLETED, FAILED, PENDING, PROCESSING, TaskStore, utcnow
from udemy_dl.webhooks import CANCELLED as EVENT_CANCELLED

SIZE = 100_000_000
"""The course's one file: far more than the download reaches before it is cancelled."""
RATE = 5_000_000
"""Bytes per second the origin sends (the issue's 5 MB/s)."""
CANCEL_AT = 20_000_000
"""Bytes in staging when the cancel comes (the issue's 20 MB)."""
STOP_DEADLINE = 10.0
"""Seconds within which a running download must have stopped and settled the task."""


def worker_log(worker: LoggedProcess) -> Callable[[], str]:
    return lambda: f"worker log:\n{worker.log()}"


def cancelled_events(svc: Service, task_id: int) -> list[str]:
    return [item.webhook_id for item in svc.receiver.of_type(EVENT_CANCELLED) if item.body["data"]["taskId"] == task_id]


def cli(*args: str) -> tuple[int, str]:
    """`udemy-dl ARGS`: (exit code, stdout and stderr)."""
    result = run_cli(*args)
    return result.returncode, result.stdout + result.stderr


# -- a running download ----------------------------------------------------------------------------


def test_a_running_download_cancelled_stops_and_fails_cancelled(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """The issue's check: a large download at 5 MB/s, cancelled at 20 MB by a real worker process,
    stops within 10 s; the row is failed `cancelled: refund` with its attempt counted, no folder is
    left (final or staging), download.cancelled reaches the payment service, nothing is retried;
    and the worker's kept horse goes on to the next task."""
    svc.origin.throttle = RATE
    url = svc.origin.add_course("big", {"big.bin": SIZE})
    task_id = svc.confirm(url)
    worker = start_worker()
    wait_for(lambda: svc.partial_bytes(task_id) >= CANCEL_AT, timeout=60, what=worker_log(worker))

    result = svc.producer().cancel(task_id, "refund", wait=STOP_DEADLINE)

    assert result.outcome == CANCELLED, (result, worker.log())
    row = svc.row(task_id)
    assert (row.status, row.error_message, row.attempts, row.output_path) == (FAILED, "cancelled: refund", 1, None)
    assert not (svc.settings.download_dir / str(task_id)).exists()
    assert not (svc.settings.staging_dir / str(task_id)).exists()
    events = wait_for(lambda: cancelled_events(svc, task_id), timeout=30, what=worker_log(worker))
    event = next(item for item in svc.receiver.of_type(EVENT_CANCELLED) if item.webhook_id == events[0])
    assert event.body["data"]["status"] == FAILED and event.body["data"]["error"] == "cancelled: refund"
    wait_for(lambda: svc.row(task_id).pending_event is None, timeout=10, what="the event acknowledged")
    # The transfer stopped: had it gone on at 5 MB/s, it would be well past half the file by now.
    assert svc.origin.bytes_sent["/files/big/big.bin"] < SIZE // 2
    job = svc.job(task_id)
    assert job.get_status(refresh=True) == JobStatus.FINISHED, worker.log()
    assert job.id not in ScheduledJobRegistry(queue=svc.queue).get_job_ids()
    assert svc.queued() == [] and svc.row(task_id).attempts == 1
    assert "Traceback" not in worker.log()

    svc.origin.throttle = None
    after = svc.confirm(svc.origin.add_course("next", {"a.bin": 1000}))
    wait_for(lambda: svc.row(after).status == COMPLETED, timeout=30, what=worker_log(worker))
    assert len(cancelled_events(svc, task_id)) == 1
    # RQ's success line is there for the task that completed, never for the one cancelled.
    wait_for(lambda: f"Successfully completed download task {after} " in worker.log(), timeout=10)
    assert f"Successfully completed download task {task_id} " not in worker.log()


# -- a task that has not started -------------------------------------------------------------------


def test_a_queued_task_cancelled_never_starts(svc: Service) -> None:
    """A queued task's job is cancelled with RQ's own API (CanceledJobRegistry); the task is failed
    `cancelled` at once, and a job that runs anyway (RQ delivers at least once) fetches nothing."""
    url = svc.origin.add_course("queued", {"a.bin": 1000})
    task_id = svc.confirm(url)
    job = svc.job(task_id)

    result = svc.producer().cancel(task_id, "chargeback")

    assert result.outcome == CANCELLED, result
    assert job.get_status(refresh=True) == JobStatus.CANCELED
    assert job.id in CanceledJobRegistry(queue=svc.queue).get_job_ids()
    assert svc.queued() == []
    row = svc.row(task_id)
    assert (row.status, row.error_message, row.attempts) == (FAILED, "cancelled: chargeback", 0)
    # A delivery of the job after all (a second copy, a worker that had popped it): it does nothing.
    svc.producer().add_download_job(svc.payload(task_id))
    svc.run_jobs()
    assert svc.file_requests("/files/queued/a.bin") == []
    after = svc.row(task_id)
    assert (after.status, after.error_message, after.attempts, after.finished_at) == (
        FAILED,
        "cancelled: chargeback",
        0,
        row.finished_at,
    )
    assert len(cancelled_events(svc, task_id)) == 1
    assert not (svc.settings.staging_dir / f"{task_id}.lock").exists()


def test_a_scheduled_retry_cancelled_never_runs(svc: Service, start_worker: Callable[..., LoggedProcess]) -> None:
    """A task waiting for its retry (RQ's ScheduledJobRegistry) is cancelled there: the retry never
    runs, the bytes of the failed attempt are removed, nothing is left in staging (no `<taskId>.lock`
    either), and the one attempt stays counted."""
    svc.reconfigure(RETRY_DELAY="30")
    url = svc.origin.add_course("retrying", {"a.bin": 5000, "b.bin": 5000})
    svc.origin.fail_next("/files/retrying/b.bin", 1)
    task_id = svc.confirm(url)
    worker = start_worker()
    job = svc.job(task_id)
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.SCHEDULED, timeout=20, what=worker_log(worker))
    assert (svc.settings.staging_dir / str(task_id)).exists()
    assert not (svc.settings.staging_dir / f"{task_id}.lock").exists()  # only while a run holds it

    result = svc.producer().cancel(task_id)

    assert result.outcome == CANCELLED, result
    assert job.id not in ScheduledJobRegistry(queue=svc.queue).get_job_ids()
    assert job.get_status(refresh=True) == JobStatus.CANCELED
    row = svc.row(task_id)
    assert (row.status, row.error_message, row.attempts) == (FAILED, "cancelled", 1)
    assert list(svc.settings.staging_dir.iterdir()) == []
    wait_for(lambda: cancelled_events(svc, task_id), timeout=20, what=worker_log(worker))


def test_an_unpaid_task_can_be_cancelled_and_never_confirmed(svc: Service) -> None:
    """A mistake before the payment: the unpaid task is failed `cancelled`, and a confirmation
    that comes later refuses it."""
    task_id = svc.store.insert_task("buyer@shop.example", svc.origin.add_course("unpaid", {"a.bin": 10}), PENDING)
    assert svc.producer().cancel(task_id, "mistake").outcome == CANCELLED
    confirmed = svc.producer().confirm_payment([task_id])
    assert confirmed.enqueued == [] and confirmed.refused == [{"taskId": task_id, "reason": "task is failed"}]
    assert svc.row(task_id).error_message == "cancelled: mistake"


# -- refused, twice, and the race with a run that completes -----------------------------------------


def test_cancelling_a_completed_task_is_refused_and_changes_nothing(svc: Service) -> None:
    """`udemy-dl cancel` of a completed task exits 1 saying so; the row and its files stay."""
    task_id = svc.confirm(svc.origin.add_course("done", {"a.bin": 1000}))
    svc.run_jobs()
    before = svc.row(task_id)
    assert before.status == COMPLETED

    code, output = cli("cancel", str(task_id), "--reason", "refund")

    assert code == 1, output
    assert f"task {task_id} is already completed; it cannot be cancelled" in output
    assert svc.row(task_id) == before
    assert (svc.settings.download_dir / str(task_id) / "a.bin").is_file()
    assert svc.redis.exists(cancel_key(task_id)) == 0
    assert cancelled_events(svc, task_id) == []


def test_cancelling_twice_changes_nothing(svc: Service) -> None:
    """The second `udemy-dl cancel` exits 0 saying the task is already cancelled; the row keeps its
    first reason and time, and one download.cancelled is sent."""
    task_id = svc.confirm(svc.origin.add_course("twice", {"a.bin": 1000}))
    code, output = cli("cancel", str(task_id), "--reason", "refund")
    assert code == 0 and f"task {task_id} cancelled (cancelled: refund)" in output, output
    first = svc.row(task_id)

    code, output = cli("cancel", str(task_id), "--reason", "other", "--json")

    assert code == 0, output
    assert json.loads(output.splitlines()[-1])["result"] == ALREADY_CANCELLED
    second = svc.row(task_id)
    assert (second.error_message, second.finished_at) == (first.error_message, first.finished_at)
    svc.run_jobs()
    assert len(cancelled_events(svc, task_id)) == 1


def test_cancel_with_a_bad_task_id_or_reason_names_it(svc: Service) -> None:
    code, output = cli("cancel", "x1")
    assert code == 2 and "'x1'" in output, output
    code, output = cli("cancel", "1", "--reason", "refund\x07")
    assert code == 2 and "reason" in output, output


def test_a_run_that_completes_first_wins_over_the_cancel(svc: Service) -> None:
    """While a run holds the task, the cancel only asks it to stop. If that run completes first,
    the cancel is refused (the row stays completed) and its request is withdrawn."""
    task_id = svc.confirm(svc.origin.add_course("race", {"a.bin": 10}))
    run = TaskLease(svc.redis, task_id, "a-run")
    run.acquire()
    try:
        waiting = svc.producer().cancel(task_id, "refund", wait=0.3)
        assert waiting.outcome == CANCEL_REQUESTED, waiting
        assert svc.row(task_id).status == PROCESSING
        assert svc.store.mark_completed(task_id, "/done", 10, utcnow())
    finally:
        run.release()

    again = svc.producer().cancel(task_id, "refund")

    assert again.outcome == REFUSED and "already completed" in again.message, again
    assert svc.row(task_id).status == COMPLETED
    assert svc.redis.exists(cancel_key(task_id)) == 0


def test_a_cancel_its_run_settled_first_is_not_settled_again_nor_warned_about(
    svc: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """The run saw the cancel request and settled the task itself just before the canceller took the lease:
    the canceller finds it settled and leaves it (no second UPDATE, no "not cancelled" warning)."""
    task_id = svc.confirm(svc.origin.add_course("settled-by-run", {"a.bin": 10}))
    before = svc.row(task_id)
    run = TaskLease(svc.redis, task_id, "a-run")
    run.acquire()
    try:
        assert svc.producer().cancel(task_id, "refund", wait=0.2).outcome == CANCEL_REQUESTED
        task = TaskPayload(task_id=task_id, email=before.email, course_url=before.course_url)
        assert record_cancelled(svc.settings, svc.store, svc.redis, task, cancel_text("refund"))
    finally:
        run.release()
    settled = svc.row(task_id)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="udemy_dl"):
        assert not svc.producer().settle_cancel_unheld(before, cancel_text("refund"))
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert svc.row(task_id) == settled


def test_a_cancel_leaves_a_staging_folder_a_run_on_this_host_still_writes(svc: Service) -> None:
    """A run that lost its lease (Redis forgot it) but still holds the staging lock keeps its folder: the
    cancel waits for it; once the run lets go, the cancel settles and nothing is left in staging."""
    task_id = svc.confirm(svc.origin.add_course("still-writing", {"a.bin": 10}))
    row = svc.row(task_id)
    staging = staging_path(svc.settings, task_id)
    with staging_lock(svc.settings, task_id):
        staging.mkdir(parents=True)
        (staging / "a.bin").write_bytes(b"12345")
        assert not svc.producer().settle_cancel_unheld(row, cancel_text("refund"))
        assert (staging / "a.bin").read_bytes() == b"12345"
        assert svc.row(task_id).status == PROCESSING
    assert svc.producer().settle_cancel_unheld(row, cancel_text("refund"))
    assert svc.row(task_id).cancelled
    assert list(svc.settings.staging_dir.iterdir()) == []


def test_the_status_change_is_conditional(mysql_store: TaskStore) -> None:
    """SQL: a cancel settles only a task that is not settled yet."""
    task_id = mysql_store.insert_task("buyer@shop.example", "https://cdn.example/c", PROCESSING)
    assert mysql_store.mark_completed(task_id, "/done", 1, utcnow())
    assert not mysql_store.mark_cancelled(task_id, "cancelled", utcnow())
    assert mysql_store.get(task_id).status == COMPLETED  # type: ignore[union-attr]


# -- the reconciler and requeue-failed ---------------------------------------------------------------


def test_the_sweep_settles_a_cancel_left_half_done_and_never_requeues_it(svc: Service) -> None:
    """A cancel request whose canceller died before settling: the sweep settles it, not enqueues it;
    and a cancelled task stays cancelled through later sweeps and `requeue-failed` of all tasks."""
    task_id = svc.paid_task(svc.origin.add_course("orphan", {"a.bin": 10}))
    svc.redis.set(cancel_key(task_id), "cancelled: refund")

    swept = svc.reconciler().sweep()

    assert swept.cancelled == [task_id] and swept.requeued == []
    assert svc.row(task_id).error_message == "cancelled: refund"
    assert svc.reconciler().sweep().requeued == []
    assert task_id not in svc.producer().requeue_failed().enqueued
    assert svc.queued() == []


def test_requeue_failed_by_name_reopens_a_cancelled_task(svc: Service) -> None:
    """An operator who cancelled by mistake names the task: it is reopened and completes."""
    task_id = svc.confirm(svc.origin.add_course("undo", {"a.bin": 10}))
    assert svc.producer().cancel(task_id).outcome == CANCELLED
    assert svc.producer().requeue_failed([task_id]).enqueued == [task_id]
    assert svc.redis.exists(cancel_key(task_id)) == 0
    svc.run_jobs()
    assert svc.row(task_id).status == COMPLETED


# -- POST /orders/cancel ----------------------------------------------------------------------------


def test_the_intake_cancels_a_task(intake: Intake, mysql_store: TaskStore) -> None:
    """Signed like /orders/confirm: 200 cancelled, 200 already cancelled, 409 completed, 404 unknown."""
    task_id = mysql_store.insert_task("buyer@shop.example", "https://cdn.example/c", PROCESSING)
    reply = intake.cancel({"taskId": task_id, "reason": "refund"})
    assert reply.status == 200, reply.raw
    assert reply.json() | {"message": ""} == {
        "taskId": task_id,
        "result": CANCELLED,
        "message": "",
        "status": FAILED,
        "error": "cancelled: refund",
    }
    again = intake.cancel({"taskId": task_id})
    assert (again.status, again.json()["result"]) == (200, ALREADY_CANCELLED)
    done = mysql_store.insert_task("buyer@shop.example", "https://cdn.example/c", PROCESSING)
    assert mysql_store.mark_completed(done, "/done", 1, utcnow())
    refused = intake.cancel({"taskId": done})
    assert (refused.status, refused.json()["result"]) == (409, REFUSED)
    assert "already completed" in refused.json()["message"]
    assert intake.cancel({"taskId": 2**62}).status == 404


def test_the_intake_names_the_bad_field_and_changes_nothing(intake: Intake, mysql_store: TaskStore) -> None:
    task_id = mysql_store.insert_task("buyer@shop.example", "https://cdn.example/c", PROCESSING)
    for body, field in (
        ({"taskId": "1"}, "taskId"),
        ({"taskId": 0}, "taskId"),
        ({}, "taskId"),
        ({"taskId": task_id, "reason": 5}, "reason"),
        ({"taskId": task_id, "reason": "x" * 201}, "reason"),
        ({"taskId": task_id, "why": "x"}, "why"),
    ):
        reply = intake.cancel(body)
        assert (reply.status, reply.json().get("field")) == (400, field), (body, reply.raw)
    unsigned = intake.request("POST", "/orders/cancel", json.dumps({"taskId": task_id}).encode())
    assert unsigned.status == 401
    assert mysql_store.get(task_id).status == PROCESSING  # type: ignore[union-attr]
