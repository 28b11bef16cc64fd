"""Webhooks: Standard Webhooks signing, stable event ids, delivery to a real receiver, retries by a real worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from standardwebhooks import Webhook, WebhookVerificationError

from dev.devservers import WebhookReceiver
from tests.support.processes import LoggedProcess
from tests.support.service import run_burst_worker
from tests.support.waiting import wait_for
from udemy_dl import defaults
from udemy_dl.errors import ConfigError, TransientError, WebhookDeliveryError
from udemy_dl.settings import Settings
from udemy_dl.store import utcnow
from udemy_dl.webhooks import (
    COMPLETED,
    FAILED,
    build_event,
    enqueue_webhook,
    event_id,
    generate_secret,
    sign_headers,
)
from udemy_dl.worker_rq import deliver_webhook

FINISHED_AT = datetime(2026, 3, 4, 5, 6, 7, 890123)
DATA: dict[str, Any] = {
    "taskId": 42,
    "email": "buyer@shop.example",
    "courseUrl": "https://cdn.example/c",
    "status": "completed",
}


def body_of(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), sort_keys=True)


def webhook_jobs(connection: Redis, settings: Settings) -> list[str]:
    return list(Queue(settings.webhook_queue_name, connection=connection).job_ids)


@pytest.fixture
def hook_settings(
    configure: Callable[..., Settings], receiver: WebhookReceiver, webhook_secret: str, tmp_path: Path
) -> Settings:
    """Settings of a worker that delivers to the test receiver (and could run downloads)."""
    return configure(
        WEBHOOK_URL=receiver.url,
        API_SECRET_KEY=webhook_secret,
        DATABASE_URL=f"sqlite:///{tmp_path}/tasks.db",
        ALLOWED_HOSTS="cdn.example",
    )


@pytest.fixture
def non_utc_timezone() -> Iterator[None]:
    """Run the test with the process's local time zone five hours behind UTC."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST+05"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


# -- signing ----------------------------------------------------------------------------------------


def test_signed_headers_verify_with_standardwebhooks(webhook_secret: str) -> None:
    """Webhook(secret).verify accepts the body with the headers sign_headers made, and returns the event."""
    event = build_event(COMPLETED, DATA, FINISHED_AT)
    body = body_of(event)
    headers = sign_headers(webhook_secret, "msg_1", body)
    assert Webhook(webhook_secret).verify(body, headers) == event


def test_signature_is_hmac_sha256_of_id_timestamp_body(webhook_secret: str) -> None:
    """webhook-signature is `v1,` + base64 HMAC-SHA256(key, `id.timestamp.body`), key = base64-decoded secret."""
    body = body_of(build_event(COMPLETED, DATA, FINISHED_AT))
    now = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    headers = sign_headers(webhook_secret, "msg_2", body, now=now)
    key = base64.b64decode(webhook_secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"msg_2.{int(now.timestamp())}.{body}".encode(), hashlib.sha256).digest()
    ).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == ("msg_2", str(int(now.timestamp())))


def test_signature_does_not_verify_with_another_secret(webhook_secret: str) -> None:
    """A receiver holding a different secret rejects the delivery."""
    body = body_of(build_event(COMPLETED, DATA, FINISHED_AT))
    headers = sign_headers(webhook_secret, "msg_3", body)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)


def test_tampered_body_does_not_verify(webhook_secret: str) -> None:
    """Changing one byte of the body after signing breaks the signature."""
    body = body_of(build_event(COMPLETED, DATA, FINISHED_AT))
    headers = sign_headers(webhook_secret, "msg_4", body)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_secret).verify(body.replace("42", "43"), headers)


@pytest.mark.usefixtures("non_utc_timezone")
def test_naive_utc_time_signs_verifiable_headers(webhook_secret: str) -> None:
    """A naive UTC `now` (as store.utcnow returns) gives headers that verify, whatever the host's time zone."""
    body = body_of(build_event(COMPLETED, DATA, FINISHED_AT))
    headers = sign_headers(webhook_secret, "msg_5", body, now=utcnow())
    assert Webhook(webhook_secret).verify(body, headers) is not None


def test_generated_secret_is_whsec_and_32_bytes() -> None:
    """gen-secret makes `whsec_` + base64 of 32 random bytes, different each time."""
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert generate_secret() != secret


# -- events -----------------------------------------------------------------------------------------


def test_event_id_is_stable_for_the_same_event() -> None:
    """Every delivery attempt of one event carries the same webhook-id."""
    assert event_id(42, COMPLETED, FINISHED_AT) == event_id(42, COMPLETED, FINISHED_AT)


@pytest.mark.parametrize(
    "other",
    [(43, COMPLETED, FINISHED_AT), (42, FAILED, FINISHED_AT), (42, COMPLETED, FINISHED_AT + timedelta(microseconds=1))],
    ids=["other-task", "other-type", "other-time"],
)
def test_event_id_differs_between_events(other: tuple[int, str, datetime]) -> None:
    """Another task, another event type, or another finish time is another event with its own id."""
    assert event_id(*other) != event_id(42, COMPLETED, FINISHED_AT)


def test_event_body_has_type_utc_timestamp_and_data() -> None:
    """The body is {type, timestamp (ISO-8601 UTC, Z), data}."""
    event = build_event(FAILED, DATA, FINISHED_AT)
    assert event == {"type": "download.failed", "timestamp": "2026-03-04T05:06:07.890123Z", "data": DATA}


def test_webhook_retry_intervals_setting_is_parsed(configure: Callable[..., Settings]) -> None:
    """WEBHOOK_RETRY_INTERVALS=2,4,8 sets the delivery retry schedule; garbage names the variable."""
    assert configure(WEBHOOK_RETRY_INTERVALS="2,4,8").webhook_retry_intervals == (2, 4, 8)
    with pytest.raises(ConfigError, match="WEBHOOK_RETRY_INTERVALS"):
        configure(WEBHOOK_RETRY_INTERVALS="2,soon")


def test_retry_schedule_lasts_at_least_an_hour() -> None:
    """Webhook delivery is retried with backoff for at least an hour in all."""
    intervals = defaults.WEBHOOK_RETRY_INTERVALS
    assert sum(intervals) >= 3600
    assert list(intervals) == sorted(intervals)


# -- delivery ---------------------------------------------------------------------------------------


def test_deliver_webhook_posts_a_verified_event(hook_settings: Settings, receiver: WebhookReceiver) -> None:
    """deliver_webhook POSTs the body to WEBHOOK_URL, signed so the receiver verifies it."""
    event = build_event(COMPLETED, DATA, FINISHED_AT)
    outcome = deliver_webhook("msg_10", body_of(event))
    assert outcome == {"delivered": True, "webhookId": "msg_10", "status": 204}
    assert [(w.webhook_id, w.event_type, w.body, w.verified) for w in receiver.received] == [
        ("msg_10", COMPLETED, event, True)
    ]


def test_receiver_error_raises_a_transient_delivery_error(hook_settings: Settings, receiver: WebhookReceiver) -> None:
    """A non-2xx answer raises WebhookDeliveryError, a TransientError, so RQ retries it."""
    receiver.status_for = lambda attempt: 500
    with pytest.raises(WebhookDeliveryError, match="500") as caught:
        deliver_webhook("msg_11", body_of(build_event(COMPLETED, DATA, FINISHED_AT)))
    assert isinstance(caught.value, TransientError)
    assert receiver.attempts == 1


def test_unreachable_receiver_raises_a_delivery_error(configure: Callable[..., Settings], webhook_secret: str) -> None:
    """A receiver that refuses connections raises WebhookDeliveryError, not a requests exception."""
    configure(WEBHOOK_URL="http://127.0.0.1:1/hook", API_SECRET_KEY=webhook_secret)
    with pytest.raises(WebhookDeliveryError):
        deliver_webhook("msg_12", "{}")


@pytest.mark.parametrize(("unset", "variable"), [("WEBHOOK_URL", "WEBHOOK_URL"), ("API_SECRET_KEY", "API_SECRET_KEY")])
def test_delivery_without_configuration_names_the_variable(
    configure: Callable[..., Settings], webhook_secret: str, unset: str, variable: str
) -> None:
    """A worker missing WEBHOOK_URL or API_SECRET_KEY fails the delivery with a ConfigError naming it."""
    environ = {"WEBHOOK_URL": "http://127.0.0.1:1/hook", "API_SECRET_KEY": webhook_secret}
    del environ[unset]
    configure(**environ)
    with pytest.raises(ConfigError) as caught:
        deliver_webhook("msg_13", "{}")
    assert caught.value.variable == variable


def test_enqueue_without_webhook_url_queues_nothing(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """With no WEBHOOK_URL there is no webhook: enqueue_webhook returns False and the queue stays empty."""
    settings = configure()
    assert enqueue_webhook(settings, redis_conn, "msg_20", build_event(COMPLETED, DATA, FINISHED_AT)) is False
    assert webhook_jobs(redis_conn, settings) == []


def test_enqueue_twice_for_one_id_queues_once(hook_settings: Settings, redis_conn: Redis) -> None:
    """The delivery job's id derives from the webhook-id: a second enqueue of one event is refused."""
    event = build_event(COMPLETED, DATA, FINISHED_AT)
    assert enqueue_webhook(hook_settings, redis_conn, "msg_21", event) is True
    assert enqueue_webhook(hook_settings, redis_conn, "msg_21", event) is False
    assert webhook_jobs(redis_conn, hook_settings) == ["webhook-msg_21"]


def test_delivery_job_retries_on_the_documented_schedule(hook_settings: Settings, redis_conn: Redis) -> None:
    """The queued delivery carries one retry per WEBHOOK_RETRY_INTERVALS entry, with those intervals."""
    enqueue_webhook(hook_settings, redis_conn, "msg_22", build_event(COMPLETED, DATA, FINISHED_AT))
    job = Job.fetch("webhook-msg_22", connection=redis_conn)
    assert job.retries_left == len(defaults.WEBHOOK_RETRY_INTERVALS)
    assert job.retry_intervals == list(defaults.WEBHOOK_RETRY_INTERVALS)


def test_delivered_event_is_not_sent_again(
    hook_settings: Settings, redis_conn: Redis, receiver: WebhookReceiver
) -> None:
    """Once a worker delivered an event, enqueuing it again is refused and the receiver hears nothing more."""
    event = build_event(COMPLETED, DATA, FINISHED_AT)
    enqueue_webhook(hook_settings, redis_conn, "msg_23", event)
    run_burst_worker(redis_conn, hook_settings)
    assert [w.webhook_id for w in receiver.accepted()] == ["msg_23"]

    assert enqueue_webhook(hook_settings, redis_conn, "msg_23", event) is False
    run_burst_worker(redis_conn, hook_settings)
    assert receiver.attempts == 1


def test_failing_receiver_gets_the_event_later_exactly_once(
    hook_settings: Settings,
    redis_conn: Redis,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """A receiver answering 500 twice: a real worker with its scheduler retries, the third attempt lands,
    and the receiver accepts the event once under one webhook-id."""
    hook_settings = replace(hook_settings, webhook_retry_intervals=(1, 1, 1, 1))
    receiver.status_for = lambda attempt: 500 if attempt <= 2 else 204
    event = build_event(FAILED, DATA, FINISHED_AT)
    msg_id = event_id(42, FAILED, FINISHED_AT)
    assert enqueue_webhook(hook_settings, redis_conn, msg_id, event) is True

    worker = start_worker()
    job = Job.fetch(f"webhook-{msg_id}", connection=redis_conn)
    wait_for(
        lambda: job.get_status(refresh=True) == JobStatus.FINISHED,
        timeout=30,
        what=lambda: f"webhook job to finish; worker log:\n{worker.log()}",
    )
    assert receiver.attempts == 3
    assert [(w.webhook_id, w.event_type, w.verified) for w in receiver.received] == [(msg_id, FAILED, True)]
    assert receiver.unique_ids() == {msg_id}
