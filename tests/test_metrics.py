"""Prometheus metrics: /metrics parses, and its figures match the queue's real state and the work done."""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from dev.devservers import ContentOrigin, WebhookReceiver
from tests.support.disks import report_far_host
from tests.support.processes import LoggedProcess
from tests.support.scripts import REPO_ROOT, clean_environ, run_command, venv_bin
from tests.support.service import Backend, Service, run_burst_worker
from tests.support.waiting import wait_for
from udemy_dl import defaults, disk, metrics
from udemy_dl.producer import Producer
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, PENDING, SQLiteStore

EMAIL = "metrics@shop.example"


def scrape(settings: Settings, connection: Redis) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the page as Prometheus would: (sample name, sorted labels) -> value."""
    body, content_type = metrics.render_latest(settings, connection)
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def wired(
    wire_service: Callable[..., Service], sqlite_backend: Backend, redis_conn: Redis
) -> tuple[Settings, Producer]:
    service = wire_service(sqlite_backend)
    metrics.reset(redis_conn)
    return service.settings, service.producer()


def test_queue_depth_and_oldest_age_match_what_is_queued(
    wired: tuple[Settings, Producer], redis_conn: Redis, sqlite_store: SQLiteStore, origin: ContentOrigin
) -> None:
    """3 normal and 2 VIP tasks waiting, no worker: the page says so, and the oldest job has an age."""
    settings, producer = wired
    url = origin.add_course("m", {"a.bin": 10})
    normal = [sqlite_store.insert_task(EMAIL, url, PENDING) for _ in range(3)]
    vip = [sqlite_store.insert_task(EMAIL, url, PENDING) for _ in range(2)]
    producer.confirm_payment(normal)
    producer.confirm_payment(vip, priority="high")
    samples = scrape(settings, redis_conn)
    assert samples[("udemy_dl_queue_jobs", (("queue", "downloads"), ("state", "waiting")))] == 3
    assert samples[("udemy_dl_queue_jobs", (("queue", "downloads-high"), ("state", "waiting")))] == 2
    assert samples[("udemy_dl_queue_jobs", (("queue", "webhooks"), ("state", "waiting")))] == 0
    assert samples[("udemy_dl_queue_oldest_waiting_seconds", (("queue", "downloads"),))] > 0
    assert samples[("udemy_dl_queue_oldest_waiting_seconds", (("queue", "webhooks"),))] == 0


def test_work_done_shows_in_counters_and_histograms(
    wired: tuple[Settings, Producer],
    redis_conn: Redis,
    sqlite_store: SQLiteStore,
    origin: ContentOrigin,
    receiver: WebhookReceiver,
) -> None:
    """Two tasks completed and one failed (404): attempts, outcomes, failure reasons, bytes, pickup and
    duration counts, and webhook deliveries all agree with what happened."""
    settings, producer = wired
    good = origin.add_course("ok", {"a.bin": 1000, "b.bin": 2000})
    ids = [sqlite_store.insert_task(EMAIL, good, PENDING) for _ in range(2)]
    ids.append(sqlite_store.insert_task(EMAIL, f"{origin.base_url}/files/missing.bin", PENDING))
    producer.confirm_payment(ids)
    run_burst_worker(redis_conn, settings)  # downloads, then the webhooks they queued

    samples = scrape(settings, redis_conn)
    assert samples[("udemy_dl_attempts_total", ())] == 3
    assert samples[("udemy_dl_tasks_total", (("outcome", "completed"),))] == 2
    assert samples[("udemy_dl_tasks_total", (("outcome", "failed"),))] == 1
    assert samples[("udemy_dl_failures_total", (("reason", "OriginRefusedError"),))] == 1
    assert samples[("udemy_dl_bytes_fetched_total", ())] == 2 * 3000
    assert samples[("udemy_dl_pickup_latency_seconds_count", ())] == 3
    assert samples[("udemy_dl_task_duration_seconds_count", ())] == 3
    assert samples[("udemy_dl_pickup_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    delivered = len([hook for hook in receiver.received if hook.verified])
    assert delivered >= 3  # started events and outcomes
    assert samples[("udemy_dl_webhook_deliveries_total", (("result", "delivered"),))] == delivered
    assert samples[("udemy_dl_queue_jobs", (("queue", "downloads"), ("state", "finished")))] == 3


def workers_gauge(settings: Settings, connection: Redis) -> dict[str, float]:
    """The `udemy_dl_workers` samples of one scrape: state -> value (every state the page shows)."""
    return {
        dict(labels)["state"]: value
        for (name, labels), value in scrape(settings, connection).items()
        if name == "udemy_dl_workers"
    }


def test_workers_alive_are_counted(wired: tuple[Settings, Producer], redis_conn: Redis) -> None:
    """No worker registered: the gauge is 0 in every state (an alert on it can fire)."""
    settings, _ = wired
    assert workers_gauge(settings, redis_conn) == {"idle": 0, "busy": 0, "other": 0}


def test_workers_gauge_follows_live_workers(
    wired: tuple[Settings, Producer],
    redis_conn: Redis,
    sqlite_store: SQLiteStore,
    origin: ContentOrigin,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """Two real `udemy-dl worker` processes: the gauge shows them idle, one busy while it downloads,
    both idle again once the task is done, and one fewer once a worker has stopped."""
    settings, producer = wired
    first, second = start_worker(), start_worker()

    def logs() -> str:
        tails = "\n".join("\n".join(worker.log().splitlines()[-30:]) for worker in (first, second))
        return f"the workers' gauge; last scrape {workers_gauge(settings, redis_conn)}; the workers' logs:\n{tails}"

    def gauge_is(expected: dict[str, float]) -> bool:
        return workers_gauge(settings, redis_conn) == expected

    wait_for(lambda: gauge_is({"idle": 2, "busy": 0, "other": 0}), timeout=30, what=logs)

    origin.throttle = 100_000  # bytes/s: the 2 MB file keeps one worker busy until the test lets it go
    url = origin.add_course("busy", {"a.bin": 2_000_000})
    task_id = sqlite_store.insert_task(EMAIL, url, PENDING)
    producer.confirm_payment([task_id])
    wait_for(lambda: gauge_is({"idle": 1, "busy": 1, "other": 0}), timeout=30, what=logs)

    origin.throttle = None  # let the download finish

    def completed() -> bool:
        row = sqlite_store.get(task_id)
        return row is not None and row.status == COMPLETED

    wait_for(completed, timeout=60, what=logs)
    wait_for(lambda: gauge_is({"idle": 2, "busy": 0, "other": 0}), timeout=30, what=logs)

    first.stop()
    assert first.process.returncode == 0, first.log()
    wait_for(lambda: gauge_is({"idle": 1, "busy": 0, "other": 0}), timeout=30, what=logs)


def disk_gauges(settings: Settings, connection: Redis) -> dict[str, dict[str, float]]:
    """The `udemy_dl_download_disk_*_bytes` samples of one scrape: host -> {free, total, warn, floor}."""
    found: dict[str, dict[str, float]] = {}
    for (name, labels), value in scrape(settings, connection).items():
        if name.startswith("udemy_dl_download_disk_"):
            part = name.removeprefix("udemy_dl_download_disk_").removesuffix("_bytes")
            found.setdefault(dict(labels)["host"], {})[part] = value
    return found


def test_each_host_reports_its_download_disk(
    wired: tuple[Settings, Producer],
    configure: Callable[..., Settings],
    redis_conn: Redis,
    tmp_path: Path,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """A real worker reports its host's download disk to Redis; the page shows every host's (this one's
    measured as it is scraped), the levels an alert compares with, and forgets a host whose report expired."""
    settings = configure(DOWNLOAD_DIR=str(tmp_path), DISK_WARN_BYTES=str(5 * 1024**3))
    host = socket.gethostname()
    worker = start_worker()
    wait_for(lambda: redis_conn.exists(disk.REPORT_KEY.format(host=host)), timeout=30, what=worker.log)
    reported = {found.host: found for found in disk.reported(redis_conn)}
    usage = shutil.disk_usage(tmp_path)
    assert reported[host].path == str(tmp_path) and reported[host].total == usage.total
    assert abs(reported[host].free - usage.free) < 1024**3, (reported[host], usage)
    ttl: int = redis_conn.ttl(disk.REPORT_KEY.format(host=host))  # type: ignore[assignment]
    assert 0 < ttl <= defaults.DISK_REPORT_TTL

    report_far_host(redis_conn)
    gauges = disk_gauges(settings, redis_conn)
    assert gauges["far-host"] == {"free": 3e9, "total": 1e11, "warn": 1e10, "floor": 1.0}
    assert gauges[host]["warn"] == 5 * 1024**3 and gauges[host]["floor"] == defaults.DISK_HEADROOM
    assert gauges[host]["total"] == usage.total

    redis_conn.delete(disk.REPORT_KEY.format(host="far-host"))  # as its expiry would
    assert set(disk_gauges(settings, redis_conn)) == {host}


def test_every_metric_the_example_alerts_use_is_on_the_page(
    wired: tuple[Settings, Producer], redis_conn: Redis
) -> None:
    """docs/monitoring/alerts.yml names only series the page has (a renamed metric would silence an alert)."""
    settings, _ = wired
    rules = (REPO_ROOT / "docs" / "monitoring" / "alerts.yml").read_text()
    used = set(re.findall(r"\budemy_dl_\w+", rules))
    assert {"udemy_dl_download_disk_free_bytes", "udemy_dl_download_disk_warn_bytes"} <= used
    report_far_host(redis_conn)  # so that every per-host series has a sample
    body, _ = metrics.render_latest(settings, redis_conn)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    on_page = {
        family.name + suffix
        for family in text_string_to_metric_families(body.decode())
        for suffix in suffixes[family.type]
    }
    assert used - on_page == set()


def test_the_quick_references_redis_cli_lines_count_what_stats_count(
    wire_service: Callable[..., Service], sqlite_backend: Backend, redis_conn: Redis, origin: ContentOrigin
) -> None:
    """The `redis-cli` lines of docs/QUICK_REFERENCE.md (the first design's `LLEN bull:downloads:wait`,
    …), run as written with the test's Redis URL, give the figures `stats` gives: 2 completed, then
    2 waiting of which 1 VIP, none running or failed."""
    service = wire_service(sqlite_backend)
    url = origin.add_course("counted", {"a.bin": 10})
    for _ in range(2):
        service.confirm(url)
    service.run_jobs()
    producer = service.producer()
    producer.confirm_payment([service.store.insert_task(EMAIL, url, PENDING)])
    producer.confirm_payment([service.store.insert_task(EMAIL, url, PENDING)], priority="high")

    doc = (REPO_ROOT / "docs" / "QUICK_REFERENCE.md").read_text()
    lines = re.findall(r'^(redis-cli -u "\$RQ_REDIS_URL" \w+ (\S+))\s+#', doc, re.MULTILINE)
    answers = {}
    for command, key in lines:
        done = run_command(
            ["bash", "-c", command.replace("redis-cli", str(venv_bin("redis-cli")), 1)],
            env={**clean_environ(), "RQ_REDIS_URL": service.settings.redis_url},
        )
        assert done.returncode == 0, done.stderr
        answers[key] = int(done.stdout)
    stats = producer.get_queue_stats()
    assert answers == {
        "rq:queue:downloads": stats["waiting"] - stats["waiting_high"],
        "rq:queue:downloads-high": stats["waiting_high"],
        "rq:wip:downloads": stats["active"],
        "rq:finished:downloads": stats["completed"],
        "rq:failed:downloads": stats["failed"],
        "rq:scheduled:downloads": stats["scheduled"],
    }
    assert (stats["waiting"], stats["waiting_high"], stats["completed"], stats["active"]) == (2, 1, 2, 0)
