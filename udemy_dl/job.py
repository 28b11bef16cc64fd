"""The jobs: a download (validate, fetch into staging, verify, move into place, record, notify)
and a webhook delivery. RQ finds them through worker_rq.py, whose path is stored in every job.

This module orchestrates, and is the only one that reaches the per-process context; SQL lives in
store, HTTP in fetch, signing in webhooks, folders in folders, settling in outcome. Every run
may be a second run of the same task, so each step checks what is already done: a completed
task is skipped, a finished folder is recorded rather than fetched again, and status changes
name the status they expect.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from . import crashpoints, defaults, metrics, status_stream
from .context import Context, get_context
from .errors import (
    ConfigError,
    HostNotAllowedError,
    Interrupted,
    InvalidTaskError,
    LeaseBusyError,
    PermanentError,
    StoreError,
    TransientError,
    WebhookDeliveryError,
)
from .fetch import Fetcher
from .folders import final_path, finished_staging, promote, read_record, staging_lock, staging_path, write_record
from .lease import TaskLease
from .limits import OriginSlot, origin_host
from .outcome import files_in_place, record_cancelled, record_completed, record_failed, resend_final_event
from .payload import TaskPayload, parse_task, parse_task_id
from .process_control import RunStop
from .settings import Settings, get_settings
from .store import COMPLETED, FAILED, PROCESSING, TaskStore, utcnow
from .webhooks import PROGRESS as EVENT_PROGRESS
from .webhooks import STARTED as EVENT_STARTED
from .webhooks import build_event, enqueue_webhook, event_id, final_event_of, sign_headers

log = logging.getLogger(__name__)


@dataclass
class ProgressReporter:
    """Throttled progress: job.meta, download_tasks.progress, the task's status stream (the customer's browser)
    and the log, about once a second; and a `download.progress` webhook every PROGRESS_EVENT_STEP percent or
    PROGRESS_EVENT_INTERVAL s."""

    task_id: int
    store: TaskStore
    job: Job | None
    started: float = field(default_factory=time.monotonic)
    notify: Callable[[dict[str, Any]], None] | None = None
    stream: Redis | None = None
    fetched: Callable[[], int] | None = None
    """Bytes received from the network so far by this attempt. The rate counts these: `done` also holds
    the bytes an earlier attempt left on disk, which this attempt did not fetch."""
    _last: float = field(default_factory=time.monotonic)  # first report after one interval: short tasks send none
    _last_percent: int = -1
    _event_percent: int = 0
    _event_time: float = field(default_factory=time.monotonic)

    def __call__(self, done: int, total: int | None, files_done: int, files_total: int) -> None:
        if done and files_done < files_total:
            crashpoints.crash_point(crashpoints.MID_FETCH)
        now = time.monotonic()
        finished = files_done == files_total
        if not finished and now - self._last < defaults.PROGRESS_INTERVAL:
            return
        self._last = now
        rate = (self.fetched() if self.fetched is not None else done) / max(now - self.started, 1e-6)
        percent = int(done * 100 / total) if total else int(files_done * 100 / max(files_total, 1))
        percent = min(percent, 99)  # 100 means completed, and only the final update says that
        if self.job is not None:
            self.job.meta["progress"] = {
                "bytes": done,
                "total": total,
                "files": files_done,
                "filesTotal": files_total,
                "percent": percent,
                "rate": round(rate),
            }
            try:
                self.job.save_meta()
            except RedisError as exc:  # progress is best effort; Redis may be away for a moment
                log.warning("task %s: progress not saved to the job: %s", self.task_id, exc)
        if self.stream is not None and not finished:  # the final entry is written when the task is recorded
            status_stream.publish_progress(self.stream, self.task_id, percent, done, total, files_done, files_total)
        step_due = percent >= self._event_percent + defaults.PROGRESS_EVENT_STEP
        if (
            self.notify is not None
            and not finished
            and (step_due or now - self._event_time >= defaults.PROGRESS_EVENT_INTERVAL)
        ):
            self._event_percent = percent  # the next step counts from the event sent, so events are a step apart
            self._event_time = now
            self.notify(
                {"progress": percent, "bytes": done, "total": total, "files": files_done, "filesTotal": files_total}
            )
        if percent != self._last_percent and not finished:  # the final state is written by mark_completed
            self._last_percent = percent
            try:
                self.store.set_progress(self.task_id, percent)
            except StoreError as exc:  # progress is best effort; the outcome is what must be recorded
                log.warning("task %s: progress not recorded: %s", self.task_id, exc)
        log.info(
            "task %s: %s%% %s/%s bytes, %s/%s files, %.1f MB/s",
            self.task_id,
            percent,
            done,
            total if total is not None else "?",
            files_done,
            files_total,
            rate / 1e6,
        )


def process_download(task_data: dict[str, Any]) -> dict[str, Any]:
    """RQ job: fetch one paid task's files and record the outcome. See the module docstring."""
    try:
        ctx = get_context()
    except ConfigError as exc:  # a worker checks its settings at start; a direct call may not have
        log.error("cannot run a download: %s", exc)
        task_id = task_data.get("taskId") if isinstance(task_data, dict) else None
        return {"success": False, "taskId": task_id, "error": f"configuration: {exc}"}
    job = get_current_job()
    metrics.observe_pickup(ctx.redis, job)
    try:
        task = parse_task(task_data)
    except InvalidTaskError as exc:
        return _reject_bad_input(ctx, task_data, exc)
    # The lease comes first: everything below, the "attempts used up" verdict included, is
    # decided by the one run that holds it, never by a duplicate beside a run in progress.
    lease = TaskLease(ctx.redis, task.task_id, job.id if job is not None else "", also_set=RunStop(), watch_cancel=True)
    lease.acquire()  # LeaseBusyError: another run is at it; this one steps aside and is retried later
    crashpoints.crash_point(crashpoints.AFTER_LEASE)
    slot = None
    try:
        slot = _take_origin_slot(ctx, task, job, lease)
        if slot is not None and not slot.held and lease.cancelled is None:
            return _hand_back_for_origin(ctx, task, job, lease, slot)
        with staging_lock(ctx.settings, task.task_id):
            return _run_leased(ctx, task, job, lease)
    finally:
        if slot is not None:
            slot.release()
        lease.release()


def _take_origin_slot(ctx: Context, task: TaskPayload, job: Job | None, lease: TaskLease) -> OriginSlot | None:
    """The run's slot at its origin under ORIGIN_CONCURRENCY (None when there is no cap), renewed
    with the lease from now on. Before any attempt is counted, it waits up to ORIGIN_SLOT_WAIT
    seconds for a free one (a direct call, with no queue to go back to, as long as it takes); the
    slot's `held` is False when none came free. A cancelled task needs none: it is settled at once,
    without fetching, and a cancel that comes during the wait ends it."""
    cap = ctx.settings.origin_concurrency
    if not cap or lease.cancel_seen() is not None:
        return None
    try:
        host = origin_host(task.course_url)
    except HostNotAllowedError:
        return None  # the fetch refuses the URL, and fails the task, with the reason
    slot = OriginSlot(ctx.redis, host, cap, lease.token)
    if not slot.try_take():
        log.info("task %s: origin %s has %s task(s) downloading, the most allowed; waiting", task.task_id, host, cap)
        patience = defaults.ORIGIN_SLOT_WAIT if job is not None else math.inf
        if not slot.wait(patience, stop=lease.also_set):
            return slot
    lease.renew_with_lease(slot.renew)
    return slot


def _hand_back_for_origin(
    ctx: Context, task: TaskPayload, job: Job | None, lease: TaskLease, slot: OriginSlot
) -> dict[str, Any]:
    """No slot came free at the origin: the task goes back to its queue, to be tried again in
    ORIGIN_BUSY_DELAY seconds (at once if the worker is stopping), and the worker is free for other
    work. No attempt was counted."""
    stopping = lease.also_set is not None and lease.also_set.is_set()
    delay = 0.0 if stopping else defaults.ORIGIN_BUSY_DELAY * (1 + random.uniform(0, defaults.RETRY_JITTER))
    metrics.inc(ctx.redis, "origin_busy")
    log.info(
        "task %s: origin %s still busy (%s at once); handing the task back%s, no attempt counted",
        task.task_id,
        slot.host,
        slot.cap,
        "" if stopping else f" for {delay:.1f} s",
    )
    if job is not None:
        job.meta["handed_back"] = True
        job.meta["hand_back_in"] = delay
        job.save_meta()
    return {"success": False, "taskId": task.task_id, "handedBack": True, "originBusy": True}


def _run_leased(ctx: Context, task: TaskPayload, job: Job | None, lease: TaskLease) -> dict[str, Any]:
    cancelled = lease.cancel_seen()
    if cancelled is not None:
        # Cancelled while queued (RQ delivers at least once, and a popped job may still run): the
        # task never starts. A task that was settled first goes on below as any settled task does.
        settled = _settle_cancel(ctx, task, cancelled, lease)
        if settled is not None:
            return settled
    # The usual case costs one statement: count the attempt of a paid task that has attempts left.
    attempt = ctx.store.begin_attempt(task.task_id, ctx.settings.max_attempts)
    if attempt is not None:
        crashpoints.crash_point(crashpoints.AFTER_ATTEMPT)
        return _attempt(ctx, task, attempt, job, lease)
    row = ctx.store.get(task.task_id)
    if row is None:
        log.error("task %s: no such row in download_tasks", task.task_id)
        return {"success": False, "taskId": task.task_id, "error": "no such task"}
    if row.status == COMPLETED:
        log.info("task %s: already completed, nothing to do", task.task_id)
        resend_final_event(ctx.settings, ctx.redis, row)
        return {"success": True, "taskId": task.task_id, "skipped": True, "outputPath": row.output_path}
    if row.status == FAILED:
        resend_final_event(ctx.settings, ctx.redis, row)
        return {"success": False, "taskId": task.task_id, "skipped": True, "error": row.error_message}
    if row.status != PROCESSING:
        log.warning("task %s: status is %s (not paid), not fetching", task.task_id, row.status)
        return {"success": False, "taskId": task.task_id, "error": f"task is {row.status}, not processing"}
    if row.attempts >= ctx.settings.max_attempts:
        done = files_in_place(ctx.settings, task)
        if done is not None:
            # A run fetched and verified the course and died before recording it: that is the
            # result, whatever the attempt count says.
            log.warning("task %s: attempts used up, but its files are complete; recording them", task.task_id)
            return _record_completed(ctx, task, *done)
        # Earlier runs used every attempt without a result: each died (killed, out of memory).
        reason = f"no attempts left: {row.attempts} attempts ended without a result (worker killed or out of memory?)"
        log.error("task %s: %s", task.task_id, reason)
        metrics.inc(ctx.redis, "failures", reason="AttemptsExhausted")
        metrics.inc(ctx.redis, "tasks", outcome="failed")
        _settle_failure(ctx, task, reason, row.attempts, lease)
        return {"success": False, "taskId": task.task_id, "error": reason}
    # The row changed between the two statements (reopened meanwhile, say): let RQ run it again.
    raise TransientError(f"task {task.task_id}: row changed while its attempt was being counted")


def _attempt(ctx: Context, task: TaskPayload, attempt: int, job: Job | None, lease: TaskLease) -> dict[str, Any]:
    log.info("task %s: attempt %s of %s: %s", task.task_id, attempt, ctx.settings.max_attempts, task.course_url)
    try:
        started = {**task.to_payload(), "status": PROCESSING, "attempt": attempt}
        _send(ctx, task.task_id, EVENT_STARTED, started, utcnow())
    except Exception as exc:  # informative only: the download goes ahead
        log.warning("task %s: started event not queued: %s", task.task_id, exc)
    status_stream.publish_processing(ctx.redis, task.task_id)
    began = time.monotonic()
    ctx.fetcher.reset_count()
    metrics.inc(ctx.redis, "attempts")
    outcome = "retry"
    try:
        result = _download(ctx, task, job, lease)
        outcome = "completed"
        return result
    except Interrupted:
        if lease.cancelled is not None and not lease.lost.is_set():
            outcome = "cancelled"
            return _cancelled_mid_run(ctx, task, attempt, lease)
        outcome = "handed_back"
        # Not this attempt's fault: give the attempt back. The bytes so far stay in staging. A run
        # whose lease another run took leaves the count to that run (or to the reopened task); one
        # merely cut off from Redis gives it back, guarded by its number (a run that took over on
        # another host has counted its own since), so an outage never uses up a paid order's attempts.
        if lease.lost.is_set() or not lease.still_held():
            if not lease.taken_over:
                ctx.store.undo_attempt(task.task_id, attempt)
            log.warning("task %s: lease lost mid-run; leaving the task to the run that holds it", task.task_id)
            return {"success": False, "taskId": task.task_id, "leaseLost": True}
        ctx.store.undo_attempt(task.task_id, attempt)
        log.info("task %s: worker stopping; handing the task back to the queue", task.task_id)
        if job is not None:
            job.meta["handed_back"] = True
            job.save_meta()
        return {"success": False, "taskId": task.task_id, "handedBack": True}
    except PermanentError as exc:
        outcome = "failed"
        metrics.inc(ctx.redis, "failures", reason=type(exc).__name__)
        log.error("task %s: permanent error: %s", task.task_id, exc)
        if not _settle_failure(ctx, task, str(exc), attempt, lease):
            return {"success": False, "taskId": task.task_id, "leaseLost": True}
        return {"success": False, "taskId": task.task_id, "error": str(exc)}
    except Exception as exc:
        if lease.cancelled is not None and not lease.lost.is_set():
            # The fetch broke as the cancel stopped it: the cancel, not a retry, is the outcome.
            log.info("task %s: %s while being cancelled", task.task_id, type(exc).__name__)
            outcome = "cancelled"
            return _cancelled_mid_run(ctx, task, attempt, lease)
        metrics.inc(ctx.redis, "failures", reason=type(exc).__name__)
        if _is_last_attempt(job, attempt, ctx.settings):
            outcome = "failed"
            log.error("task %s: attempt %s failed, no attempts left: %s", task.task_id, attempt, exc)
            reason = f"{type(exc).__name__}: {exc} (after {attempt} attempts)"
            if not _settle_failure(ctx, task, reason, attempt, lease):
                return {"success": False, "taskId": task.task_id, "leaseLost": True}
        else:
            log.warning("task %s: attempt %s failed, will retry: %s", task.task_id, attempt, exc)
        raise
    finally:
        metrics.inc(ctx.redis, "tasks", outcome=outcome)
        metrics.inc(ctx.redis, "bytes_fetched", ctx.fetcher.bytes_transferred)
        metrics.observe(ctx.redis, "task_duration_seconds", time.monotonic() - began)


def _download(ctx: Context, task: TaskPayload, job: Job | None, lease: TaskLease) -> dict[str, Any]:
    settings = ctx.settings
    final = final_path(settings, task.task_id)
    record = read_record(final) if final.is_dir() else None
    if record is None:
        staging = staging_path(settings, task.task_id)
        record = finished_staging(staging, task.course_url)
        if record is not None:
            log.info("task %s: staging already holds the verified course; moving it into place", task.task_id)
        else:
            fetcher = ctx.fetcher
            reporter = ProgressReporter(
                task.task_id,
                ctx.store,
                job,
                notify=_progress_notifier(ctx, task),
                stream=ctx.redis,
                # An operator's FETCH_COMMAND does not say what it received: its rate is all it wrote.
                fetched=(lambda: fetcher.bytes_transferred) if isinstance(fetcher, Fetcher) else None,
            )
            result = ctx.fetcher.fetch(task.course_url, staging, on_progress=reporter, stop=lease.also_set)
            record = result.record(task.course_url)
            write_record(staging, record)
            crashpoints.crash_point(crashpoints.AFTER_RECORD)
        if lease.cancel_seen() is not None:  # asked now: a cancel must not race the rename
            raise Interrupted("cancelled before the files were moved into place")
        if not lease.still_held():  # another run took over, or Redis could not say: its copy counts
            raise Interrupted("lease lost before the files were moved into place")
        promote(staging, final)
        crashpoints.crash_point(crashpoints.AFTER_RENAME)
    else:
        log.info("task %s: files already in place at %s, recording them", task.task_id, final)
    return _record_completed(ctx, task, final, record)


def _record_completed(ctx: Context, task: TaskPayload, final: Path, record: dict[str, Any]) -> dict[str, Any]:
    record_completed(ctx.settings, ctx.store, ctx.redis, task, final, record)
    return {
        "success": True,
        "taskId": task.task_id,
        "outputPath": str(final),
        "bytes": int(record.get("bytes", 0)),
        "files": len(record.get("files", [])),
    }


def _settle_failure(ctx: Context, task: TaskPayload, reason: str, attempt: int, lease: TaskLease) -> bool:
    """Fail the task, as the run that holds its lease at *attempt*. False when the lease is no
    longer ours (or Redis cannot confirm it): the run that holds it now decides, and this one
    leaves the row and the staging folder alone."""
    if not lease.still_held():
        log.warning("task %s: lease lost; not recording this run's failure: %s", task.task_id, reason)
        return False
    record_failed(ctx.settings, ctx.store, ctx.redis, task, reason, attempt=attempt)
    return True


def _settle_cancel(
    ctx: Context, task: TaskPayload, reason: str, lease: TaskLease, attempt: int | None = None
) -> dict[str, Any] | None:
    """Settle a cancelled task as the run that holds its lease: failed with *reason*, partial files
    deleted, `download.cancelled` queued. None when the row was settled before (or, at *attempt*,
    changed since) and the cancel changed nothing."""
    if not lease.still_held():
        log.warning("task %s: lease lost; leaving the cancel to the run that holds it", task.task_id)
        return {"success": False, "taskId": task.task_id, "leaseLost": True}
    if not record_cancelled(ctx.settings, ctx.store, ctx.redis, task, reason, attempt=attempt):
        return None
    return {"success": False, "taskId": task.task_id, "cancelled": True, "error": reason}


def _cancelled_mid_run(ctx: Context, task: TaskPayload, attempt: int, lease: TaskLease) -> dict[str, Any]:
    """A run stopped by its task's cancel: settle it. The attempt is not given back, and the job
    ends normally, so RQ retries nothing."""
    assert lease.cancelled is not None
    settled = _settle_cancel(ctx, task, lease.cancelled, lease, attempt)
    return settled or {"success": False, "taskId": task.task_id, "error": "cancel came after the task was settled"}


def _progress_notifier(ctx: Context, task: TaskPayload) -> Callable[[dict[str, Any]], None]:
    def notify(progress: dict[str, Any]) -> None:
        at = utcnow()
        data = {**task.to_payload(), "status": PROCESSING, **progress}
        try:
            _send(ctx, task.task_id, EVENT_PROGRESS, data, at)
        except Exception as exc:  # a progress event is informative; losing one must not stop the download
            log.warning("task %s: progress event not queued: %s", task.task_id, exc)

    return notify


def _reject_bad_input(ctx: Context, task_data: object, exc: InvalidTaskError) -> dict[str, Any]:
    """Bad input is permanent: mark the row failed if there is one, never retry."""
    metrics.inc(ctx.redis, "failures", reason=type(exc).__name__)
    metrics.inc(ctx.redis, "tasks", outcome="failed")
    raw_id = task_data.get("taskId") if isinstance(task_data, dict) else None
    try:
        task_id = parse_task_id(raw_id)
    except InvalidTaskError:
        log.error("bad task data, no usable taskId: %s", exc)
        return {"success": False, "taskId": raw_id, "error": str(exc)}
    log.error("task %s: bad task data: %s", task_id, exc)
    row = ctx.store.get(task_id)
    if row is not None and row.status == PROCESSING:
        task = TaskPayload(task_id=task_id, email=row.email, course_url=row.course_url)
        lease = TaskLease(ctx.redis, task_id, "bad-input")
        try:
            lease.acquire()
        except LeaseBusyError:
            log.warning("task %s: a run holds its lease; leaving the outcome to it", task_id)
            return {"success": False, "taskId": task_id, "error": str(exc)}
        try:
            record_failed(ctx.settings, ctx.store, ctx.redis, task, f"bad task data: {exc}", attempt=row.attempts)
        finally:
            lease.release()
    return {"success": False, "taskId": task_id, "error": str(exc)}


def _send(ctx: Context, task_id: int, event_type: str, data: dict[str, Any], finished_at: datetime) -> None:
    """Queue a live event (started, progress). Final events are queued right after the status
    change that records their webhook-id in the row: if Redis refuses one, the job fails, and its
    retry (or the reconciler) finds the row settled with the event pending and queues it then."""
    enqueue_webhook(
        ctx.settings, ctx.redis, event_id(task_id, event_type, finished_at), build_event(event_type, data, finished_at)
    )


def _is_last_attempt(job: Job | None, attempt: int, settings: Settings) -> bool:
    """The database's attempt count decides (RQ's retries_left also shrinks when a run steps aside
    for another's lease). A direct call outside RQ has no retry to come, so it is the last."""
    return job is None or attempt >= settings.max_attempts


# -- webhook delivery ------------------------------------------------------------------------------


def deliver_webhook(msg_id: str, body: str) -> dict[str, Any]:
    """RQ job: POST one signed event to WEBHOOK_URL; anything but 2xx raises, so RQ retries later."""
    settings = get_settings()
    job = get_current_job()
    if not settings.webhook_url or not settings.api_secret_key:
        if job is not None:
            metrics.inc(job.connection, "webhook_deliveries", result="failed")
        missing = "WEBHOOK_URL" if not settings.webhook_url else "API_SECRET_KEY"
        raise ConfigError(missing, "not set on this worker; cannot deliver")
    headers = sign_headers(settings.api_secret_key, msg_id, body)
    try:
        response = requests.post(
            settings.webhook_url,
            data=body.encode("utf-8"),
            headers=headers,
            timeout=(defaults.WEBHOOK_TIMEOUT, defaults.WEBHOOK_TIMEOUT),
            allow_redirects=False,
        )
        if not 200 <= response.status_code < 300:
            raise WebhookDeliveryError(f"webhook {msg_id}: receiver answered HTTP {response.status_code}")
    except (requests.RequestException, WebhookDeliveryError) as exc:
        if job is not None:
            metrics.inc(job.connection, "webhook_deliveries", result="failed")
        if isinstance(exc, WebhookDeliveryError):
            raise
        raise WebhookDeliveryError(f"webhook {msg_id}: {type(exc).__name__}") from exc
    if job is not None:
        metrics.inc(job.connection, "webhook_deliveries", result="delivered")
    log.info("webhook %s delivered (HTTP %s)", msg_id, response.status_code)
    _acknowledge(msg_id)
    return {"delivered": True, "webhookId": msg_id, "status": response.status_code}


def _acknowledge(msg_id: str) -> None:
    """A final event reached the payment service: take it out of the task row's outbox."""
    task_id = final_event_of(msg_id)
    if task_id is None:
        return
    try:
        get_context().store.event_delivered(task_id, msg_id)
    except Exception as exc:  # delivered is delivered; a stale outbox entry only risks one more send
        log.warning("webhook %s delivered, but not recorded in the database: %s", msg_id, exc)


def prepare_job_context(connection: Redis | None = None) -> None:
    """In the worker, before it runs a download (in a forked horse) or a delivery: settings parsed,
    database connection open and answering, and Redis reached through the worker's own client
    (*connection*), whose pool the horse's RQ bookkeeping uses too. A horse inherits all of it
    instead of setting it up again (a delivery records its acknowledgement in the task's row)."""
    try:
        get_context(connection).store.ensure_connected()
    except Exception as exc:  # the horse will try again, with retries, and report properly
        log.warning("could not prepare the database connection: %s", exc)
