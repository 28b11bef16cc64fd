"""The live status stream (`GET /tasks/<id>/events`, docs/STATUS.md) over real HTTP from uvicorn, against real
Redis and MariaDB, with a real (forking) worker downloading from the test origin. Tokens are minted with plain
hmac from the documented format (tests/support/sse.py), not with our tokens module."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from redis import Redis

from tests.support.intake import Intake, LogRecords, start_intake
from tests.support.processes import start_logged
from tests.support.redis_servers import RedisServer
from tests.support.scripts import cli_command
from tests.support.service import Service, run_burst_worker
from tests.support.sse import STATUS_SECRET, EventStream, open_stream, plain_status_token
from tests.support.waiting import wait_for
from udemy_dl import defaults, status_stream, stream_hub
from udemy_dl.http_server import logged_target
from udemy_dl.outcome import record_failed
from udemy_dl.payload import TaskPayload
from udemy_dl.producer import Producer
from udemy_dl.store import PENDING, PROCESSING, utcnow
from udemy_dl.stream_hub import READ_CONNECTIONS

EMAIL = "watcher@shop.example"
SHOP = "https://shop.example"
KEEPALIVE = 0.3
"""Seconds between keep-alive comments in these tests (15 in service)."""


@pytest.fixture
def web(svc: Service) -> Iterator[Intake]:
    """The web front (`udemy-dl serve`) on the test's service, with status tokens and a short keep-alive."""
    svc.reconfigure(STATUS_TOKEN_SECRET=STATUS_SECRET, CORS_ORIGINS=SHOP)
    assert svc.settings.api_secret_key is not None
    yield from start_intake(svc.settings, svc.settings.api_secret_key, keepalive=KEEPALIVE)


def events_target(task_id: int, token: str | None = None, **query: str) -> str:
    params = {"token": plain_status_token(task_id) if token is None else token, **query}
    return f"/tasks/{task_id}/events?" + "&".join(f"{name}={value}" for name, value in params.items())


def watch(web: Intake, task_id: int, headers: dict[str, str] | None = None, **query: str) -> EventStream:
    return open_stream(web.port, events_target(task_id, **query), headers)


def until_closed(stream: EventStream, timeout: float = 30) -> EventStream:
    wait_for(lambda: stream.closed, timeout, what=lambda: f"the stream to close; got {stream.statuses()}")
    return stream


def ids(stream: EventStream) -> list[tuple[int, int]]:
    return [tuple(int(part) for part in str(event.id).split("-")) for event in stream.events]  # type: ignore[misc]


def test_a_stream_opened_before_payment_follows_the_order_to_completed_then_closes(
    svc: Service, web: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL", 0.2)
    svc.origin.throttle = 2_000_000  # about 2 s for the course: several progress events
    course = svc.origin.add_course("live", {"a.bin": 2_000_000, "b.bin": 2_000_000})
    task_id = svc.store.insert_task(EMAIL, course, PENDING)
    stream = watch(web, task_id)
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache" and stream.headers["x-accel-buffering"] == "no"
    wait_for(lambda: stream.events, what="the snapshot")
    snapshot = stream.events[0]
    assert (snapshot.id, snapshot.event) == ("0-0", "status")
    assert snapshot.data == {
        "taskId": task_id, "status": "pending", "progress": 0, "bytes": 0, "total": None, "files": 0, "filesTotal": 0
    }  # fmt: skip

    assert Producer(svc.settings, connection=svc.redis, store=svc.store).confirm_payment([task_id]).enqueued
    wait_for(lambda: len(stream.events) >= 2, what="the processing event")
    run_burst_worker(svc.redis, svc.settings)
    until_closed(stream)

    statuses = stream.statuses()
    assert statuses[0] == "pending" and statuses[-1] == "completed", statuses
    assert set(statuses[1:-1]) == {PROCESSING}, statuses
    progress = [event.data["progress"] for event in stream.events if event.data["status"] == PROCESSING]
    assert progress == sorted(progress) and len({p for p in progress if 0 < p < 100}) >= 2, progress
    assert ids(stream) == sorted(set(ids(stream))), "ids rise, none repeated"
    final = stream.events[-1].data
    assert final == {
        "taskId": task_id, "status": "completed", "progress": 100, "bytes": 4_000_000, "total": 4_000_000,
        "files": 2, "filesTotal": 2,
    }  # fmt: skip
    for event in stream.events:
        assert set(event.data) <= {"taskId", "status", "progress", "bytes", "total", "files", "filesTotal", "reason"}

    # A reconnect from any event on gets exactly the events after it, then the close.
    for middle in (1, len(stream.events) // 2, len(stream.events) - 2):
        seen = stream.events[middle].id
        assert seen is not None
        resumed = until_closed(watch(web, task_id, {"Last-Event-ID": seen}))
        assert [(e.id, e.data) for e in resumed.events] == [(e.id, e.data) for e in stream.events[middle + 1 :]]
    by_query = until_closed(watch(web, task_id, lastEventId=str(stream.events[1].id)))
    assert [e.id for e in by_query.events] == [e.id for e in stream.events[2:]]

    # After the final event there is nothing more: 204, which tells an EventSource to stop reconnecting.
    after_final = watch(web, task_id, {"Last-Event-ID": str(stream.events[-1].id)})
    assert after_final.status == 204
    # An id the stream no longer holds (trimmed) gets a fresh snapshot: the task as it is now.
    trimmed = until_closed(watch(web, task_id, {"Last-Event-ID": "1-0"}))
    assert [e.data for e in trimmed.events] == [final] and trimmed.events[0].id == stream.events[-1].id


def test_a_settled_task_gets_its_snapshot_and_the_close(svc: Service, web: Intake) -> None:
    task_id = svc.paid_task("https://cdn.example/gone")
    task = TaskPayload(task_id, EMAIL, "https://cdn.example/gone")
    reason = f"ConnectionError: {svc.settings.download_dir}/x: HTTPSConnectionPool(host='10.0.0.5') refused"
    assert record_failed(svc.settings, svc.store, svc.redis, task, reason, keep_files=False)
    stream = until_closed(watch(web, task_id))
    assert stream.statuses() == ["failed"]
    assert stream.events[0].data["reason"] == "download failed"
    text = json.dumps([e.data for e in stream.events])
    assert str(svc.settings.download_dir) not in text and "10.0.0.5" not in text and EMAIL not in text


def test_the_failed_path_reaches_an_open_stream_and_closes_it(svc: Service, web: Intake) -> None:
    task_id = svc.paid_task("https://cdn.example/bad")
    stream = watch(web, task_id)
    wait_for(lambda: stream.events, what="the snapshot")
    assert stream.statuses() == [PROCESSING]
    task = TaskPayload(task_id, EMAIL, "https://cdn.example/bad")
    assert record_failed(svc.settings, svc.store, svc.redis, task, "no attempts left: 3 attempts", keep_files=False)
    until_closed(stream)
    assert stream.statuses() == [PROCESSING, "failed"]
    assert stream.events[-1].data["reason"] == "the download kept failing"


def test_bad_tokens_get_401_another_tasks_403_an_unknown_task_404_and_nothing_opens(
    svc: Service, web: Intake, redis_conn: Redis, intake_log: LogRecords
) -> None:
    task_id = svc.paid_task("https://cdn.example/a")
    other = svc.paid_task("https://cdn.example/b")
    now = int(time.time())
    cases = {
        "absent": ("", 401),
        "malformed": ("v1.x.y.z", 401),
        "expired": (plain_status_token(task_id, now - 5), 401),
        "wrongly signed": (plain_status_token(task_id, secret="another-secret-0123456789abcdefghij"), 401),
        "another task's": (plain_status_token(other), 403),
    }
    keys_before = sorted(cast(list[bytes], redis_conn.keys("udemy_dl:status:*")))
    for name, (token, status) in cases.items():
        reply = web.request("GET", events_target(task_id, token=token))
        assert reply.status == status, (name, reply.raw)
        assert "token" in reply.error, name
    unknown = 987_654_321
    assert web.request("GET", events_target(unknown)).status == 404
    assert web.server.front.feed is not None and web.server.front.feed.hub.watched == 0
    assert sorted(cast(list[bytes], redis_conn.keys("udemy_dl:status:*"))) == keys_before

    # Good tokens were sent too: none reaches the log, where the query shows token=***.
    good = plain_status_token(task_id)
    opened = open_stream(web.port, events_target(task_id, token=good))
    wait_for(lambda: opened.events, what="the snapshot")
    opened.close()
    assert web.request("GET", f"/status/{task_id}?token={good}").status == 200
    for line in ("/events?token=*** -> 200", f"/status/{task_id}?token=*** -> 200"):
        wait_for(lambda line=line: any(line in r.getMessage() for r in intake_log.records), what=line)  # type: ignore[misc]
    logged = "\n".join(record.getMessage() for record in intake_log.records)
    for token, _ in cases.values():
        if token:
            assert token.rsplit(".", 1)[-1] not in logged
    assert good not in logged and good.rsplit(".", 1)[-1] not in logged


def test_keep_alive_comments_arrive_while_nothing_happens(svc: Service, web: Intake) -> None:
    task_id = svc.paid_task("https://cdn.example/slow")
    stream = watch(web, task_id)
    wait_for(lambda: len(stream.comments) >= 2, timeout=10, what="two keep-alive comments")
    assert set(stream.comments) == {"keep-alive"} and stream.statuses() == [PROCESSING] and not stream.closed
    stream.close()


def test_cors_origins_may_open_the_stream_and_others_get_no_allowance(svc: Service, web: Intake) -> None:
    task_id = svc.paid_task("https://cdn.example/c")
    allowed = watch(web, task_id, {"Origin": SHOP})
    assert allowed.headers.get("access-control-allow-origin") == SHOP
    allowed.close()
    other = watch(web, task_id, {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    other.close()


def test_many_open_streams_share_a_few_redis_connections(svc: Service, web: Intake) -> None:
    """One reader for every watched stream: 40 browsers, at most 1 + READ_CONNECTIONS connections, and an entry
    published to each task reaches its stream."""
    tasks = [svc.paid_task(f"https://cdn.example/m{n}") for n in range(40)]
    streams = [watch(web, task_id) for task_id in tasks]
    wait_for(lambda: all(stream.events for stream in streams), what="every snapshot")
    for task_id in tasks:
        status_stream.publish_progress(svc.redis, task_id, 42, 420, 1000, 0, 1)
    wait_for(lambda: all(len(stream.events) == 2 for stream in streams), what="the progress entry on every stream")
    assert {stream.events[1].data["progress"] for stream in streams} == {42}
    front = web.server.front
    assert front.feed is not None and front.feed.hub.watched == len(tasks)
    pools = [front.feed.hub._reader.connection_pool, front.feed.reads._client.connection_pool]
    opened = sum(len(pool._available_connections) + len(pool._in_use_connections) for pool in pools)
    assert 1 <= opened <= 1 + READ_CONNECTIONS, opened
    for stream in streams:
        stream.close()
    wait_for(lambda: front.feed is not None and front.feed.hub.watched == 0, what="the streams to be let go")


def test_the_status_page_and_its_script_need_the_token_for_their_task(svc: Service, web: Intake) -> None:
    task_id = svc.paid_task("https://cdn.example/p")
    page = web.request("GET", f"/status/{task_id}?token={plain_status_token(task_id)}")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"data-task-status" in page.raw and b"<progress" in page.raw
    assert web.request("GET", f"/status/{task_id}").status == 401
    assert web.request("GET", f"/status/{task_id}?token={plain_status_token(task_id + 1)}").status == 403
    script = web.request("GET", "/static/status.js")
    assert script.status == 200 and "javascript" in script.headers["content-type"]


def test_a_stream_entry_is_bounded_expiring_and_customer_facing(redis_conn: Redis) -> None:
    entry_id = status_stream.publish_failed(redis_conn, 424242, "OSError: /srv/downloads/.staging/424242 is full")
    assert entry_id is not None
    key = status_stream.stream_key(424242)
    try:
        assert 3600 < cast(int, redis_conn.ttl(key)) <= status_stream.STREAM_TTL
        ((_, fields),) = cast(list[tuple[bytes, dict[bytes, bytes]]], redis_conn.xrange(key))
        assert fields == {b"status": b"failed", b"progress": b"0", b"bytes": b"0", b"files": b"0",
                          b"filesTotal": b"0", b"reason": b"download failed"}  # fmt: skip
        for n in range(status_stream.MAXLEN * 2):
            status_stream.publish_progress(redis_conn, 424242, n % 100, n, None, 0, 1)
        assert cast(int, redis_conn.xlen(key)) < status_stream.MAXLEN * 1.5
    finally:
        redis_conn.delete(key)


def test_a_task_settled_while_redis_refused_its_final_entry_still_ends_the_stream(svc: Service, web: Intake) -> None:
    """The row is the record: a stream left quiet reads it, and ends with the row's final status."""
    task_id = svc.paid_task("https://cdn.example/lost")
    stream = watch(web, task_id)
    wait_for(lambda: stream.events, what="the snapshot")
    finished = utcnow() - timedelta(minutes=1)
    assert svc.store.mark_failed(task_id, "no attempts left: Redis went away", None, finished)  # no stream entry
    until_closed(stream)
    assert stream.statuses() == [PROCESSING, "failed"] and len(stream.comments) >= 4
    assert stream.events[-1].data["reason"] == "the download kept failing"


def test_serve_with_two_workers_answers_from_both_processes_and_stops_cleanly(
    svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`udemy-dl serve --workers 2`: two processes share the port; SIGTERM stops all of them, exit 0."""
    svc.reconfigure(STATUS_TOKEN_SECRET=STATUS_SECRET)
    serve = start_logged(
        [*cli_command(), "serve", "--port", "0", "--workers", "2"], dict(os.environ), tmp_path, tmp_path / "serve.log"
    )
    try:
        line = wait_for(lambda: re.search(r"listening on http://127\.0\.0\.1:(\d+)", serve.log()), 30, what=serve.log)
        assert line is not None
        port = int(line.group(1))
        wait_for(lambda: len(serve.children()) >= 2, 30, what="two server processes")
        task_id = svc.paid_task("https://cdn.example/w")
        stream = open_stream(port, events_target(task_id))
        wait_for(lambda: stream.events, what="the snapshot")
        assert stream.statuses() == [PROCESSING]
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(30) == 0, serve.log()
        until_closed(stream, 10)
        assert "intake stopped" in serve.log() and STATUS_SECRET not in serve.log()
    finally:
        if serve.process.poll() is None:
            serve.kill()


def test_the_access_log_hides_every_spelling_of_the_token_parameter() -> None:
    target = logged_target("/tasks/1/events", "tok%65n=a1&lastEventId=1-0&TOKEN=b2&token=c3&tokens=d4")
    assert target == "/tasks/1/events?tok%65n=***&lastEventId=1-0&TOKEN=***&token=***&tokens=d4"


def test_open_streams_ride_out_a_redis_restart(
    svc: Service, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader retries while Redis is away and carries on from its cursors: an entry written after Redis
    came back reaches the stream that was open all along."""
    monkeypatch.setattr(stream_hub, "RETRY_SECONDS", 0.2)
    svc.reconfigure(STATUS_TOKEN_SECRET=STATUS_SECRET, REDIS_URL=private_redis.url)
    assert svc.settings.api_secret_key is not None
    task_id = svc.paid_task("https://cdn.example/restart")
    for web in start_intake(svc.settings, svc.settings.api_secret_key, keepalive=KEEPALIVE):
        stream = watch(web, task_id)
        wait_for(lambda: stream.events, what="the snapshot")
        private_redis.restart()  # no persistence: the stream's key is gone too
        client = private_redis.client()
        wait_for(lambda: web.server.front.feed is not None and web.server.front.feed.hub.reads > 0, what="a read")
        status_stream.publish_progress(client, task_id, 64, 640, 1000, 0, 1)
        wait_for(lambda: len(stream.events) >= 2, timeout=15, what="the entry written after the restart")
        assert stream.statuses() == [PROCESSING, PROCESSING] and stream.events[1].data["progress"] == 64
        stream.close()
