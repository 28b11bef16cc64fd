"""The reconciler: MySQL is the record, Redis the transport; this repairs the drift between them.

Two cadences, both safe on several hosts at once (a Redis lock elects one sweeper per period,
and every enqueue is deduplicated anyway):

- every RECOVERY_INTERVAL seconds, Redis only: a started download whose worker no longer runs it
  (killed, out of memory, host gone) is enqueued again, so crashed work resumes within about
  90 s at worst and at once on the same host; dead workers of this host leave `rq info`;
- every RECONCILE_INTERVAL seconds (and at once after Redis lost its data), one SELECT: each
  task `processing` with no live job is enqueued again, or settled `failed` when its attempts
  are used up; and each settled task whose final event the payment service has not acknowledged
  (the row's outbox) has it queued again if Redis lost its delivery.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from . import crashpoints, defaults
from .cancellation import cancel_requested
from .errors import InvalidTaskError, LeaseBusyError, StoreError, UdemyDlError
from .lease import TaskLease, lease_is_held
from .outcome import files_in_place, record_completed, record_failed
from .payload import TaskPayload
from .process_control import pid_alive
from .producer import Producer
from .queues import download_queues, job_is_running, priority_of, webhook_queue
from .settings import Settings
from .store import PROCESSING, TaskRow
from .webhooks import enqueue_webhook, final_event, task_of_delivery

log = logging.getLogger(__name__)

SWEEP_LOCK = "udemy_dl:reconciler:sweep"
RECOVER_LOCK = "udemy_dl:reconciler:recover"
REDIS_MARKER = "udemy_dl:reconciler:redis-seen"
"""Set by the first reconciler to look at a Redis; its absence means Redis lost its data."""

ENDED_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


@dataclass
class SweepResult:
    processing: int = 0
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    events_resent: list[int] = field(default_factory=list)
    """Settled tasks whose unacknowledged final event Redis had lost, queued again."""
    cancelled: list[int] = field(default_factory=list)
    """Tasks with a cancel request that no run was left to settle (its canceller or run died)."""


class Reconciler:
    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.settings = settings
        self.producer = producer or Producer(settings)
        self.connection: Redis = self.producer.connection
        self._sweep_due: float | None = None
        self._looked = False

    # -- Redis only -------------------------------------------------------------------------

    def recover_started(self) -> list[int]:
        """Enqueue again every started download whose worker is gone. Returns the task ids."""
        job_ids = [
            job_id
            for queue in download_queues(self.settings, self.connection)
            # cleanup=False: RQ's cleanup judges "abandoned" by this host's clock against scores
            # written with the workers' clocks; liveness here is the workers' own keys (Redis TTLs).
            for job_id in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)
        ]
        recovered = []
        for job_id in job_ids:
            job = self.producer.queues.fetch_job(job_id)
            if job is None or not job.args or job_is_running(self.connection, job) or self._moved_on(job):
                continue
            task_data = job.args[0]
            outcome = self.producer.add_download_job(task_data, priority=priority_of(job), at_front=True)
            if outcome.created:
                task_id = int(task_data.get("taskId", 0)) if isinstance(task_data, dict) else 0
                log.warning("task %s: job %s: its worker %s is gone; enqueued again", task_id, job_id, job.worker_name)
                recovered.append(task_id)
        return recovered

    def recover_deliveries(self) -> list[str]:
        """Put back on the webhooks queue, as the same job (same webhook-id), every delivery whose
        worker is gone; RQ itself would notice only at a worker's maintenance pass, minutes later."""
        queue = webhook_queue(self.settings, self.connection)
        registry = StartedJobRegistry(queue=queue)
        recovered = []
        for job_id in registry.get_job_ids(cleanup=False):
            job = self.producer.queues.fetch_job(job_id)
            if job is None or job_is_running(self.connection, job) or self._moved_on(job):
                continue
            registry.remove_executions(job)
            queue.enqueue_job(job, at_front=True)
            log.warning(
                "task %s: delivery %s: its worker %s is gone; enqueued again",
                task_of_delivery(job_id),
                job_id,
                job.worker_name,
            )
            recovered.append(job_id)
        return recovered

    def _moved_on(self, job: Job) -> bool:
        """Asked again just before *job* is enqueued again: has it ended, or is it live after all?

        The job was read a moment before (from the started registry, or fetched by the sweep); one
        that ended in between (its worker recorded the end, which takes it out of the started
        registry in the same transaction) is then in no live worker's hands, and enqueuing it again
        would run a finished download twice or POST a delivered event again. Its status, read now,
        tells. So does a job retried or picked up again meanwhile: queued, scheduled, or running on
        a live worker."""
        try:
            status = job.get_status(refresh=True)
        except InvalidJobOperation:  # gone from Redis: ended, its result not kept
            return True
        return status in ENDED_STATUSES or self.producer.queues.job_is_live(job)

    def retire_dead_local_workers(self) -> list[str]:
        """Remove registrations of this host's workers whose process is dead, so rq info lists the live ones."""
        retired = []
        for worker in Worker.all(connection=self.connection):
            if worker.hostname == socket.gethostname() and worker.pid and not pid_alive(worker.pid):
                worker.register_death()
                retired.append(worker.name)
                log.warning("worker %s (pid %s) is dead; registration retired", worker.name, worker.pid)
        return retired

    def redis_lost_data(self) -> bool:
        """True once each time Redis is found without our data since this reconciler last looked
        (restarted without persistence, or emptied). The marker key is set again at once, so of
        several reconcilers only the first to look sees it; a reconciler's first look only sets it."""
        missing = bool(self.connection.set(REDIS_MARKER, socket.gethostname(), nx=True))
        looked, self._looked = self._looked, True
        return missing and looked

    # -- one SELECT -------------------------------------------------------------------------

    def sweep(self) -> SweepResult:
        """Re-enqueue `processing` tasks without a live job; fail those whose attempts are used up;
        queue again the final events that the payment service has not acknowledged and that Redis
        no longer holds (lost with its data), under their own webhook-id."""
        result = SweepResult()
        rows = self.producer.store.rows_to_reconcile()
        processing = [row for row in rows if row.status == PROCESSING]
        result.processing = len(processing)
        for row in processing:
            if self.producer.queues.live_job(row.id) is not None or lease_is_held(self.connection, row.id):
                continue  # queued, or a run holds its lease (whatever RQ's registries say of its job)
            cancel = cancel_requested(self.connection, row.id)
            if cancel is not None:  # never enqueued again: settled as cancelled
                if self.producer.settle_cancel_unheld(row, cancel):
                    result.cancelled.append(row.id)
                continue
            if row.attempts >= self.settings.max_attempts:
                if self._settle_exhausted(row):
                    result.failed.append(row.id)
                continue
            current = self.producer.store.get(row.id)
            if current is None or current.status != PROCESSING:
                continue  # settled since the SELECT: its run ended just now (a rare second statement)
            try:
                outcome = self.producer.enqueue_row(row)
            except InvalidTaskError as exc:  # settled failed; the sweep goes on with the other rows
                log.warning("task %s: cannot be run (%s); settled failed", row.id, exc)
                result.failed.append(row.id)
                continue
            if outcome.created:
                result.requeued.append(row.id)
        for row in rows:
            if row.status != PROCESSING and row.pending_event and self._resend_event(row, row.pending_event):
                result.events_resent.append(row.id)
        if result.requeued or result.failed or result.events_resent or result.cancelled:
            log.warning(
                "sweep: %s processing, re-enqueued %s, failed %s, cancelled %s, events sent again for %s",
                result.processing,
                result.requeued,
                result.failed,
                result.cancelled,
                result.events_resent,
            )
        return result

    def _resend_event(self, row: TaskRow, pending: str) -> bool:
        """Queue *row*'s final event again unless Redis still holds its delivery. A delivery that
        succeeded but whose acknowledgement was not recorded leaves the outbox here."""
        if not self.settings.webhook_url:
            return False
        try:
            delivery = Job.fetch(f"webhook-{pending}", connection=self.connection)
        except NoSuchJobError:
            delivery = None
        if delivery is not None:
            status = delivery.get_status(refresh=False)
            if status == JobStatus.FINISHED:
                self.producer.store.event_delivered(row.id, pending)
                return False
            if status == JobStatus.FAILED or self._moved_on(delivery):
                # Retried for an hour and given up (requeue it with rq), on its way, or ended since it
                # was read (delivered just now: the next sweep finds it finished).
                return False
            # In no queue and no live worker's hands (popped by a worker that stopped or died):
            # the same job goes back on its queue, so the webhook-id stays the same.
            StartedJobRegistry(queue=webhook_queue(self.settings, self.connection)).remove_executions(delivery)
            webhook_queue(self.settings, self.connection).enqueue_job(delivery, at_front=True)
            log.warning("task %s: delivery of %s was lost in Redis; queued again", row.id, pending)
            return True
        msg_id, event = final_event(row)
        if msg_id != pending:
            log.warning(
                "task %s: pending event %s does not match the row (%s); sending it as %s",
                row.id,
                pending,
                msg_id,
                pending,
            )
        return enqueue_webhook(self.settings, self.connection, pending, event)

    def _settle_exhausted(self, row: TaskRow) -> bool:
        """Settle a task whose attempts are used up and that no run holds: `completed` if a run
        moved its verified files into place before dying, else `failed`. Done under the task's
        lease, so no run can start (or still be going) meanwhile. True when it was failed."""
        task = TaskPayload(task_id=row.id, email=row.email, course_url=row.course_url)
        lease = TaskLease(self.connection, row.id, "reconciler")
        try:
            lease.acquire()
        except LeaseBusyError:
            return False  # a run took it just now: it decides
        try:
            crashpoints.crash_point(crashpoints.RECONCILER_LEASED)
            current = self.producer.store.get(row.id)
            if current is None or current.status != PROCESSING or current.attempts != row.attempts:
                return False  # changed since the SELECT: the next sweep looks again
            done = files_in_place(self.settings, task)
            store = self.producer.store
            if done is not None:
                log.warning("task %s: attempts used up, but its files are complete; recording them", row.id)
                record_completed(self.settings, store, self.connection, task, *done)
                crashpoints.crash_point(crashpoints.RECONCILER_SETTLED)
                return False
            reason = (
                f"no attempts left: {row.attempts} attempts ended without a result (worker killed or out of memory?)"
            )
            settled = record_failed(self.settings, store, self.connection, task, reason, attempt=row.attempts)
            crashpoints.crash_point(crashpoints.RECONCILER_SETTLED)
            return settled
        finally:
            lease.release()

    # -- the loop ---------------------------------------------------------------------------

    def _take(self, lock: str, seconds: int) -> bool:
        return bool(self.connection.set(lock, socket.gethostname(), nx=True, ex=max(seconds, 1)))

    def run_once(self, force_sweep: bool = False) -> dict[str, Any]:
        """One tick of the loop; the locks make each step happen once per period across hosts."""
        report: dict[str, Any] = {"retired": self.retire_dead_local_workers()}
        if self._take(RECOVER_LOCK, defaults.RECOVERY_INTERVAL - 1):
            report["recovered"] = self.recover_started()
            report["deliveries"] = self.recover_deliveries()
        if self.redis_lost_data():
            # Runs still going lost their leases with the data; give them a lease's lifetime to
            # take them back (they renew every third of it, and one cut off that long stops), or
            # a sweep now could start a second run beside them, or fail one on its last attempt.
            # The sweep lock holds every host's sweep off for as long: it vanished with the data.
            grace = defaults.LEASE_TTL
            self.connection.set(SWEEP_LOCK, socket.gethostname(), ex=grace)
            self._sweep_due = time.monotonic() + grace
            log.warning("Redis lost its data (restarted or emptied); sweeping the database in %ss", grace)
        due = self._sweep_due is not None and time.monotonic() >= self._sweep_due
        interval = self.settings.reconcile_interval
        if force_sweep or due or (interval and self._take(SWEEP_LOCK, interval)):
            self._sweep_due = None
            try:
                report["sweep"] = self.sweep()
            except Exception:
                self.connection.delete(SWEEP_LOCK)  # failed: let the next round (on any host) try again
                raise
        return report

    def run_forever(self, stop: threading.Event) -> None:
        log.info(
            "reconciler started: recovery every %ss, sweep every %ss",
            defaults.RECOVERY_INTERVAL,
            self.settings.reconcile_interval or "(off)",
        )
        while not stop.is_set():
            try:
                self.run_once()
            except (RedisError, StoreError, UdemyDlError) as exc:
                log.warning("reconciler: %s: %s (trying again next round)", type(exc).__name__, exc)
            except Exception:
                log.exception("reconciler: unexpected error (trying again next round)")
            stop.wait(defaults.RECOVERY_INTERVAL)
        log.info("reconciler stopped")


def run_reconciler(settings: Settings) -> None:
    """Run the reconciler loop until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stop.set())
    Reconciler(settings).run_forever(stop)
