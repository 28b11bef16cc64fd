"""The first design's one-liner, run from the repository root by a fresh interpreter:
`python3 -c "from worker_rq import process_download; print(process_download({...}))"`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from redis import Redis

from dev.devservers import ContentOrigin
from udemy_dl.store import COMPLETED, PROCESSING, SQLiteStore

REPO_ROOT = Path(__file__).resolve().parent.parent


def one_liner(task: dict[str, object], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = f"from worker_rq import process_download; print(process_download({task!r}))"
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("REDIS", "DATABASE", "DB_"))}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_the_one_liner_downloads_a_paid_task_and_prints_its_result(
    origin: ContentOrigin, redis_conn: Redis, redis_url: str, tmp_path: Path
) -> None:
    url = origin.add_course("seed", {"lesson.mp4": 5000})
    store = SQLiteStore(tmp_path / "tasks.sqlite3")
    store.init_schema()
    task_id = store.insert_task("buyer@example.com", url, PROCESSING)
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.sqlite3'}",
        "ALLOWED_HOSTS": origin.host_port,
        "DOWNLOAD_DIR": str(tmp_path / "downloads"),
        "FAILED_DIR": str(tmp_path / "failed"),
    }
    done = one_liner({"taskId": task_id, "email": "buyer@example.com", "courseUrl": url}, env)
    assert done.returncode == 0, done.stderr
    result = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert (result["success"], result["taskId"], result["files"]) == (True, task_id, 1)
    assert (tmp_path / "downloads" / str(task_id) / "lesson.mp4").stat().st_size == 5000
    row = store.get(task_id)
    assert row is not None and row.status == COMPLETED


def test_the_one_liner_without_a_database_prints_what_is_missing(tmp_path: Path) -> None:
    done = one_liner({"taskId": 1, "email": "a@b.c", "courseUrl": "https://cdn.example/c"}, {"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    result = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert result["success"] is False and "DATABASE_URL" in result["error"]
