"""The intake driven by a real Node.js client (clients/node/confirm.mjs, signing with the npm `standardwebhooks`).

Issue 5's judgement: the Node.js client confirms payment for 10 tasks, then once more, twice over;
real workers then complete each task once (each file fetched once); a bad signature, an old
timestamp and malformed bodies get 401/400 and change nothing.

Needs node (>= 18) and npm, and the npm registry (or npm's cache) for `npm ci`: missing, the tests
are skipped with the reason shown, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue

from dev.devservers import ContentOrigin
from tests.support.ci import in_ci
from tests.support.intake import Intake, queued, snapshot, start_intake
from tests.support.mariadb import TEST_URL
from tests.support.processes import LoggedProcess
from tests.support.scripts import run_command
from udemy_dl.queues import job_id_for
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, PENDING, PROCESSING, TaskStore, utcnow
from udemy_dl.webhooks import generate_secret

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
CLIENT = NODE_DIR / "confirm.mjs"
DOCS = NODE_DIR.parent.parent / "docs" / "INTAKE.md"
EMAIL = "buyer@shop.example"


def unavailable(reason: str) -> None:
    """Skip (laptop) or fail (CI=true) because the Node.js toolchain is missing or broken."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure)", pytrace=False)
    pytest.skip(f"{reason} (install Node.js >= 18 with npm, or run with CI=true to make this a failure)")


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, after `npm ci` installed the client's locked dependencies in clients/node."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if not node_bin or not npm_bin:
        unavailable(f"node and npm are needed on PATH (node: {node_bin}, npm: {npm_bin})")
    assert node_bin is not None and npm_bin is not None
    version = subprocess.run([node_bin, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        unavailable(f"Node.js >= 18 is needed for the global fetch, found {version}")
    installed = run_command([npm_bin, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, timeout=300)
    if installed.returncode != 0:
        unavailable(f"`npm ci` in {NODE_DIR} failed:\n{installed.stdout}\n{installed.stderr}")
    return node_bin


@dataclass
class NodeResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def answer(self) -> Any:
        return json.loads(self.stdout)

    def explain(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@pytest.fixture
def intake(
    configure: Callable[..., Settings],
    redis_conn: Redis,
    mysql_store: TaskStore,
    origin: ContentOrigin,
    secret: str,
) -> Iterator[Intake]:
    """The intake on MariaDB, with the environment a worker needs for the origin (workers read os.environ)."""
    settings = configure(DATABASE_URL=TEST_URL, API_SECRET_KEY=secret, ALLOWED_HOSTS=origin.host_port)
    yield from start_intake(settings, secret)


@pytest.fixture
def run_client(node: str, intake: Intake, secret: str) -> Callable[..., NodeResult]:
    """Run `node clients/node/confirm.mjs ARGS` against the intake, with INTAKE_URL and API_SECRET_KEY set."""

    def run(*args: object, secret_key: str = secret) -> NodeResult:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "INTAKE_URL": f"http://127.0.0.1:{intake.port}",
            "API_SECRET_KEY": secret_key,
        }
        done = run_command([node, CLIENT, *map(str, args)], env=env)
        return NodeResult(done.returncode, done.stdout, done.stderr)

    return run


def file_fetches(origin: ContentOrigin) -> Counter[str]:
    """How many times each course file was requested from the origin."""
    return Counter(path for path in origin.requests.paths() if path.startswith("/files/"))


def run_burst_workers(start_worker: Callable[..., LoggedProcess], count: int) -> None:
    """Real `udemy-dl worker --burst` processes, side by side, until the queues are empty."""
    workers = [start_worker(burst=True) for _ in range(count)]
    for worker in workers:
        assert worker.wait(timeout=180) == 0, worker.log()


def test_node_client_confirms_ten_tasks_twice_over_and_each_completes_once(
    run_client: Callable[..., NodeResult],
    intake: Intake,
    mysql_store: TaskStore,
    origin: ContentOrigin,
    redis_conn: Redis,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """Confirm 10 tasks from Node.js, then the same 10 again: 10 jobs. Workers complete each once, each file
    fetched once. Confirmed a third time after that, every task is refused as completed and nothing runs."""
    files = {"lesson-1.mp4": 40_000, "lesson-2.mp4": 25_000}
    ids = [mysql_store.insert_task(EMAIL, origin.add_course(f"course-{n}", files), PENDING) for n in range(10)]

    first = run_client(*ids)
    assert first.returncode == 0, first.explain()
    assert "HTTP 202" in first.stderr
    assert first.answer == {"enqueued": ids, "alreadyQueued": [], "refused": []}

    second = run_client(*ids)
    assert second.returncode == 0, second.explain()
    assert second.answer == {"enqueued": [], "alreadyQueued": ids, "refused": []}
    assert queued(redis_conn) == [job_id_for(task_id) for task_id in ids]
    assert {row.status for row in mysql_store.get_many(ids)} == {PROCESSING}

    status = run_client("--status", ids[0])
    assert status.returncode == 0, status.explain()
    assert (status.answer["taskId"], status.answer["status"]) == (ids[0], PROCESSING)

    run_burst_workers(start_worker, 2)
    rows = mysql_store.get_many(ids)
    assert [(row.status, row.attempts, row.progress) for row in rows] == [(COMPLETED, 1, 100)] * 10
    fetched = file_fetches(origin)
    expected = {f"/files/course-{n}/{name}" for n in range(10) for name in files}
    assert set(fetched) == expected
    assert set(fetched.values()) == {1}, fetched

    third = run_client(*ids)
    assert third.returncode == 0, third.explain()
    assert third.answer == {
        "enqueued": [],
        "alreadyQueued": [],
        "refused": [{"taskId": task_id, "reason": "task is completed"} for task_id in ids],
    }
    assert queued(redis_conn) == []
    run_burst_workers(start_worker, 1)
    assert file_fetches(origin) == fetched, "a completed task was fetched again"

    done = run_client("--status", ids[-1])
    assert done.returncode == 0, done.explain()
    assert (done.answer["status"], done.answer["progress"], done.answer["bytes"]) == (COMPLETED, 100, 65_000)
    assert done.answer["outputPath"] and done.answer["finishedAt"].endswith("Z")


BAD_REQUESTS: list[tuple[str, Callable[[list[int]], list[object]], int, str]] = [
    ("bad-signature", lambda ids: ["--bad-signature", *ids], 401, "no matching signature"),
    ("old-timestamp", lambda ids: ["--old-timestamp", *ids], 401, "too old"),
    ("unsigned", lambda ids: ["--unsigned", *ids], 401, "missing header"),
    ("body-only-signature", lambda ids: ["--body-only-signature", *ids], 401, "must cover the method and the path"),
    ("signed-for-another-path", lambda ids: ["--signed-path", "/orders/confirm?x=1", *ids], 401, "no matching"),
    ("not-json", lambda ids: ["--body", f"taskIds={ids[0]}"], 400, "not valid JSON"),
    ("ids-not-a-list", lambda ids: ["--body", json.dumps({"taskIds": ids[0]})], 400, "must be a list"),
    ("ids-missing", lambda ids: ["--body", json.dumps({"ids": ids})], 400, "unknown field"),
    ("ids-empty", lambda ids: ["--body", json.dumps({"taskIds": []})], 400, "must not be empty"),
    ("id-as-string", lambda ids: ["--body", json.dumps({"taskIds": [*ids, "7"]})], 400, 'got "7"'),
    ("id-negative", lambda ids: ["--body", json.dumps({"taskIds": [ids[0], -5]})], 400, "got -5"),
    ("too-many", lambda ids: ["--body", json.dumps({"taskIds": list(range(1, 1002))})], 400, "at most 1000"),
    ("bogus-priority", lambda ids: ["--priority", "urgent", *ids], 400, 'got "urgent"'),
]


@pytest.mark.parametrize(
    ("make_args", "status", "expected"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_node_client_bad_requests_get_4xx_and_change_nothing(
    run_client: Callable[..., NodeResult],
    mysql_store: TaskStore,
    redis_conn: Redis,
    make_args: Callable[[list[int]], list[object]],
    status: int,
    expected: str,
) -> None:
    """A bad signature, an old timestamp, no signature, malformed bodies: 401/400 from Node, exit 1, nothing changed."""
    ids = [mysql_store.insert_task(EMAIL, "https://cdn.example/courses/x", PENDING) for _ in range(3)]
    before = snapshot(redis_conn, mysql_store, ids)
    result = run_client(*make_args(ids))
    assert result.returncode == 1, result.explain()
    assert f"HTTP {status} POST /orders/confirm" in result.stderr
    assert expected.lower() in result.answer["error"].lower()
    assert snapshot(redis_conn, mysql_store, ids) == before
    assert {row.status for row in mysql_store.get_many(ids)} == {PENDING}
    assert Queue("downloads", connection=redis_conn).count == 0


def test_node_client_replayed_message_gets_the_same_answer(
    run_client: Callable[..., NodeResult], mysql_store: TaskStore, redis_conn: Redis
) -> None:
    """The same webhook-id sent twice from Node (a network retry of one message): the first answer, again."""
    ids = [mysql_store.insert_task(EMAIL, "https://cdn.example/courses/y", PENDING) for _ in range(2)]
    first = run_client("--msg-id", "msg_node_retry", *ids)
    before = snapshot(redis_conn, mysql_store, ids)
    again = run_client("--msg-id", "msg_node_retry", *ids)
    assert (first.returncode, again.returncode) == (0, 0), again.explain()
    assert first.answer == again.answer == {"enqueued": ids, "alreadyQueued": [], "refused": []}
    assert "replayed" in again.stderr
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_node_client_status_of_unknown_task_is_404_and_wrong_key_is_401(
    run_client: Callable[..., NodeResult],
) -> None:
    missing = run_client("--status", 987654)
    assert (missing.returncode, missing.answer) == (1, {"error": "no such task", "taskId": 987654}), missing.explain()
    assert "HTTP 404" in missing.stderr
    wrong = run_client("--status", 1, secret_key=generate_secret())
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr, wrong.explain()


def test_node_client_signature_reads_only_the_task_it_was_made_for(
    run_client: Callable[..., NodeResult], mysql_store: TaskStore
) -> None:
    """Node signs method and path: a status read signed for another task, or over the body alone, is 401."""
    first, second = (mysql_store.insert_task(EMAIL, "https://cdn.example/courses/s", PENDING) for _ in range(2))
    assert run_client("--status", first).returncode == 0
    other = run_client("--status", first, "--signed-path", f"/tasks/{second}")
    assert other.returncode == 1 and "HTTP 401" in other.stderr, other.explain()
    assert "no matching signature" in other.answer["error"].lower()
    body_only = run_client("--status", first, "--body-only-signature")
    assert body_only.returncode == 1 and "HTTP 401" in body_only.stderr, body_only.explain()
    assert "must cover the method and the path" in body_only.answer["error"]


def test_node_client_refuses_bad_usage_without_calling(run_client: Callable[..., NodeResult]) -> None:
    """Task ids that are not positive integers are a usage error (exit 2) in the client itself."""
    result = run_client("12", "abc")
    assert result.returncode == 2, result.explain()
    assert "positive integers" in result.stderr


def test_the_node_example_in_the_docs_works(
    node: str, intake: Intake, mysql_store: TaskStore, redis_conn: Redis, secret: str
) -> None:
    """docs/INTAKE.md's Node.js snippet, run as written (from clients/node, where its package is installed)."""
    match = re.search(r"```js\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "no js block in docs/INTAKE.md"
    ids = [mysql_store.insert_task(EMAIL, "https://cdn.example/courses/z", PENDING) for _ in range(2)]
    script = (
        match.group(1).replace("[101, 102]", json.dumps(ids)) + "\nconsole.log(JSON.stringify({ status, body }));\n"
    )
    done = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=NODE_DIR,
        env={
            "PATH": os.environ.get("PATH", ""),
            "INTAKE_URL": f"http://127.0.0.1:{intake.port}",
            "API_SECRET_KEY": secret,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": 202, "body": {"enqueued": ids, "alreadyQueued": [], "refused": []}}


def test_node_client_cancels_a_task_once_and_a_completed_one_is_refused(
    run_client: Callable[..., NodeResult], mysql_store: TaskStore
) -> None:
    """`--cancel`: 200 and the task failed `cancelled: refund`; again 200 already cancelled; a
    completed task 409, unchanged."""
    task_id = mysql_store.insert_task(EMAIL, "https://cdn.example/courses/c", PROCESSING)
    first = run_client("--cancel", task_id, "--reason", "refund")
    assert first.returncode == 0 and "HTTP 200" in first.stderr, first.explain()
    assert (first.answer["result"], first.answer["error"]) == ("cancelled", "cancelled: refund")
    again = run_client("--cancel", task_id)
    assert (again.returncode, again.answer["result"]) == (0, "already_cancelled"), again.explain()
    row = mysql_store.get(task_id)
    assert row is not None and (row.status, row.error_message) == ("failed", "cancelled: refund")
    done = mysql_store.insert_task(EMAIL, "https://cdn.example/courses/c", PROCESSING)
    assert mysql_store.mark_completed(done, "/done", 1, utcnow())
    refused = run_client("--cancel", done)
    assert refused.returncode == 1 and "HTTP 409" in refused.stderr, refused.explain()
    assert mysql_store.get(done).status == COMPLETED  # type: ignore[union-attr]
