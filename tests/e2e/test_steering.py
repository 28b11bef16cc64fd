"""An operator steering the deployed service (start_workers.sh, the console scripts, RQ's own `rq`):
`rq suspend` holds the workers and `health` says so; `udemy-dl cancel` stops a running download."""

from __future__ import annotations

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from dev.devservers import WebhookReceiver, write_sample_file
from tests.support.deployment import Scripts
from tests.support.e2e import E2EEnv
from tests.support.http_servers import Origin
from tests.support.scripts import venv_bin
from tests.support.waiting import holds_for, wait_for
from udemy_dl.store import COMPLETED, FAILED, MySQLStore, TaskRow

pytestmark = pytest.mark.e2e


def row_of(store: MySQLStore, task_id: int) -> TaskRow:
    row = store.get(task_id)
    assert row is not None, f"task {task_id}'s row is gone"
    return row


def test_rq_suspend_holds_started_workers_and_health_says_paused(
    e2e_env: E2EEnv, e2e_scripts: Scripts, e2e_store: MySQLStore, token_origin: Origin, e2e_redis: Redis
) -> None:
    """The issue's check: after `rq suspend`, a task confirmed does not start (two idle workers wait
    on the queue), `health` exits 0 saying paused, and after `rq resume` the task completes."""
    url_path = "/files/held/lecture.mp4"
    write_sample_file(token_origin.file_path(url_path), 1000, "held")
    task_id = e2e_store.insert_task("buyer@example.com", f"{token_origin.base_url}{url_path}")
    e2e_env.vars.update(WORKER_COUNT="2")
    started = e2e_scripts.start()
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    rq = venv_bin("rq")
    assert e2e_env.run(rq, "suspend", "--url", e2e_env.vars["REDIS_URL"]).returncode == 0

    assert e2e_env.cli("confirm-payment", str(task_id)).returncode == 0

    job_id = f"download-{task_id}"
    queue = Queue("downloads", connection=e2e_redis)

    def waiting() -> bool:
        status = Job.fetch(job_id, connection=e2e_redis).get_status(refresh=True)
        return status == JobStatus.QUEUED and job_id in queue.job_ids and row_of(e2e_store, task_id).attempts == 0

    wait_for(waiting, timeout=10, what=e2e_env.logs)
    holds_for(waiting, 3.0, what=e2e_env.logs)
    health = e2e_env.cli("health")
    assert health.returncode == 0 and "paused: every queue" in health.stdout, health.stdout + health.stderr

    assert e2e_env.run(rq, "resume", "--url", e2e_env.vars["REDIS_URL"]).returncode == 0
    wait_for(lambda: row_of(e2e_store, task_id).status == COMPLETED, timeout=30, what=e2e_env.logs)


def test_cancel_stops_a_download_under_way(
    e2e_env: E2EEnv,
    e2e_scripts: Scripts,
    e2e_store: MySQLStore,
    token_origin: Origin,
    receiver: WebhookReceiver,
) -> None:
    """`udemy-dl cancel` of a download under way on a started worker: exit 0, the task failed
    `cancelled: refund`, no folder left, one download.cancelled event, nothing queued again."""
    url_path = "/files/refunded/lecture.mp4"
    size = 40 * 1024 * 1024
    write_sample_file(token_origin.file_path(url_path), size, "refunded")
    token_origin.throttle = 4 * 1024 * 1024  # about 10 s for the file
    task_id = e2e_store.insert_task("buyer@example.com", f"{token_origin.base_url}{url_path}")
    e2e_env.vars.update(WORKER_COUNT="1")
    started = e2e_scripts.start()
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    assert e2e_env.cli("confirm-payment", str(task_id)).returncode == 0
    wait_for(lambda: row_of(e2e_store, task_id).progress > 0, timeout=30, what=e2e_env.logs)

    cancelled = e2e_env.cli("cancel", str(task_id), "--reason", "refund")

    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr + e2e_env.logs()
    assert f"task {task_id} cancelled (cancelled: refund)" in cancelled.stdout
    row = row_of(e2e_store, task_id)
    assert (row.status, row.error_message, row.attempts) == (FAILED, "cancelled: refund", 1)
    assert not (e2e_env.download_dir / str(task_id)).exists()
    assert not (e2e_env.download_dir / ".staging" / str(task_id)).exists()
    wait_for(lambda: receiver.of_type("download.cancelled"), timeout=20, what=e2e_env.logs)
    assert [event.body["data"]["taskId"] for event in receiver.of_type("download.cancelled")] == [task_id]
    assert token_origin.bytes_sent[url_path] < size
    assert "Traceback" not in e2e_env.logs(tail=1_000_000)
