"""`udemy-dl dashboard`: rq-dashboard on our Redis (plain and through a Sentinel), fetched over HTTP.

The dashboard runs as `udemy-dl dashboard` in a process of its own; a named DownloadWorker is
registered in Redis and a VIP download is enqueued, then its pages and its JSON API must show our
three queues and the worker's name. Also: basic auth, the refusal to listen beyond loopback without a
login (exit 3), and a failed download requeued through its row (as `udemy-dl requeue-failed` does).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from tests.support.ports import free_port
from tests.support.processes import LoggedProcess, start_logged
from tests.support.redis_servers import RedisServer, require_redis_server
from tests.support.scripts import cli_command
from tests.support.waiting import wait_for
from udemy_dl.cli import RET_CONFIG
from udemy_dl.download_worker import DownloadWorker
from udemy_dl.queues import DownloadQueues, worker_queues
from udemy_dl.settings import Settings, load_settings
from udemy_dl.store import FAILED, PROCESSING, SQLiteStore

pytest.importorskip("rq_dashboard", reason="the dashboard extra: pip install -r requirements-dashboard.txt")

QUEUES = ("downloads", "downloads-high", "webhooks")
WORKER = "udemy-dl.dashboard-test.1"


class Dashboard:
    """A running `udemy-dl dashboard` on a free loopback port."""

    def __init__(self, process: LoggedProcess, port: int) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode(errors="replace"), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace"), dict(error.headers)

    def json(self, path: str, auth: tuple[str, str] | None = None) -> Any:
        status, body, _ = self.get(path, auth)
        assert status == 200, (path, status, body[:500], self.process.log(3000))
        return json.loads(body)


@pytest.fixture
def start_dashboard(tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    started: list[LoggedProcess] = []

    def start(**env: str) -> Dashboard:
        port = free_port()
        process = start_logged(
            [*cli_command(), "dashboard", "--port", str(port)],
            {**os.environ, **env},
            tmp_path,
            tmp_path / f"dashboard-{port}.log",
        )
        started.append(process)
        dashboard = Dashboard(process, port)

        def answers() -> bool:
            assert process.process.poll() is None, process.log()
            try:
                status, _, _ = dashboard.get("/favicon.ico", auth=(env.get("DASHBOARD_USERNAME", ""), "x"))
            except OSError:
                return False
            return status in (200, 401)

        wait_for(answers, timeout=20, interval=0.1, what=lambda: f"the dashboard\n{process.log()}")
        return dashboard

    yield start
    for process in started:
        process.stop()


def register_worker(settings: Settings, connection: Redis, name: str = WORKER) -> DownloadWorker:
    worker = DownloadWorker(worker_queues(settings, connection), name=name, connection=connection)
    worker.register_birth()  # type: ignore[no-untyped-call]
    return worker


def enqueue_vip(settings: Settings, connection: Redis, task_id: int = 7) -> str:
    task = {"taskId": task_id, "email": "buyer@example.com", "courseUrl": "https://courses.example/c/1"}
    return DownloadQueues(settings, connection).enqueue(task, priority="high").job.id


def assert_shows_service(dashboard: Dashboard, job_id: str, auth: tuple[str, str] | None = None) -> None:
    """Its pages render, and its JSON API lists our queues, the named worker and the queued VIP job."""
    for page in ("/", "/0/view/queues", "/0/view/workers", "/0/view/jobs", "/0/view/jobs/downloads/failed/8/asc/1"):
        status, body, _ = dashboard.get(page, auth)
        assert status == 200, (page, status, body[:500], dashboard.process.log(3000))
        assert "RQ dashboard" in body, page
    status, body, _ = dashboard.get("/0/view/jobs", auth)
    for name in QUEUES:  # the queue picker of the jobs page
        assert name in body
    queues = {queue["name"]: queue for queue in dashboard.json("/0/data/queues.json", auth)["queues"]}
    assert set(QUEUES) <= set(queues), queues
    assert queues["downloads-high"]["count"] == 1
    workers = dashboard.json("/0/data/workers.json", auth)["workers"]
    assert [worker["name"] for worker in workers] == [WORKER]
    assert set(workers[0]["queues"]) == set(QUEUES)
    jobs = dashboard.json("/0/data/jobs/downloads-high/queued/8/asc/1.json", auth)["jobs"]
    assert [job["id"] for job in jobs] == [job_id]
    assert dashboard.json(f"/0/data/job/{job_id}.json", auth)["status"] == JobStatus.QUEUED


def test_shows_our_queues_and_named_workers(redis_conn: Redis, start_dashboard: Callable[..., Dashboard]) -> None:
    settings = load_settings(env_file=None)
    worker = register_worker(settings, redis_conn)
    job_id = enqueue_vip(settings, redis_conn)
    dashboard = start_dashboard()
    try:
        assert_shows_service(dashboard, job_id)
    finally:
        worker.register_death()  # type: ignore[no-untyped-call]
    assert "dashboard (rq-dashboard 0.9.0) on http://127.0.0.1:" in dashboard.process.log()


def test_empty_queues_are_listed_from_the_start(redis_conn: Redis, start_dashboard: Callable[..., Dashboard]) -> None:
    """Before any order (no VIP one yet), all three queues show, at zero."""
    dashboard = start_dashboard()
    queues = {queue["name"]: queue["count"] for queue in dashboard.json("/0/data/queues.json")["queues"]}
    assert queues == dict.fromkeys(QUEUES, 0)


def test_through_a_sentinel(tmp_path: Path, start_dashboard: Callable[..., Dashboard]) -> None:
    """With REDIS_SENTINELS, the dashboard finds the master as the workers do (the database from REDIS_URL)."""
    binary = require_redis_server()
    master = RedisServer.server(binary, tmp_path / "master")
    master.start()
    sentinel = RedisServer.sentinel(binary, tmp_path / "sentinel", dict(os.environ), "mymaster", master.port)
    sentinel.start()
    try:
        env = {
            "REDIS_URL": f"redis://127.0.0.1:{master.port}/3",
            "REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}",
            "REDIS_SENTINEL_MASTER": "mymaster",
        }
        settings = load_settings(env, env_file=None)
        connection = Redis(host="127.0.0.1", port=master.port, db=3)
        worker = register_worker(settings, connection)
        job_id = enqueue_vip(settings, connection)
        dashboard = start_dashboard(**env)
        assert_shows_service(dashboard, job_id)
        worker.register_death()  # type: ignore[no-untyped-call]
        log = dashboard.process.log()
        assert f"reading redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/3" in log, log
    finally:
        sentinel.stop()
        master.stop()


def test_basic_auth(redis_conn: Redis, start_dashboard: Callable[..., Dashboard]) -> None:
    login = ("ops", "s3cret-Qz91f0")
    settings = load_settings(env_file=None)
    worker = register_worker(settings, redis_conn)
    job_id = enqueue_vip(settings, redis_conn)
    dashboard = start_dashboard(DASHBOARD_USERNAME=login[0], DASHBOARD_PASSWORD=login[1])
    try:
        for path in ("/", "/0/data/queues.json", "/0/data/workers.json", "/static/favicon.ico", "/nowhere"):
            status, _, headers = dashboard.get(path)
            assert status == 401, path
            assert headers.get("WWW-Authenticate", "").startswith("Basic "), path
            assert dashboard.get(path, auth=(login[0], "wrong"))[0] == 401, path
            assert dashboard.get(path, auth=("someone", login[1]))[0] == 401, path
        assert_shows_service(dashboard, job_id, auth=login)
    finally:
        worker.register_death()  # type: ignore[no-untyped-call]
    assert login[1] not in dashboard.process.log()


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.10", "dashboard.example"])
def test_exposed_without_login_is_refused(bind: str) -> None:
    run = subprocess.run(
        [*cli_command(), "dashboard", "--bind", bind, "--port", str(free_port())],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == RET_CONFIG, (run.stdout, run.stderr)
    assert "DASHBOARD_USERNAME" in run.stderr and "DASHBOARD_PASSWORD" in run.stderr


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DASHBOARD_USERNAME": "ops"}, "DASHBOARD_PASSWORD"),
        ({"DASHBOARD_PASSWORD": "Qz5e1b7c"}, "DASHBOARD_USERNAME"),
        ({"DASHBOARD_USERNAME": "ops:root", "DASHBOARD_PASSWORD": "Qz5e1b7c"}, "DASHBOARD_USERNAME"),
        ({"DASHBOARD_USERNAME": "ops", "DASHBOARD_PASSWORD": "Qz5e\x1b1b7c"}, "DASHBOARD_PASSWORD"),
    ],
)
def test_login_settings_are_checked(env: dict[str, str], variable: str) -> None:
    from udemy_dl.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(env, env_file=None)
    assert caught.value.variable == variable
    assert "Qz5e" not in str(caught.value)


def test_loopback_binds(redis_conn: Redis) -> None:
    from udemy_dl.dashboard import check_exposure, is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))
    with_login = load_settings({"DASHBOARD_USERNAME": "ops", "DASHBOARD_PASSWORD": "pw"}, env_file=None)
    check_exposure(with_login, "0.0.0.0")  # allowed: a login guards it


def failed_download(settings: Settings, connection: Redis, store: SQLiteStore) -> tuple[int, str]:
    """A download whose last attempt failed: its row `failed`, its job in the failed registry."""
    task_id = store.insert_task("buyer@example.com", "https://courses.example/c/2", status=PROCESSING)
    job = (
        DownloadQueues(settings, connection)
        .enqueue({"taskId": task_id, "email": "buyer@example.com", "courseUrl": "https://courses.example/c/2"})
        .job
    )
    queue = worker_queues(settings, connection)[2]
    queue.remove(job.id)
    registry = FailedJobRegistry(queue.name, connection=connection)
    with connection.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        registry.add(job, ttl=3600, pipeline=pipe, exc_string="TransientError: origin down")
        pipe.execute()
    from udemy_dl.store import utcnow

    assert store.mark_failed(task_id, "TransientError: origin down (after 3 attempts)", None, utcnow())
    return task_id, job.id


def test_requeue_of_a_failed_download_reopens_its_row(redis_conn: Redis, tmp_path: Path) -> None:
    """rq-dashboard's Requeue (and Requeue all) put a failed download back through its row, as
    `udemy-dl requeue-failed` does; RQ's own requeue would run a job that skips a `failed` row."""
    from udemy_dl.dashboard import build_app

    store = SQLiteStore(tmp_path / "tasks.db")
    store.init_schema()
    settings = load_settings({"REDIS_URL": os.environ["REDIS_URL"], "DATABASE_URL": f"sqlite:///{store.path}"}, None)
    client = build_app(settings, redis_conn).test_client()

    task_id, job_id = failed_download(settings, redis_conn, store)
    assert store.get(task_id).status == FAILED  # type: ignore[union-attr]
    reply = client.post(f"/job/{job_id}/requeue")
    assert reply.status_code == 200 and reply.json["status"] == "OK", reply.json
    row = store.get(task_id)
    assert row is not None and row.status == PROCESSING and row.attempts == 0
    assert redis_conn.lrange("rq:queue:downloads", 0, -1) == [job_id.encode()]
    assert FailedJobRegistry("downloads", connection=redis_conn).get_job_ids(cleanup=False) == []

    redis_conn.delete("rq:queue:downloads")
    other_id, other_job = failed_download(settings, redis_conn, store)
    assert client.get("/requeue/downloads").status_code == 405  # a link must not requeue anything
    reply = client.post("/requeue/downloads")
    assert reply.json["count"] == 1 and reply.json["requeued"] == [other_job], reply.json
    row = store.get(other_id)
    assert row is not None and row.status == PROCESSING

    store.close()


def test_pages_never_show_a_redis_password(redis_conn: Redis) -> None:
    from udemy_dl.dashboard import build_app

    settings = load_settings({"REDIS_URL": "redis://ops:Qz7d0c4e9a@127.0.0.1:6379/5"}, env_file=None)
    client = build_app(settings, redis_conn).test_client()
    for page in ("/", "/0/view/workers", "/0/view/jobs", "/0/data/queues.json"):
        reply = client.get(page)
        assert reply.status_code == 200, page
        assert "Qz7d0c4e9a" not in reply.get_data(as_text=True), page
