"""The download job on real Redis, MariaDB/SQLite, origin and receiver, run by real forking RQ workers."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rq import Queue, Retry
from rq.job import JobStatus
from rq.registry import ScheduledJobRegistry

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.processes import LoggedProcess
from tests.support.service import Service
from tests.support.waiting import wait_for
from udemy_dl.defaults import DOWNLOAD_JOB_FUNCTION as JOB_FUNCTION
from udemy_dl.folders import RECORD_NAME, write_record
from udemy_dl.store import COMPLETED, ENROLLED, FAILED, PENDING, PROCESSING, utcnow
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.worker_rq import process_download

EMAIL = "buyer@shop.example"
FAILED_FOLDER = re.compile(r"^(\d+)-\d{8}T\d{12}Z$")


def worker_log(worker: LoggedProcess) -> Callable[[], str]:
    return lambda: f"worker log:\n{worker.log()}"


# -- the happy path -------------------------------------------------------------------------------


def test_forking_worker_completes_a_paid_task(any_svc: Service, start_worker: Callable[..., LoggedProcess]) -> None:
    """`udemy-dl worker --burst` (a real forking RQ worker) takes a confirmed task to completed in one attempt."""
    url = any_svc.origin.add_course("happy", {"a.bin": 2000, "sub/b.bin": 300_000})
    task_id = any_svc.confirm(url)
    worker = start_worker(burst=True)
    assert worker.wait(timeout=60) == 0, worker.log()
    row = any_svc.row(task_id)
    assert (row.status, row.attempts, row.progress, row.bytes, row.error_message) == (
        COMPLETED,
        1,
        100,
        302_000,
        None,
    ), worker.log()
    assert row.output_path == str(any_svc.settings.download_dir / str(task_id))
    assert row.finished_at is not None


def test_completed_task_files_are_in_place_with_a_record(svc: Service) -> None:
    """DOWNLOAD_DIR/<id>/ holds every file, verified, and manifest.json records path, size and sha256."""
    url = svc.origin.add_course("files", {"a.bin": 1234, "sub/b.bin": 4321})
    task_id = svc.confirm(url)
    svc.run_jobs()
    folder = svc.settings.download_dir / str(task_id)
    record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "a.bin",
        RECORD_NAME,
        "sub/b.bin",
    ]
    assert (record["courseUrl"], record["bytes"], record["title"]) == (url, 5555, "Files")
    for item in record["files"]:
        assert hashlib.sha256((folder / item["path"]).read_bytes()).hexdigest() == item["sha256"]
    assert not (svc.settings.staging_dir / str(task_id)).exists()


def test_completed_task_sends_one_verified_webhook(svc: Service) -> None:
    """The payment service receives exactly one signed download.completed event describing the task."""
    url = svc.origin.add_course("notify", {"a.bin": 100})
    task_id = svc.confirm(url)
    svc.run_jobs()
    hooks = svc.webhooks()
    assert [(h.event_type, h.verified) for h in hooks] == [(EVENT_COMPLETED, True)]
    data = hooks[0].body["data"]
    assert (data["taskId"], data["email"], data["courseUrl"], data["status"]) == (task_id, EMAIL, url, COMPLETED)
    assert (data["outputPath"], data["bytes"], data["files"]) == (str(svc.settings.download_dir / str(task_id)), 100, 1)


def test_job_meta_reports_progress(svc: Service) -> None:
    """The running job publishes progress in job.meta (bytes, files); 100 % is left to the final status."""
    url = svc.origin.add_course("meta", {"a.bin": 1000, "b.bin": 3000})
    task_id = svc.confirm(url)
    svc.run_jobs()
    progress = svc.job(task_id).get_meta(refresh=True)["progress"]
    assert (progress["bytes"], progress["total"], progress["files"], progress["filesTotal"]) == (4000, 4000, 2, 2)
    assert progress["percent"] == 99


def test_job_result_reports_success(svc: Service) -> None:
    """process_download returns {'success': True, 'taskId', 'outputPath', 'bytes', 'files'}."""
    url = svc.origin.add_course("result", {"a.bin": 10})
    task_id = svc.confirm(url)
    svc.run_jobs()
    assert svc.job(task_id).return_value() == {
        "success": True,
        "taskId": task_id,
        "outputPath": str(svc.settings.download_dir / str(task_id)),
        "bytes": 10,
        "files": 1,
    }


def test_fetch_command_downloads_the_task_instead_of_http(svc: Service) -> None:
    """With FETCH_COMMAND set, the operator's command fills the task folder and the task completes."""
    script = (
        "import pathlib, sys; d = pathlib.Path(sys.argv[2]); d.mkdir(parents=True, exist_ok=True); "
        "(d / 'course.bin').write_bytes(b'c' * 2048)"
    )
    svc.reconfigure(
        FETCH_COMMAND=shlex.join([sys.executable, "-c", script, "{url}", "{dest}"]),
        ALLOWED_HOSTS="cdn.example",
    )
    task_id = svc.paid_task("https://cdn.example/courses/operator")
    result = process_download(svc.payload(task_id))
    assert (result["success"], result["bytes"], result["files"]) == (True, 2048, 1)
    folder = svc.settings.download_dir / str(task_id)
    assert (folder / "course.bin").read_bytes() == b"c" * 2048
    assert svc.row(task_id).status == COMPLETED


# -- idempotence ----------------------------------------------------------------------------------


def test_completed_task_is_a_no_op_without_refetching(svc: Service) -> None:
    """Running the job again for a completed task succeeds at once and sends no request to the origin."""
    url = svc.origin.add_course("again", {"a.bin": 500})
    task_id = svc.confirm(url)
    svc.run_jobs()
    requests_before = len(svc.origin.requests.paths())
    row_before = svc.row(task_id)

    result = process_download(svc.payload(task_id))
    assert (result["success"], result["taskId"], result.get("skipped")) == (True, task_id, True)
    assert len(svc.origin.requests.paths()) == requests_before
    assert svc.row(task_id) == row_before


def test_a_verified_course_left_in_staging_is_moved_into_place_without_refetching(svc: Service) -> None:
    """A run that fetched and verified the course, wrote its record and was killed before the rename left the
    staging folder complete: the next run moves it into place and records it, asking the origin for nothing."""
    url = svc.origin.add_course("left", {"a.bin": 500, "sub/b.bin": 300})
    task_id = svc.paid_task(url)
    staging = svc.settings.download_dir / ".staging" / str(task_id)
    write_sample_file(staging / "a.bin", 500, "left/a.bin")
    write_sample_file(staging / "sub" / "b.bin", 300, "left/sub/b.bin")
    files = [{"path": "a.bin", "size": 500, "sha256": "0" * 64}, {"path": "sub/b.bin", "size": 300, "sha256": "1" * 64}]
    write_record(staging, {"title": "Left", "courseUrl": url, "files": files, "bytes": 800})

    result = process_download(svc.payload(task_id))

    assert (result["success"], result["files"], result["bytes"]) == (True, 2, 800), result
    assert svc.origin.requests.paths() == []
    final = svc.settings.download_dir / str(task_id)
    assert (final / "sub" / "b.bin").stat().st_size == 300 and not staging.exists()
    assert svc.row(task_id).status == COMPLETED


def test_a_staging_record_whose_files_do_not_match_is_not_trusted(svc: Service) -> None:
    """A record in staging whose file is missing or of another size proves nothing: the course is fetched."""
    url = svc.origin.add_course("short", {"a.bin": 500})
    task_id = svc.paid_task(url)
    staging = svc.settings.download_dir / ".staging" / str(task_id)
    write_sample_file(staging / "a.bin", 499, "short/a.bin")
    write_record(staging, {"title": "S", "courseUrl": url, "files": [{"path": "a.bin", "size": 500}], "bytes": 500})

    result = process_download(svc.payload(task_id))

    assert result["success"] is True, result
    assert "/files/short/a.bin" in svc.origin.requests.paths()
    assert (svc.settings.download_dir / str(task_id) / "a.bin").stat().st_size == 500


def test_completed_task_run_again_sends_no_second_webhook(svc: Service) -> None:
    """A duplicate run of a completed task re-offers its event under the same id, which is not delivered twice."""
    url = svc.origin.add_course("once", {"a.bin": 500})
    task_id = svc.confirm(url)
    svc.run_jobs()
    process_download(svc.payload(task_id))
    svc.run_jobs()
    assert [w.event_type for w in svc.receiver.received if w.event_type == EVENT_COMPLETED] == [EVENT_COMPLETED]
    assert len(svc.webhooks()) == 1


def test_files_already_in_place_are_recorded_not_fetched(svc: Service) -> None:
    """A run that died after moving the files into place: the next run records them without fetching."""
    url = svc.origin.add_course("placed", {"a.bin": 700})
    task_id = svc.paid_task(url)
    folder = svc.settings.download_dir / str(task_id)
    folder.mkdir(parents=True)
    write_record(folder, {"title": "Placed", "courseUrl": url, "files": [{"path": "a.bin"}], "bytes": 700})

    result = process_download(svc.payload(task_id))
    assert result["success"] is True
    assert svc.origin.requests.paths() == []
    row = svc.row(task_id)
    assert (row.status, row.bytes, row.output_path) == (COMPLETED, 700, str(folder))


# -- transient errors and retries -----------------------------------------------------------------


def test_transient_error_is_retried_and_row_stays_processing(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """A 500 on a file fails attempt 1; the row stays processing while the retry waits; attempt 2 completes it."""
    url = svc.origin.add_course("flaky", {"a.bin": 1000, "b.bin": 1000})
    svc.origin.fail_next("/files/flaky/b.bin", 1)
    task_id = svc.confirm(url)
    worker = start_worker()
    job = svc.job(task_id)

    wait_for(lambda: job.get_status(refresh=True) == JobStatus.SCHEDULED, timeout=20, what=worker_log(worker))
    between = svc.row(task_id)
    assert (between.status, between.attempts) == (PROCESSING, 1)

    wait_for(lambda: svc.row(task_id).status != PROCESSING, timeout=20, what=worker_log(worker))
    final = svc.row(task_id)
    assert (final.status, final.attempts) == (COMPLETED, 2), worker.log()


def test_retry_does_not_refetch_files_verified_by_the_failed_attempt(svc: Service) -> None:
    """After a failure on the second file, the retry fetches only that file again, not the first."""
    svc.reconfigure(FETCH_CONCURRENCY="1")  # one file at a time: a.bin is complete before b.bin fails
    url = svc.origin.add_course("resume", {"a.bin": 5000, "b.bin": 5000})
    svc.origin.fail_next("/files/resume/b.bin", 1)
    task_id = svc.confirm(url)
    svc.run_jobs()  # attempt 1: a.bin fetched, b.bin fails; retry scheduled in about 1 s
    assert svc.row(task_id).status == PROCESSING

    def retried_to_the_end() -> bool:
        svc.run_jobs()  # the worker's scheduler enqueues the retry once it is due
        return svc.row(task_id).status == COMPLETED

    wait_for(retried_to_the_end, timeout=20, interval=0.2, what="the retry to complete the task")
    paths = svc.origin.requests.paths()
    assert (paths.count("/files/resume/a.bin"), paths.count("/files/resume/b.bin")) == (1, 2)


def test_transient_error_on_every_attempt_fails_after_max_attempts(
    svc: Service, start_worker: Callable[..., LoggedProcess]
) -> None:
    """An origin answering 500 every time: after MAX_ATTEMPTS (3) attempts the task is failed, the job too."""
    url = svc.origin.add_course("down", {"a.bin": 100})
    svc.origin.fail_next("/courses/down", 1000)
    task_id = svc.confirm(url)
    worker = start_worker()

    wait_for(lambda: svc.row(task_id).status != PROCESSING, timeout=30, what=worker_log(worker))
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (FAILED, 3), worker.log()
    assert "500" in (row.error_message or "") and "after 3 attempts" in (row.error_message or "")
    assert svc.origin.requests.paths().count("/courses/down") == 3
    wait_for(lambda: svc.job(task_id).get_status(refresh=True) == JobStatus.FAILED, what=worker_log(worker))


# -- permanent errors -----------------------------------------------------------------------------

PERMANENT = pytest.mark.parametrize(
    ("course", "reason"),
    [("http://not-allowed.example/course", "ALLOWED_HOSTS"), ("{origin}/courses/missing", "HTTP 404")],
    ids=["host-off-allow-list", "origin-404"],
)


@PERMANENT
def test_permanent_error_fails_the_task_without_retry(svc: Service, course: str, reason: str) -> None:
    """A URL off the allow-list or a 404: failed at once with the reason, one attempt, no retry scheduled."""
    task_id = svc.confirm(course.format(origin=svc.origin.base_url))
    svc.run_jobs()
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (FAILED, 1)
    assert reason in (row.error_message or "")
    assert svc.job(task_id).get_status() == JobStatus.FINISHED
    assert ScheduledJobRegistry(queue=Queue(svc.settings.queue_name, connection=svc.redis)).count == 0


@PERMANENT
def test_permanent_error_keeps_a_failed_folder_with_error_txt(svc: Service, course: str, reason: str) -> None:
    """The failure is kept at FAILED_DIR/<id>-<UTC time>/ with error.txt giving the reason; the row points there."""
    task_id = svc.confirm(course.format(origin=svc.origin.base_url))
    svc.run_jobs()
    folders = list(svc.settings.failed_dir.iterdir())
    assert len(folders) == 1
    match = FAILED_FOLDER.match(folders[0].name)
    assert match is not None and int(match.group(1)) == task_id
    assert reason in (folders[0] / "error.txt").read_text(encoding="utf-8")
    assert svc.row(task_id).output_path == str(folders[0])


@PERMANENT
def test_permanent_error_sends_a_failed_webhook(svc: Service, course: str, reason: str) -> None:
    """The payment service receives one signed download.failed event carrying the reason."""
    task_id = svc.confirm(course.format(origin=svc.origin.base_url))
    svc.run_jobs()
    hooks = svc.webhooks()
    assert [(h.event_type, h.verified) for h in hooks] == [(EVENT_FAILED, True)]
    data = hooks[0].body["data"]
    assert (data["taskId"], data["status"]) == (task_id, FAILED)
    assert reason in data["error"]


def test_off_allow_list_course_is_never_requested(svc: Service, other_origin: ContentOrigin) -> None:
    """A course on a server ALLOWED_HOSTS does not list gets no request at all."""
    task_id = svc.confirm(other_origin.add_course("elsewhere", {"a.bin": 10}))
    svc.run_jobs()
    assert svc.row(task_id).status == FAILED
    assert other_origin.requests.paths() == []


def test_files_fetched_before_a_permanent_error_are_kept_aside(svc: Service) -> None:
    """Files already fetched when a later file is refused move to the failed folder, not into DOWNLOAD_DIR."""
    svc.reconfigure(FETCH_CONCURRENCY="1")  # a.bin is complete before gone.bin is asked for
    sha = write_sample_file(svc.origin.root / "files" / "part" / "a.bin", 300, "part")
    url = svc.origin.set_manifest(
        "/courses/part",
        {"files": [{"path": "a.bin", "url": "/files/part/a.bin"}, {"path": "b.bin", "url": "/files/part/gone.bin"}]},
    )
    task_id = svc.confirm(url)
    svc.run_jobs()
    kept = Path(svc.row(task_id).output_path or "")
    assert {"a.bin", "error.txt"} <= {p.name for p in kept.iterdir()}
    assert hashlib.sha256((kept / "a.bin").read_bytes()).hexdigest() == sha
    assert not (svc.settings.download_dir / str(task_id)).exists()


# -- bad input and unpaid tasks -------------------------------------------------------------------


BAD_DATA = pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"email": None}, "email"),
        ({"courseUrl": None}, "courseUrl"),
        ({"email": "not-an-email"}, "'not-an-email'"),
        ({"courseUrl": 12345}, "12345"),
        ({"courseUrl": ["http://x"]}, "['http://x']"),
    ],
    ids=["missing-email", "missing-courseUrl", "invalid-email", "int-courseUrl", "list-courseUrl"],
)


def bad_payload(task_id: int, url: str, change: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"taskId": task_id, "email": EMAIL, "courseUrl": url, **change}
    return {key: value for key, value in data.items() if value is not None}


@BAD_DATA
def test_bad_task_data_fails_the_row_with_a_clear_reason(svc: Service, change: dict[str, Any], shown: str) -> None:
    """Bad data for an existing paid task marks it failed, the reason naming what is wrong."""
    url = svc.origin.add_course("bad", {"a.bin": 10})
    task_id = svc.paid_task(url)
    result = process_download(bad_payload(task_id, url, change))
    assert (result["success"], result["taskId"]) == (False, task_id)
    row = svc.row(task_id)
    assert row.status == FAILED
    assert "bad task data" in (row.error_message or "") and shown in (row.error_message or "")
    assert svc.origin.requests.paths() == []


@BAD_DATA
def test_bad_task_data_is_never_retried(svc: Service, change: dict[str, Any], shown: str) -> None:
    """Even on a job with retries configured, bad data finishes the job at once: nothing is scheduled again."""
    url = svc.origin.add_course("bad", {"a.bin": 10})
    task_id = svc.paid_task(url)
    queue = Queue(svc.settings.queue_name, connection=svc.redis)
    job = queue.enqueue(JOB_FUNCTION, bad_payload(task_id, url, change), retry=Retry(max=2, interval=1))
    svc.run_jobs()
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    result = job.return_value()
    assert result is not None and result["success"] is False and shown in result["error"]
    assert ScheduledJobRegistry(queue=queue).count == 0


@pytest.mark.parametrize("task_id", ["abc", -1, True, 1.5])
def test_unusable_task_id_is_refused_and_touches_no_row(svc: Service, task_id: object) -> None:
    """A payload whose taskId is not a positive integer is refused with the value named; no row changes."""
    url = svc.origin.add_course("noid", {"a.bin": 10})
    existing = svc.paid_task(url)
    result = process_download({"taskId": task_id, "email": EMAIL, "courseUrl": url})
    assert result["success"] is False
    assert repr(task_id) in result["error"]
    assert svc.row(existing).status == PROCESSING
    assert svc.origin.requests.paths() == []


@pytest.mark.parametrize("status", [PENDING, ENROLLED])
def test_unpaid_task_is_not_fetched(svc: Service, status: str) -> None:
    """A task still pending/enrolled (not paid) is not downloaded and its row is left alone."""
    url = svc.origin.add_course("unpaid", {"a.bin": 10})
    task_id = svc.store.insert_task(EMAIL, url, status)
    result = process_download({"taskId": task_id, "email": EMAIL, "courseUrl": url})
    assert result["success"] is False and status in result["error"]
    assert svc.origin.requests.paths() == []
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (status, 0)


def test_unknown_task_is_not_fetched(svc: Service) -> None:
    """A job for a task id with no row does nothing and says so."""
    url = svc.origin.add_course("ghost", {"a.bin": 10})
    result = process_download({"taskId": 999_999, "email": EMAIL, "courseUrl": url})
    assert result == {"success": False, "taskId": 999_999, "error": "no such task"}
    assert svc.origin.requests.paths() == []


def test_failed_task_run_again_is_not_fetched(svc: Service) -> None:
    """A duplicate job for an already failed task does not fetch and does not change the row."""
    url = svc.origin.add_course("settled", {"a.bin": 10})
    task_id = svc.paid_task(url)
    assert svc.store.mark_failed(task_id, "earlier failure", None, utcnow())
    before = svc.row(task_id)
    result = process_download(svc.payload(task_id))
    assert (result["success"], result.get("skipped")) == (False, True)
    assert svc.origin.requests.paths() == []
    assert svc.row(task_id) == before
