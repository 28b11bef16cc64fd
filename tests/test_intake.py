"""The intake (`udemy-dl serve`, SPEC §10) over real HTTP, against real Redis (DB 15) and MariaDB / SQLite.

Each test starts the server on a free port in a thread (make_server) and talks to it with
http.client, signing requests with the same Standard Webhooks helper our webhooks use. Every 4xx
test proves that nothing changed: the task rows and the whole Redis keyspace are compared before
and after.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from redis import Redis
from rq import Queue
from standardwebhooks import Webhook

from tests.support.ci import in_ci
from tests.support.intake import (
    CONFIRM,
    NOT_PLAIN_DIGITS,
    Intake,
    LogRecords,
    Reply,
    new_msg_id,
    pending_tasks,
    queued,
    raw_exchange,
    request_bytes,
    signed_request,
    snapshot,
    start_intake,
)
from tests.support.mariadb import TEST_URL
from tests.support.service import Backend
from udemy_dl import http_server
from udemy_dl import intake as intake_module
from udemy_dl.errors import ConfigError
from udemy_dl.intake import MAX_BODY_BYTES, MAX_TASK_IDS, REPLAY_KEY
from udemy_dl.queues import job_id_for
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, PENDING, PROCESSING, TaskStore, utcnow
from udemy_dl.web import make_server
from udemy_dl.webhooks import generate_secret, sign_headers

EMAIL = "buyer@shop.example"
COURSE = "https://cdn.example/courses/1"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "INTAKE.md"
CLOSED_REDIS = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: connecting fails at once."""

# -- confirm: success and idempotency ---------------------------------------------------------------


def test_signed_confirm_answers_202_and_enqueues(intake_on: Intake, backend: Backend, redis_conn: Redis) -> None:
    """A signed confirmation moves the rows to processing, queues one job each and says so; unknown ids are refused."""
    ids = pending_tasks(backend.store, 3)
    reply = intake_on.confirm({"taskIds": [*ids, 999_999]})
    assert reply.status == 202, reply.raw
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "enqueued": ids,
        "alreadyQueued": [],
        "refused": [{"taskId": 999_999, "reason": "no such task"}],
    }
    assert {row.status for row in backend.store.get_many(ids)} == {PROCESSING}
    assert queued(redis_conn) == [job_id_for(task_id) for task_id in ids]


def test_high_priority_goes_on_the_vip_queue(intake: Intake, mysql_store: TaskStore, redis_conn: Redis) -> None:
    """ "priority": "high" puts the jobs on the VIP queue and records the priority on the rows."""
    ids = pending_tasks(mysql_store, 2)
    reply = intake.confirm({"taskIds": ids, "priority": "high"})
    assert (reply.status, reply.json()["enqueued"]) == (202, ids)
    assert queued(redis_conn, "downloads-high") == [job_id_for(task_id) for task_id in ids]
    assert queued(redis_conn) == []
    assert {row.priority for row in mysql_store.get_many(ids)} == {"high"}


def test_the_same_request_twice_changes_nothing(intake_on: Intake, backend: Backend, redis_conn: Redis) -> None:
    """The same confirmation sent again (a new webhook-id, as a retrying client sends) answers alreadyQueued
    and changes no row and no job."""
    ids = pending_tasks(backend.store, 3)
    assert intake_on.confirm({"taskIds": ids}).json()["enqueued"] == ids
    before = snapshot(redis_conn, backend.store, ids, replay_keys=False)
    again = intake_on.confirm({"taskIds": ids})
    assert again.status == 202
    assert again.json() == {"enqueued": [], "alreadyQueued": ids, "refused": []}
    assert snapshot(redis_conn, backend.store, ids, replay_keys=False) == before


def test_confirming_a_completed_task_refuses_it_and_queues_nothing(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis
) -> None:
    """Once done, a task confirmed again is refused as completed: no new download."""
    (task_id,) = pending_tasks(mysql_store, 1)
    assert intake.confirm({"taskIds": [task_id]}).status == 202
    redis_conn.delete(Queue("downloads", connection=redis_conn).key)  # as if a worker took it...
    assert mysql_store.mark_completed(task_id, "/srv/out/1", 10, utcnow())  # ...and finished it
    reply = intake.confirm({"taskIds": [task_id]})
    assert reply.json() == {
        "enqueued": [],
        "alreadyQueued": [],
        "refused": [{"taskId": task_id, "reason": "task is completed"}],
    }
    assert queued(redis_conn) == []


def test_a_replayed_webhook_id_gets_the_first_answer(intake: Intake, mysql_store: TaskStore, redis_conn: Redis) -> None:
    """The very same signed message sent twice: the second answer is the first one, flagged, and nothing moves."""
    ids = pending_tasks(mysql_store, 2)
    body = json.dumps({"taskIds": ids})
    headers = intake.signed("POST", CONFIRM, body, msg_id="msg_replay")
    first = intake.request("POST", "/orders/confirm", body.encode(), headers)
    assert first.json()["enqueued"] == ids
    assert cast(int, redis_conn.ttl(REPLAY_KEY.format("msg_replay"))) > 300
    before = snapshot(redis_conn, mysql_store, ids)
    second = intake.request("POST", "/orders/confirm", body.encode(), headers)
    assert (second.status, second.json(), second.headers.get("idempotent-replayed")) == (202, first.json(), "true")
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_a_webhook_id_reused_for_another_body_is_a_409(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis
) -> None:
    """A webhook-id names one message: the same id on a different (validly signed) body is refused, unchanged."""
    first, second = pending_tasks(mysql_store, 2)
    assert intake.confirm({"taskIds": [first]}, msg_id="msg_reused").status == 202
    before = snapshot(redis_conn, mysql_store, [first, second])
    reply = intake.confirm({"taskIds": [second]}, msg_id="msg_reused")
    assert reply.status == 409 and "different body" in reply.error
    assert snapshot(redis_conn, mysql_store, [first, second]) == before


def test_a_replay_waits_for_the_first_answer_then_gets_it(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis
) -> None:
    """A replay arriving while the first request with its webhook-id still runs waits for that answer."""
    body = json.dumps({"taskIds": pending_tasks(mysql_store, 1)})
    key = REPLAY_KEY.format("msg_slow")
    digest = hashlib.sha256(body.encode()).hexdigest()
    redis_conn.set(key, json.dumps({"body": digest}), ex=60)  # the first request, still at work
    headers = intake.signed("POST", CONFIRM, body, msg_id="msg_slow")
    replies: list[Reply] = []
    thread = threading.Thread(
        target=lambda: replies.append(intake.request("POST", "/orders/confirm", body.encode(), headers))
    )
    thread.start()
    first_answer = {"enqueued": [], "alreadyQueued": [], "refused": [{"taskId": 1, "reason": "from the first"}]}
    threading.Timer(0.5, lambda: redis_conn.set(key, json.dumps({"body": digest, "answer": first_answer}))).start()
    thread.join(timeout=30)
    assert (replies[0].status, replies[0].json()) == (202, first_answer)
    assert queued(redis_conn) == [], "the replay ran nothing itself"


def test_a_replay_of_a_request_still_running_after_the_wait_is_409(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "REPLAY_WAIT", 0.3)
    ids = pending_tasks(mysql_store, 1)
    body = json.dumps({"taskIds": ids})
    redis_conn.set(REPLAY_KEY.format("msg_stuck"), json.dumps({"body": hashlib.sha256(body.encode()).hexdigest()}))
    before = snapshot(redis_conn, mysql_store, ids)
    reply = intake.confirm(body, msg_id="msg_stuck")
    assert (reply.status, reply.headers.get("retry-after")) == (409, "1")
    assert "still in progress" in reply.error
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_a_failed_confirmation_releases_its_webhook_id(
    configure: Callable[..., Settings], redis_conn: Redis, secret: str
) -> None:
    """The database is down: 503, and the webhook-id is let go, so a retry of the same message runs."""
    settings = configure(DATABASE_URL="mysql://root@127.0.0.1:1/udemy_dl_test", API_SECRET_KEY=secret)
    for intake in start_intake(settings, secret):
        reply = intake.confirm({"taskIds": [1]}, msg_id="msg_db_down")
        assert reply.status == 503 and "database" in reply.error and reply.headers["retry-after"]
    assert redis_conn.exists(REPLAY_KEY.format("msg_db_down")) == 0
    assert queued(redis_conn) == []


def test_concurrent_confirmations_make_one_job(intake: Intake, mysql_store: TaskStore, redis_conn: Redis) -> None:
    """Ten clients confirm the same task at once (each request on its own thread and connection): one job."""
    (task_id,) = pending_tasks(mysql_store, 1)
    replies: list[Reply] = []
    lock = threading.Lock()

    def confirm() -> None:
        reply = intake.confirm({"taskIds": [task_id]})
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=confirm) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [reply.status for reply in replies] == [202] * 10
    assert sum(len(reply.json()["enqueued"]) for reply in replies) == 1
    assert sum(len(reply.json()["alreadyQueued"]) for reply in replies) == 9
    assert queued(redis_conn) == [job_id_for(task_id)]


# -- confirm: authentication ------------------------------------------------------------------------


def _bad_signature(intake: Intake, body: str) -> dict[str, str]:
    return signed_request(generate_secret(), "POST", CONFIRM, body)


def _no_headers(intake: Intake, body: str) -> dict[str, str]:
    return {"Content-Type": "application/json"}


def _no_signature_header(intake: Intake, body: str) -> dict[str, str]:
    headers = intake.signed("POST", CONFIRM, body)
    del headers["webhook-signature"]
    return headers


def _six_minutes_old(intake: Intake, body: str) -> dict[str, str]:
    return intake.signed("POST", CONFIRM, body, at=datetime.now(UTC) - timedelta(minutes=6))


def _six_minutes_ahead(intake: Intake, body: str) -> dict[str, str]:
    return intake.signed("POST", CONFIRM, body, at=datetime.now(UTC) + timedelta(minutes=6))


def _garbled_signature(intake: Intake, body: str) -> dict[str, str]:
    return {**intake.signed("POST", CONFIRM, body), "webhook-signature": "v1 no-comma-here"}


def _signed_for_other_body(intake: Intake, body: str) -> dict[str, str]:
    return intake.signed("POST", CONFIRM, body.replace("]", ", 1]"))


@pytest.mark.parametrize(
    ("make_headers", "expected"),
    [
        (_bad_signature, "no matching signature"),
        (_no_headers, "missing header(s) webhook-id, webhook-timestamp, webhook-signature"),
        (_no_signature_header, "missing header(s) webhook-signature"),
        (_six_minutes_old, "too old"),
        (_six_minutes_ahead, "too new"),
        (_garbled_signature, "malformed"),
        (_signed_for_other_body, "no matching signature"),
    ],
    ids=["bad-signature", "no-headers", "no-signature", "old-timestamp", "future-timestamp", "garbled", "other-body"],
)
def test_unauthenticated_confirm_is_401_and_changes_nothing(
    intake: Intake,
    mysql_store: TaskStore,
    redis_conn: Redis,
    make_headers: Callable[[Intake, str], dict[str, str]],
    expected: str,
) -> None:
    """A bad or missing signature, or a timestamp more than 5 minutes off: 401, rows still pending, no job."""
    ids = pending_tasks(mysql_store, 2)
    before = snapshot(redis_conn, mysql_store, ids)
    body = json.dumps({"taskIds": ids})
    reply = intake.request("POST", "/orders/confirm", body.encode(), make_headers(intake, body))
    assert reply.status == 401, reply.raw
    assert expected in reply.error.lower()
    assert snapshot(redis_conn, mysql_store, ids) == before
    assert {row.status for row in mysql_store.get_many(ids)} == {PENDING}
    assert queued(redis_conn) == []


# -- signatures cover the method and the request-target ----------------------------------------------


def test_a_body_only_signature_is_refused_saying_it_must_cover_method_and_path(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis
) -> None:
    """Headers signed over the empty body alone (the old scheme) used to read any task for five minutes: now 401,
    with a reason that says what to sign. The same for a confirmation signed over its body alone."""
    first, second = pending_tasks(mysql_store, 2)
    body_only = sign_headers(intake.secret, new_msg_id(), "")
    for task_id in (first, second):
        reply = intake.request("GET", f"/tasks/{task_id}", headers=body_only)
        assert reply.status == 401, reply.raw
        assert "must cover the method and the path" in reply.error

    before = snapshot(redis_conn, mysql_store, [first, second])
    body = json.dumps({"taskIds": [first, second]})
    reply = intake.request("POST", CONFIRM, body.encode(), sign_headers(intake.secret, new_msg_id(), body))
    assert reply.status == 401, reply.raw
    assert "must cover the method and the path" in reply.error
    assert snapshot(redis_conn, mysql_store, [first, second]) == before


def test_a_task_read_signed_for_one_task_does_not_read_another(intake: Intake, mysql_store: TaskStore) -> None:
    first, second = pending_tasks(mysql_store, 2)
    headers = intake.signed("GET", f"/tasks/{first}")
    assert intake.request("GET", f"/tasks/{first}", headers=headers).status == 200
    reply = intake.request("GET", f"/tasks/{second}", headers=headers)
    assert reply.status == 401, reply.raw
    assert "no matching signature" in reply.error.lower()


@pytest.mark.parametrize(
    ("signed_target", "sent_target", "status"),
    [
        ("/tasks/{}", "/tasks/{}?x=1", 401),
        ("/tasks/{}?x=1", "/tasks/{}", 401),
        ("/tasks/{}?x=1", "/tasks/{}?x=1", 200),
        ("/tasks/{}?", "/tasks/{}?", 200),
        ("/tasks/{}", "/tasks/{}?", 401),
        ("/tasks/{}", "/tasks/%3{}", 401),
    ],
    ids=["query-added", "query-dropped", "same-query", "empty-query", "empty-query-added", "percent-encoded"],
)
def test_the_signed_path_is_the_raw_request_target_with_its_query(
    intake: Intake, mysql_store: TaskStore, signed_target: str, sent_target: str, status: int
) -> None:
    """The path signed is the request-target exactly as sent: query string included, percent-encoding not undone."""
    (task_id,) = pending_tasks(mysql_store, 1)
    if "%3" in sent_target:  # /tasks/%3N reads task N only for single-digit ids; use the encoded form of the id
        sent_target = "/tasks/" + "".join(f"%3{digit}" for digit in str(task_id))
    headers = intake.signed("GET", signed_target.format(task_id))
    reply = intake.request("GET", sent_target.format(task_id), headers=headers)
    assert reply.status == status, reply.raw


def test_a_confirmation_signed_for_another_method_or_path_is_401(
    intake: Intake, mysql_store: TaskStore, redis_conn: Redis
) -> None:
    ids = pending_tasks(mysql_store, 1)
    body = json.dumps({"taskIds": ids})
    before = snapshot(redis_conn, mysql_store, ids)
    for method, target in (("PUT", CONFIRM), ("POST", CONFIRM + "?priority=high"), ("POST", "/orders/confirm/")):
        reply = intake.request("POST", CONFIRM, body.encode(), intake.signed(method, target, body))
        assert reply.status == 401, (method, target, reply.raw)
        assert "no matching signature" in reply.error.lower()
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_a_signature_among_several_that_covers_the_request_is_enough(intake: Intake, mysql_store: TaskStore) -> None:
    """Standard Webhooks allows several space-separated signatures (as while a key is rotated): one match will do."""
    (task_id,) = pending_tasks(mysql_store, 1)
    target = f"/tasks/{task_id}"
    headers = intake.signed("GET", target)
    stale = signed_request(generate_secret(), "GET", target)["webhook-signature"]
    headers["webhook-signature"] = f"{stale} {headers['webhook-signature']}"
    assert intake.request("GET", target, headers=headers).status == 200


SIGNING_VECTOR = re.compile(r"<!-- signing-vector: (\{.*?\}) -->", re.DOTALL)


def doc_block(language: str, containing: str) -> str:
    """The fenced *language* block of docs/INTAKE.md that contains *containing*."""
    for block in re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL):
        if containing in block:
            return str(block)
    raise AssertionError(f"no {language} block containing {containing!r} in docs/INTAKE.md")


def signing_vector() -> dict[str, str]:
    match = SIGNING_VECTOR.search(DOCS.read_text(encoding="utf-8"))
    assert match is not None, "docs/INTAKE.md has no signing-vector comment"
    return cast(dict[str, str], json.loads(match.group(1)))


def test_the_signing_example_in_the_docs_is_right() -> None:
    """docs/INTAKE.md's worked example: its stated signature is what Standard Webhooks gives over
    `METHOD PATH\\n` + body, what its Python lines print and what its openssl lines print; and the intake takes it."""
    vector = signing_vector()
    content = f"{vector['method']} {vector['target']}\n{vector['body']}"
    at = datetime.fromtimestamp(int(vector["timestamp"]), UTC)
    expected = sign_headers(vector["secret"], vector["id"], content, now=at)["webhook-signature"]
    assert vector["signature"] == expected
    made = intake_module.sign_request(
        vector["secret"], vector["method"], vector["target"], vector["body"], vector["id"], at
    )
    assert made["webhook-signature"] == expected, "udemy_dl.intake.sign_request, the helper for Python callers"

    namespace: dict[str, Any] = {"__name__": "intake_docs_vector"}
    exec(compile(doc_block("python", "hmac.new"), str(DOCS), "exec"), namespace)
    assert namespace["signature"] == expected

    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("openssl or bash is missing: the shell example was not run")
    shell = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", doc_block("sh", "openssl dgst")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == expected

    headers = {"webhook-id": vector["id"], "webhook-timestamp": vector["timestamp"], "webhook-signature": expected}
    intake_module.verify_request(
        Webhook(vector["secret"]), vector["method"], vector["target"], vector["body"], headers, now=at
    )


# -- confirm: malformed bodies ----------------------------------------------------------------------

MALFORMED: list[tuple[str, Callable[[int], str], str, str | None]] = [
    ("not-json", lambda t: "{taskIds: [1]", "not valid JSON", None),
    ("not-utf8", lambda t: "\udcff", "not UTF-8", None),
    ("array", lambda t: json.dumps([t]), "must be a JSON object", None),
    ("missing", lambda t: json.dumps({"priority": "high"}), "taskIds is required", "taskIds"),
    ("null", lambda t: json.dumps({"taskIds": None}), "taskIds must be a list of task ids, got null", "taskIds"),
    ("string", lambda t: json.dumps({"taskIds": str(t)}), "must be a list of task ids, got string", "taskIds"),
    ("empty", lambda t: json.dumps({"taskIds": []}), "must not be empty", "taskIds"),
    (
        "string-id",
        lambda t: json.dumps({"taskIds": [t, str(t)]}),
        'taskIds[1] must be a positive integer, got "{}"',
        "taskIds",
    ),
    (
        "negative",
        lambda t: json.dumps({"taskIds": [t, -3]}),
        "taskIds[1] must be a positive integer, got -3",
        "taskIds",
    ),
    ("zero", lambda t: json.dumps({"taskIds": [0, t]}), "taskIds[0] must be a positive integer, got 0", "taskIds"),
    ("float", lambda t: json.dumps({"taskIds": [t + 0.5]}), "taskIds[0] must be a positive integer", "taskIds"),
    ("boolean", lambda t: json.dumps({"taskIds": [t, True]}), "got true (boolean)", "taskIds"),
    ("huge", lambda t: json.dumps({"taskIds": [t, 2**64]}), "taskIds[1] is too large", "taskIds"),
    (
        "too-many",
        lambda t: json.dumps({"taskIds": [t, *range(10**6, 10**6 + MAX_TASK_IDS)]}),
        f"at most {MAX_TASK_IDS}",
        "taskIds",
    ),
    ("bogus-priority", lambda t: json.dumps({"taskIds": [t], "priority": "urgent"}), 'got "urgent"', "priority"),
    ("null-priority", lambda t: json.dumps({"taskIds": [t], "priority": None}), "priority must be one of", "priority"),
    (
        "unknown-field",
        lambda t: json.dumps({"taskIds": [t], "priorty": "high"}),
        'unknown field(s) "priorty"',
        "priorty",
    ),
]


@pytest.mark.parametrize(("make_body", "expected", "field"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_body_is_400_naming_the_problem_and_changes_nothing(
    intake: Intake,
    mysql_store: TaskStore,
    redis_conn: Redis,
    make_body: Callable[[int], str],
    expected: str,
    field: str | None,
) -> None:
    """Each malformed body (validly signed) gets 400 naming the field and value; the valid ids beside it stay put."""
    ids = pending_tasks(mysql_store, 1)
    before = snapshot(redis_conn, mysql_store, ids)
    body = make_body(ids[0])
    raw = body.encode("utf-8", "surrogateescape")
    headers = intake.signed("POST", CONFIRM, raw.decode("utf-8", "replace"))
    reply = intake.request("POST", "/orders/confirm", raw, headers)
    assert reply.status == 400, reply.raw
    assert expected.format(ids[0]) in reply.error
    assert reply.json().get("field") == field
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_unsigned_malformed_body_is_401_not_400(intake: Intake) -> None:
    """Authentication comes first: an unsigned caller learns nothing about what a valid body looks like."""
    reply = intake.request("POST", "/orders/confirm", b"[]", {})
    assert reply.status == 401


def test_oversized_body_is_413_and_changes_nothing(intake: Intake, mysql_store: TaskStore, redis_conn: Redis) -> None:
    """A body over 64 KiB is refused before it is read or verified."""
    ids = pending_tasks(mysql_store, 1)
    before = snapshot(redis_conn, mysql_store, ids)
    body = json.dumps({"taskIds": ids, "pad": "x" * MAX_BODY_BYTES})
    reply = intake.request("POST", CONFIRM, body.encode(), intake.signed("POST", CONFIRM, body))
    assert reply.status == 413 and "at most 65536" in reply.error
    assert snapshot(redis_conn, mysql_store, ids) == before


def test_huge_declared_body_is_refused_without_reading_it(intake: Intake) -> None:
    """A Content-Length of 1 GB is answered 413 at once, and the connection is closed."""
    connection = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=10)
    try:
        connection.putrequest("POST", "/orders/confirm")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert response.getheader("Connection") == "close"
    finally:
        connection.close()


def test_post_without_content_length_is_411(intake: Intake) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=10)
    try:
        connection.putrequest("POST", "/orders/confirm")
        connection.endheaders()
        assert connection.getresponse().status == 411
    finally:
        connection.close()


# -- GET /tasks/<id> --------------------------------------------------------------------------------


def test_task_status_signed_is_200_with_its_fields(intake_on: Intake, backend: Backend) -> None:
    """A signed GET /tasks/<id> answers the row's status, progress, attempts, output and times."""
    pending, done = pending_tasks(backend.store, 2)
    assert intake_on.confirm({"taskIds": [done]}).status == 202
    assert backend.store.begin_attempt(done, 3)
    finished = datetime(2026, 1, 2, 3, 4, 5, 600000)
    assert backend.store.mark_completed(done, "/srv/downloads/42", 12345, finished)

    reply = intake_on.task(done)
    assert reply.status == 200, reply.raw
    answer = reply.json()
    assert set(answer) >= {
        "taskId",
        "status",
        "progress",
        "attempts",
        "outputPath",
        "bytes",
        "error",
        "updatedAt",
        "finishedAt",
    }
    assert answer["taskId"] == done
    assert (answer["status"], answer["progress"], answer["attempts"]) == (COMPLETED, 100, 1)
    assert (answer["outputPath"], answer["bytes"], answer["error"]) == ("/srv/downloads/42", 12345, None)
    assert answer["finishedAt"] == "2026-01-02T03:04:05.600000Z"
    assert answer["updatedAt"].endswith("Z")

    waiting = intake_on.task(pending).json()
    assert (waiting["status"], waiting["progress"], waiting["finishedAt"], waiting["outputPath"]) == (
        PENDING,
        0,
        None,
        None,
    )


def test_unknown_task_is_404(intake: Intake) -> None:
    reply = intake.task(424242)
    assert (reply.status, reply.json()) == (404, {"error": "no such task", "taskId": 424242})


def test_task_status_unsigned_or_badly_signed_is_401(intake: Intake, mysql_store: TaskStore) -> None:
    (task_id,) = pending_tasks(mysql_store, 1)
    assert intake.task(task_id, signed=False).status == 401
    headers = signed_request(generate_secret(), "GET", f"/tasks/{task_id}")
    assert intake.request("GET", f"/tasks/{task_id}", headers=headers).status == 401
    old = intake.signed("GET", f"/tasks/{task_id}", at=datetime.now(UTC) - timedelta(minutes=6))
    assert intake.request("GET", f"/tasks/{task_id}", headers=old).status == 401


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "0",
        "-1",
        "1.5",
        "%20",
        "99999999999999999999",
        "%D9%A3",  # U+0663 ARABIC-INDIC DIGIT THREE
        "%C2%B2",  # ², isdigit() but not int()
        *NOT_PLAIN_DIGITS,
        "%",
        "%ff",
        "1%00",
    ],
    ids=repr,
)
def test_task_id_that_is_not_a_positive_integer_is_400(intake: Intake, raw: str) -> None:
    reply = intake.task(raw)
    assert reply.status == 400, reply.raw
    assert "task id must be a positive integer" in reply.error


# -- bad input is a 4xx, never a 500 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["²", "¹²", "\u0661\u0662", "-1", "+5", "1_0", "0x10", "1e3", "5 5", "5,5", "1" * 4301, "", "\u0661"],
    ids=repr,
)
def test_content_length_that_is_not_ascii_digits_is_400_without_a_traceback(
    intake: Intake, intake_log: LogRecords, value: str
) -> None:
    """`²` is str.isdigit() but not int(): it used to be a 500 with a traceback in the log."""
    body = json.dumps({"taskIds": [1]})
    headers = [("Content-Length", value), *intake.signed("POST", CONFIRM, body).items()]
    reply = raw_exchange(intake.port, request_bytes("POST", CONFIRM, headers, body.encode()))
    assert reply is not None and reply.status == 400, reply
    assert "Content-Length" in reply.error
    assert reply.headers.get("connection") == "close"
    assert intake_log.tracebacks() == []


def test_two_content_lengths_are_400(intake: Intake, intake_log: LogRecords) -> None:
    """Two Content-Length headers (even equal ones) could frame the body two ways: refused."""
    body = json.dumps({"taskIds": [1]})
    length = str(len(body))
    headers = [("Content-Length", length), ("Content-Length", length), *intake.signed("POST", CONFIRM, body).items()]
    reply = raw_exchange(intake.port, request_bytes("POST", CONFIRM, headers, body.encode()))
    assert reply is not None and reply.status == 400, reply
    assert "Content-Length" in reply.error
    assert intake_log.tracebacks() == []


HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("4301-digit-id", b'{"taskIds": [' + b"7" * 4301 + b"]}", "4301 digits"),
    ("4301-digit-negative", b'{"taskIds": [-' + b"7" * 4301 + b"]}", "4301 digits"),
    ("nan", b'{"taskIds": [NaN]}', "NaN is not JSON"),
    ("infinity", b'{"taskIds": [1, -Infinity]}', "-Infinity is not JSON"),
    ("duplicate-key", b'{"taskIds": [1], "taskIds": [2]}', 'duplicate key "taskIds"'),
    ("nested-duplicate-key", b'{"taskIds": [{"a": 1, "a": 2}]}', 'duplicate key "a"'),
    ("deep", b'{"taskIds": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ("lone-surrogate", b'{"taskIds": [1], "priority": "\\ud800"}', "priority must be one of"),
]


@pytest.mark.parametrize(("body", "expected"), [b[1:] for b in HOSTILE_BODIES], ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_json_is_400_naming_the_problem_without_a_traceback(
    intake: Intake, intake_log: LogRecords, mysql_store: TaskStore, redis_conn: Redis, body: bytes, expected: str
) -> None:
    """A number too long for int() used to escape as a 500; NaN/Infinity (not JSON) and duplicate keys (two
    readings of one body) were accepted."""
    ids = pending_tasks(mysql_store, 1)
    before = snapshot(redis_conn, mysql_store, ids)
    reply = intake.request("POST", CONFIRM, body, intake.signed("POST", CONFIRM, body.decode()))
    assert reply.status == 400, reply.raw
    assert expected in reply.error
    assert len(reply.raw) < 2000, "the answer quotes the input at length"
    assert snapshot(redis_conn, mysql_store, ids) == before
    assert intake_log.tracebacks() == []


def test_a_value_nested_just_short_of_the_parser_limit_is_400(intake: Intake, intake_log: LogRecords) -> None:
    """Every depth up to and past the JSON parser's own limit: 400 each time (quoting such a value in the error
    message must not fail where parsing it did not)."""
    statuses = set()
    for depth in range(900, 1001, 4):
        body = '{"taskIds": [' + "[" * depth + "]" * depth + "]}"
        statuses.add(intake.request("POST", CONFIRM, body.encode(), intake.signed("POST", CONFIRM, body)).status)
    assert statuses == {400}
    assert intake_log.tracebacks() == []


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://[/tasks/1", "origin-form"),
        ("http://intake/tasks/1", "origin-form"),
        ("*", "origin-form"),
        ("tasks/1", "origin-form"),
    ],
)
def test_a_request_target_that_is_not_a_path_is_400(
    intake: Intake, intake_log: LogRecords, target: str, expected: str
) -> None:
    """`http://[/…` made urlsplit raise: a 500. Only a path (origin-form) is a request-target the intake serves."""
    reply = raw_exchange(intake.port, request_bytes("GET", target, list(intake.signed("GET", target).items())))
    assert reply is not None and reply.status == 400, reply
    assert expected in reply.error
    assert intake_log.tracebacks() == []


@pytest.mark.parametrize(
    ("method", "path", "status"), [("FROB", "/tasks/1", 405), ("get", "/healthz", 405), ("BREW", "/x", 404)]
)
def test_an_unknown_method_is_a_4xx_not_501(
    intake: Intake, intake_log: LogRecords, method: str, path: str, status: int
) -> None:
    reply = raw_exchange(intake.port, request_bytes(method, path, []))
    assert reply is not None and reply.status == status, reply
    assert intake_log.tracebacks() == []


@pytest.mark.parametrize(
    "value",
    [
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",
        "1_700_000_000",
        "1e9",
        "nan",
        "inf",
        "-1",
        "9" * 40,
        "²",
        "1700000000.5",
    ],
    ids=repr,
)
def test_a_malformed_timestamp_is_401(intake: Intake, intake_log: LogRecords, value: str) -> None:
    """webhook-timestamp is Unix seconds in ASCII digits; float() would read `1_700_000_000` or `1e9` too."""
    target = "/tasks/1"
    headers = {**intake.signed("GET", target), "webhook-timestamp": value}
    reply = raw_exchange(intake.port, request_bytes("GET", target, list(headers.items())))
    assert reply is not None and reply.status == 401, reply
    assert "malformed" in reply.error
    assert intake_log.tracebacks() == []


@pytest.mark.parametrize(
    "value", ["msg\x1bforged", "x" * 257, "msg id", "msg_é"], ids=["escape", "long", "space", "non-ascii"]
)
def test_a_webhook_id_that_is_not_short_printable_ascii_is_401(
    intake: Intake, intake_log: LogRecords, value: str
) -> None:
    """The webhook-id is logged and becomes a Redis key: 1 to 256 printable ASCII characters, no spaces."""
    body = json.dumps({"taskIds": [1]})
    headers = [("Content-Length", str(len(body))), *intake.signed("POST", CONFIRM, body, msg_id=value).items()]
    reply = raw_exchange(intake.port, request_bytes("POST", CONFIRM, headers, body.encode()))
    assert reply is not None and reply.status == 401, reply
    assert "webhook-id" in reply.error
    assert intake_log.tracebacks() == []


# -- /healthz and /metrics --------------------------------------------------------------------------


def assert_healthz_names(settings: Settings, secret: str, up: str, down: str) -> None:
    """/healthz is 503, says *up* is ok and *down* is down, and names *down* in its error."""
    for intake in start_intake(settings, secret):
        reply = intake.request("GET", "/healthz")
        assert reply.status == 503, reply.raw
        answer = reply.json()
        assert answer[up] == "ok" and answer[down].startswith("down")
        assert answer["error"] == f"not answering: {down}"


def test_healthz_is_200_when_redis_and_the_database_answer(intake: Intake) -> None:
    reply = intake.request("GET", "/healthz")
    assert (reply.status, reply.json()) == (200, {"redis": "ok", "database": "ok"})


def test_healthz_is_503_naming_redis_when_redis_does_not_answer(
    configure: Callable[..., Settings], mysql_store: TaskStore, secret: str
) -> None:
    settings = configure(DATABASE_URL=TEST_URL, API_SECRET_KEY=secret, REDIS_URL=CLOSED_REDIS)
    assert_healthz_names(settings, secret, up="database", down="redis")


def test_healthz_is_503_naming_the_database_when_it_does_not_answer(
    configure: Callable[..., Settings], redis_conn: Redis, secret: str
) -> None:
    settings = configure(DATABASE_URL="mysql://root@127.0.0.1:1/udemy_dl_test", API_SECRET_KEY=secret)
    assert_healthz_names(settings, secret, up="redis", down="database")


def test_confirm_with_redis_down_is_503_and_retryable(
    configure: Callable[..., Settings], mysql_store: TaskStore, secret: str
) -> None:
    """No Redis: 503 with Retry-After (the caller retries; confirm is idempotent), not a 4xx or a hang."""
    settings = configure(DATABASE_URL=TEST_URL, API_SECRET_KEY=secret, REDIS_URL=CLOSED_REDIS)
    (task_id,) = pending_tasks(mysql_store, 1)
    for intake in start_intake(settings, secret):
        reply = intake.confirm({"taskIds": [task_id]})
        assert reply.status == 503 and "redis" in reply.error and reply.headers["retry-after"]
    row = mysql_store.get(task_id)
    assert row is not None and row.status == PENDING


def test_metrics_parse_as_prometheus_text(intake: Intake, mysql_store: TaskStore) -> None:
    """/metrics needs no signature and parses with prometheus_client's parser; udemy_dl_queue_jobs is there."""
    if importlib.util.find_spec("udemy_dl.metrics") is None:
        message = "udemy_dl.metrics is not written yet"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    from prometheus_client.parser import text_string_to_metric_families

    ids = pending_tasks(mysql_store, 2)
    assert intake.confirm({"taskIds": ids}).status == 202
    reply = intake.request("GET", "/metrics")
    assert reply.status == 200, reply.raw
    assert reply.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(reply.raw.decode())}
    assert "udemy_dl_queue_jobs" in families


# -- routes and methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/orders", "/orders/confirm/", "/tasks", "/tasks/1/files", "/admin"])
def test_unknown_route_is_404(intake: Intake, path: str) -> None:
    reply = intake.request("GET", path)
    assert reply.status == 404 and "no such route" in reply.error


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/orders/confirm", "POST"),
        ("PUT", "/orders/confirm", "POST"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/tasks/1", "GET"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(intake: Intake, method: str, path: str, allowed: str) -> None:
    reply = intake.request(method, path, b"{}" if method in ("POST", "PUT") else b"")
    assert (reply.status, reply.headers.get("allow")) == (405, allowed)


def test_keep_alive_connection_serves_several_requests(intake: Intake, mysql_store: TaskStore) -> None:
    """One HTTP/1.1 connection carries several requests (as Node's fetch sends them)."""
    (task_id,) = pending_tasks(mysql_store, 1)
    connection = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=10)
    try:
        statuses = []
        for _ in range(3):
            connection.request("GET", f"/tasks/{task_id}", headers=intake.signed("GET", f"/tasks/{task_id}"))
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.request("GET", "/healthz")
        statuses.append(connection.getresponse().status)
        assert statuses == [200, 200, 200, 200]
    finally:
        connection.close()


def test_the_python_example_in_the_docs_works(
    intake: Intake, mysql_store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/INTAKE.md's Python client, run as written: it confirms, reads a status and gets a 404."""
    monkeypatch.setenv("INTAKE_URL", f"http://127.0.0.1:{intake.port}")
    namespace: dict[str, Any] = {"__name__": "intake_docs_example"}
    exec(compile(doc_block("python", "def intake_request"), str(DOCS), "exec"), namespace)
    ids = pending_tasks(mysql_store, 2)
    assert namespace["confirm_payment"](ids) == (202, {"enqueued": ids, "alreadyQueued": [], "refused": []})
    status, answer = namespace["task_status"](ids[0])
    assert (status, answer["status"]) == (200, PROCESSING)
    assert namespace["task_status"](987654) == (404, {"error": "no such task", "taskId": 987654})


# -- start-up and shutdown --------------------------------------------------------------------------


def test_without_api_secret_key_the_server_refuses_to_start(configure: Callable[..., Settings]) -> None:
    settings = configure(DATABASE_URL=TEST_URL)
    with pytest.raises(ConfigError) as caught:
        make_server(settings, "127.0.0.1", 0)
    assert caught.value.variable == "API_SECRET_KEY"


def test_without_a_database_the_server_refuses_to_start(configure: Callable[..., Settings], secret: str) -> None:
    settings = configure(API_SECRET_KEY=secret)
    with pytest.raises(ConfigError) as caught:
        make_server(settings, "127.0.0.1", 0)
    assert caught.value.variable == "DATABASE_URL"


SERVE_SCRIPT = """
from udemy_dl.web import serve
from udemy_dl.logs import setup_logging
from udemy_dl.settings import load_settings
setup_logging("INFO")
serve(load_settings(), "127.0.0.1", 0)
"""


def test_serve_answers_then_stops_cleanly_on_sigterm(
    configure: Callable[..., Settings], mysql_store: TaskStore, redis_conn: Redis, secret: str
) -> None:
    """`serve` in its own process: it answers, and on SIGTERM it stops, exits 0 and logs no secret."""
    configure(DATABASE_URL=TEST_URL, API_SECRET_KEY=secret)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT],
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline()]
        while "listening on" not in lines[-1]:
            assert lines[-1], f"serve exited before listening:\n{''.join(lines)}"
            lines.append(process.stderr.readline())
        port = int(lines[-1].rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        (task_id,) = pending_tasks(mysql_store, 1)
        body = json.dumps({"taskIds": [task_id]})
        headers = signed_request(secret, "POST", CONFIRM, body)
        connection.request("POST", "/orders/confirm", body=body.encode(), headers=headers)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())["enqueued"]) == (202, [task_id])
        connection.close()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        log = "".join(lines) + process.stderr.read()
        assert "intake stopped" in log
        assert secret not in log and headers["webhook-signature"].split(",", 1)[1] not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_a_client_that_never_finishes_its_request_head_is_cut_off(
    intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's keep-alive timer, armed from the first byte (HEAD_TIMEOUT, 15 s in service; 0.5 s here)."""
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT", 0.5)
    with socket.create_connection(("127.0.0.1", intake.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: intake\r\n")  # no blank line: the head never ends
        started = time.monotonic()
        assert sock.recv(1024) == b"", "the server closes the connection without an answer"
        assert time.monotonic() - started < 8
    # A client dripping its head a byte at a time is timed from its first byte, not from its last.
    head = b"GET /healthz HTTP/1.1\r\nHost: intake\r\nX-Slow: " + b"x" * 100
    with socket.create_connection(("127.0.0.1", intake.port), timeout=10) as sock:
        started = time.monotonic()
        sent = 0
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)  # the client's pace, not a wait for the server
        except OSError:  # reset or broken pipe: the server hung up
            pass
        assert sent < len(head) and time.monotonic() - started < 8, (sent, time.monotonic() - started)
