"""Live progress for the shop: download.started and download.progress webhooks, signed and deduplicated."""

from __future__ import annotations

import itertools

import pytest
from redis import Redis

from dev.devservers import ReceivedWebhook
from tests.support.service import Service, run_burst_worker
from udemy_dl import defaults
from udemy_dl.producer import Producer
from udemy_dl.store import PENDING
from udemy_dl.webhooks import COMPLETED, PROGRESS, STARTED
from udemy_dl.worker_rq import process_download


def confirm(svc: Service, url: str) -> int:
    task_id = svc.store.insert_task("live@shop.example", url, PENDING)
    assert Producer(svc.settings, connection=svc.redis, store=svc.store).confirm_payment([task_id]).enqueued
    return task_id


def events(svc: Service, event_type: str) -> list[ReceivedWebhook]:
    return svc.receiver.of_type(event_type)


def run_to_the_end(
    svc: Service, monkeypatch: pytest.MonkeyPatch, files: dict[str, int], throttle: int, every: float, poll: float
) -> int:
    """Confirm a course of *files*, sent at *throttle* bytes/s, and run it to the end (the download, then the
    deliveries it queued), progress measured every *poll* s and sent every *every* s at most; its task id."""
    monkeypatch.setattr(defaults, "PROGRESS_EVENT_INTERVAL", every)
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL", poll)
    svc.origin.throttle = throttle
    task_id = confirm(svc, svc.origin.add_course("live", files))
    run_burst_worker(svc.redis, svc.settings)  # the download
    run_burst_worker(svc.redis, svc.settings)  # the deliveries it queued
    return task_id


def test_started_and_progress_events_reach_the_receiver_signed(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download sends download.started, then download.progress as it goes (here every 1 s), then completed."""
    # 2 MB/s: about 3 s for 6 MB
    task_id = run_to_the_end(svc, monkeypatch, {"a.bin": 3_000_000, "b.bin": 3_000_000}, 2_000_000, 1, 0.2)

    started = events(svc, STARTED)
    progress = events(svc, PROGRESS)
    assert [e.body["data"]["taskId"] for e in started] == [task_id]
    assert started[0].body["data"]["status"] == "processing" and started[0].body["data"]["attempt"] == 1
    assert len(progress) >= 2, [e.body["data"] for e in progress]
    percents = [e.body["data"]["progress"] for e in progress]
    assert percents == sorted(percents) and all(0 <= p < 100 for p in percents)
    assert len({e.webhook_id for e in progress}) == len(progress), "each progress event has its own id"
    assert all(e.verified for e in svc.receiver.received)
    assert [e.body["data"]["taskId"] for e in events(svc, COMPLETED)] == [task_id]


def test_progress_events_come_every_ten_percent_at_most(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the time trigger, events are at least PROGRESS_EVENT_STEP (10) percent apart: at most ~10."""
    run_to_the_end(svc, monkeypatch, {f"part{n}.bin": 1_000_000 for n in range(12)}, 8_000_000, 3600, 0.05)
    percents = [e.body["data"]["progress"] for e in events(svc, PROGRESS)]
    assert 1 <= len(percents) <= 10, percents
    assert all(b - a >= 10 for a, b in itertools.pairwise(percents)), percents


def test_a_completed_task_run_again_sends_no_new_started_event(
    svc: Service,
    redis_conn: Redis,
) -> None:
    """A duplicate run of a finished task does no work, so it announces none."""
    task_id = confirm(svc, svc.origin.add_course("once", {"a.bin": 1000}))
    run_burst_worker(redis_conn, svc.settings)
    process_download(svc.payload(task_id))
    run_burst_worker(redis_conn, svc.settings)
    assert len(events(svc, STARTED)) == 1
    assert len({e.webhook_id for e in events(svc, COMPLETED)}) == 1
