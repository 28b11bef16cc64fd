"""The acceptance test: twenty paid orders through the real scripts, workers, Redis, MariaDB and webhooks."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from dev.devservers import WebhookReceiver, write_sample_file
from tests.support.deployment import Scripts
from tests.support.e2e import HOSTNAME, E2EEnv, host_workers, worker_pids_by_name
from tests.support.files import sha256_of
from tests.support.http_servers import Origin, completed_ids
from tests.support.processes import pid_running
from tests.support.waiting import wait_for
from udemy_dl.store import COMPLETED, MySQLStore
from udemy_dl.webhooks import FAILED as EVENT_FAILED

pytestmark = pytest.mark.e2e

TASKS = 20
WORKERS = 5
STOP_TIMEOUT = 10
BIG_FILE = 50 * 1024 * 1024


@dataclass(frozen=True)
class Course:
    """What a course holds: relative path in the task folder -> (origin URL path, size)."""

    url: str
    title: str
    files: dict[str, tuple[str, int]]
    manifest: str | None  # URL path of the manifest; None when the course URL is the file itself


def _manifest_course(origin: Origin, slug: str, files: dict[str, int]) -> Course:
    """A manifest course with root-relative file URLs (`/files/<slug>/<path>`), sizes and sha256."""
    url = origin.add_course(slug, files)
    spec = {rel: (f"/files/{slug}/{rel}", size) for rel, size in files.items()}
    return Course(url, slug.replace("-", " ").title(), spec, f"/courses/{slug}")


def _relative_url_course(origin: Origin, slug: str, files: dict[str, int], absolute: bool) -> Course:
    """A manifest whose file URLs are path-relative (`../files/...`) or absolute (`http://host/files/...`)."""
    entries = []
    spec = {}
    for rel, size in files.items():
        url_path = f"/files/{slug}/{rel}"
        sha = write_sample_file(origin.file_path(url_path), size, f"{slug}/{rel}")
        url = f"{origin.base_url}{url_path}" if absolute else f"..{url_path}"
        entries.append({"path": rel, "url": url, "size": size, "sha256": sha})
        spec[rel] = (url_path, size)
    title = f"{slug} course"
    url = origin.set_manifest(f"/courses/{slug}", {"title": title, "files": entries})
    return Course(url, title, spec, f"/courses/{slug}")


def _single_file_course(origin: Origin) -> Course:
    """A course that is one 50 MB file, served directly (no manifest)."""
    url_path = "/files/big/lecture-recording.mp4"
    write_sample_file(origin.file_path(url_path), BIG_FILE, "big")
    spec = {"lecture-recording.mp4": (url_path, BIG_FILE)}
    return Course(f"{origin.base_url}{url_path}", "lecture-recording.mp4", spec, None)


def _check_task_folder(env: E2EEnv, origin: Origin, task_id: int, course: Course) -> int:
    """Every file in DOWNLOAD_DIR/<id>/ matches the origin's bytes and the manifest.json record."""
    folder = env.download_dir / str(task_id)
    assert folder.is_dir(), f"task {task_id}: no folder {folder}"
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted([*course.files, "manifest.json"]), f"task {task_id}: {on_disk}"
    record = json.loads((folder / "manifest.json").read_text())
    assert record["courseUrl"] == course.url
    assert record["title"] == course.title
    recorded = {item["path"]: item for item in record["files"]}
    assert set(recorded) == set(course.files)
    total = 0
    for rel, (url_path, size) in course.files.items():
        expected_sha = sha256_of(origin.file_path(url_path))
        assert (folder / rel).stat().st_size == size
        assert sha256_of(folder / rel) == expected_sha, f"task {task_id}: {rel} differs from the origin"
        assert recorded[rel] == {"path": rel, "size": size, "sha256": expected_sha}
        total += size
    assert record["bytes"] == total
    return total


def test_twenty_paid_tasks_end_to_end(
    e2e_env: E2EEnv,
    e2e_scripts: Scripts,
    e2e_store: MySQLStore,
    token_origin: Origin,
    receiver: WebhookReceiver,
) -> None:
    courses = [
        _manifest_course(
            token_origin,
            "python-basics",
            {"01-intro/welcome.mp4": 300_000, "01-intro/slides.pdf": 40_000, "02-syntax/loops.mp4": 650_000},
        ),
        _manifest_course(
            token_origin,
            "data-science",
            {
                "section-1/lesson-1/video.mp4": 1_200_000,
                "section-1/lesson-1/notes.txt": 1_500,
                "section-2/dataset.csv": 2 * 1024 * 1024 + 17,
                "README.md": 0,
            },
        ),
        _relative_url_course(token_origin, "web-dev", {"part-a/html.mp4": 500_000, "part-b/css.mp4": 700_001}, False),
        _relative_url_course(token_origin, "devops", {"ci/pipelines.mp4": 900_000, "exercises.zip": 123_456}, True),
        _single_file_course(token_origin),
    ]

    # The shop creates the orders, unpaid.
    assigned: dict[int, Course] = {}
    for n in range(TASKS):
        course = courses[n % len(courses)]
        task_id = e2e_store.insert_task(f"buyer{n}@example.com", course.url)
        assigned[task_id] = course
    ids = sorted(assigned)
    assert e2e_store.count_by_status() == {"pending": TASKS}

    e2e_env.vars.update(WORKER_COUNT=str(WORKERS), STOP_TIMEOUT=str(STOP_TIMEOUT))
    started = e2e_scripts.start()
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    worker_pids = e2e_scripts.pids()
    assert sorted(worker_pids) == list(range(1, WORKERS + 1))
    info = e2e_env.rq_info()
    assert host_workers(info) == {f"udemy-dl.{HOSTNAME}.{n}": pid for n, pid in worker_pids.items()}, info
    assert re.search(rf"^{WORKERS} workers, ", info, re.MULTILINE), info

    # Unpaid orders are not touched: no job, no request to the origin.
    assert token_origin.requests.paths() == []

    paid = e2e_env.cli("confirm-payment", "--json", *map(str, ids))
    assert paid.returncode == 0, paid.stdout + paid.stderr
    result = json.loads(paid.stdout)
    assert sorted(result["enqueued"]) == ids
    assert result["alreadyQueued"] == [] and result["refused"] == []

    def all_completed() -> bool:
        return e2e_store.count_by_status() == {COMPLETED: TASKS}

    try:
        wait_for(all_completed, timeout=120, what="all 20 tasks to be completed", interval=0.25)
    except AssertionError:
        raise AssertionError(f"{e2e_store.count_by_status()}\n{e2e_env.logs()}") from None

    for row in e2e_store.get_many(ids):
        course = assigned[row.id]
        total = _check_task_folder(e2e_env, token_origin, row.id, course)
        assert row.output_path == str(e2e_env.download_dir / str(row.id))
        assert row.bytes == total
        assert row.progress == 100
        assert row.attempts == 1
        assert row.error_message is None
        assert row.finished_at is not None
    staging = e2e_env.download_dir / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []

    # Exactly one signed download.completed event per task (same id on every delivery attempt).
    wait_for(lambda: set(completed_ids(receiver)) == set(ids), timeout=30, what="a webhook per task", interval=0.1)
    completed = completed_ids(receiver)
    assert all(len(completed[task_id]) == 1 for task_id in ids), completed
    assert all(item.verified for item in receiver.received), "every delivery carries a valid signature"
    assert not [item for item in receiver.received if item.event_type == EVENT_FAILED]
    for item in receiver.outcomes():
        data = item.body["data"]
        course = assigned[int(data["taskId"])]
        assert data["status"] == COMPLETED
        assert data["courseUrl"] == course.url
        assert data["email"] == f"buyer{ids.index(int(data['taskId']))}@example.com"
        assert data["bytes"] == sum(size for _, size in course.files.values())

    # Nothing fetched twice: each file and manifest requested once per task that holds it.
    requested = Counter(token_origin.requests.paths())
    expected: Counter[str] = Counter()
    for course in assigned.values():
        if course.manifest is not None:
            expected[course.manifest] += 1
        for url_path, _ in course.files.values():
            expected[url_path] += 1
    assert requested == expected
    token = f"Bearer {token_origin.token}"
    assert all(headers.get("Authorization") == token for _, _, headers in token_origin.requests.entries)

    # Stop: exit 0 within STOP_TIMEOUT, nothing left running, no PID file left.
    began = time.monotonic()
    stopped = e2e_scripts.stop(timeout=STOP_TIMEOUT + 20)
    elapsed = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert elapsed <= STOP_TIMEOUT, f"stop_workers.sh took {elapsed:.1f}s (STOP_TIMEOUT={STOP_TIMEOUT})"
    assert "killed" not in stopped.stdout, "idle workers must stop on SIGTERM alone"
    assert not any(pid_running(pid) for pid in worker_pids.values())
    assert worker_pids_by_name(e2e_env.run_id) == {}
    assert e2e_env.leftover_processes() == []
    assert e2e_scripts.pid_files() == []
    assert host_workers(e2e_env.rq_info()) == {}, "stopped workers deregister"
