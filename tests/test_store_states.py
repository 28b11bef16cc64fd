"""The status store's transitions as a state machine (issue 8, "close the class"): hypothesis
interleaves confirmations, runs, retries, hand-backs, reconciler sweeps, operator requeues and
webhook acknowledgements on a handful of paid orders, against the real stores (SQLite and
MariaDB) and real Redis, and checks the rows after every step.

A run is an explicit object: it takes the task's lease and counts an attempt (the first steps of
`process_download`), and later ends in one of the ways a real run ends, through the same code
the worker runs (`_run_leased`, `_settle_failure`, `_record_completed`, `undo_attempt`). Time is
never waited for: a lease that runs out is deleted, a run cut off from Redis gets a client on a
closed port and a lease whose lifetime has passed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import free_port
from tests.support.service import Backend
from udemy_dl import job as download_job
from udemy_dl.context import Context
from udemy_dl.errors import LeaseBusyError
from udemy_dl.folders import final_path, promote, read_record, staging_path, write_record
from udemy_dl.lease import TaskLease, lease_key
from udemy_dl.payload import TaskPayload
from udemy_dl.producer import Producer
from udemy_dl.queues import job_id_for
from udemy_dl.reconciler import Reconciler
from udemy_dl.settings import Settings
from udemy_dl.store import COMPLETED, ENROLLED, FAILED, PENDING, PROCESSING, UNPAID, TaskRow, TaskStore
from udemy_dl.webhooks import final_event, final_event_of

TASKS = 2
"""Orders per example: enough for runs of different tasks to interleave, few enough for runs of
one task to collide often."""

SETTLED = (COMPLETED, FAILED)

RUN_SETTINGS = hypothesis_settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class StaleSettle(AssertionError):
    """A run whose attempt was counted before its task was reopened changed the reopened row."""


class ManualLease(TaskLease):
    """The real lease (acquire, still_held, release and their Redis scripts) without its renewal
    thread: the machine decides when a lease runs out (see `lease_runs_out`)."""

    def _start_renewing(self) -> None:
        return None


@dataclass
class Run:
    """One run of a task, between counting its attempt and ending."""

    label: str
    task_id: int
    attempt: int
    generation: int
    """How many times the task had been reopened when this run counted its attempt."""
    lease: ManualLease
    cut_off: bool = False
    outlived_data_loss: bool = False
    """Redis lost its data while this run was live: its lease, and the name of the lease's last
    taker, are gone; nothing in Redis can tell this run from a later one any more (nor can a run
    cut off from Redis ask it)."""

    def __repr__(self) -> str:
        return f"{self.label}(task={self.task_id}, attempt={self.attempt}, generation={self.generation})"


@dataclass
class TaskModel:
    """What the machine knows of one order besides its row."""

    task_id: int
    generation: int = 0
    """How many times requeue-failed has reopened it."""
    events: set[str] = field(default_factory=set)
    """The webhook-id of every settlement this order has had."""
    acknowledged: bool = False
    """The payment service acknowledged the final event of the current settlement."""
    delivery_lost: bool = False
    """Redis lost its data since the current settlement was last looked at by a sweep."""
    undone_by_stale_run: bool = False
    """A run from before the last reopen changed the row where the guards cannot tell it apart
    (after a Redis data loss, see check_stale); the runs of this generation no longer own their counts."""


@dataclass
class World:
    """Everything a machine runs against: settings, one store, Redis."""

    settings: Settings
    store: TaskStore
    redis: Redis


def clear_store(store: TaskStore) -> None:
    """Empty download_tasks (hypothesis runs every example inside one test, so on one table)."""
    store._execute("DELETE FROM download_tasks")


class StoreStates(RuleBasedStateMachine):
    """Paid orders under any interleaving of confirm, run, retry, hand-back, reconcile and
    requeue-failed. Every rule is something that happens in production; invariants hold after
    each."""

    runs = Bundle("runs")

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.settings = world.settings
        self.store = world.store
        self.redis = world.redis
        self.tasks: list[TaskModel] = []
        self.rows: dict[int, TaskRow] = {}
        self.live: list[Run] = []
        self.confirming: set[int] = set()
        """Tasks the current step confirms (unpaid -> processing is allowed for them only)."""
        self.reopening: set[int] = set()
        """Tasks the current step requeues (failed -> processing is allowed for them only)."""
        self.counter = 0
        self.redis.flushdb()
        clear_store(self.store)
        for folder in (self.settings.download_dir, self.settings.failed_dir, self.settings.staging_dir):
            shutil.rmtree(folder, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------

    def producer(self) -> Producer:
        return Producer(self.settings, connection=self.redis, store=self.store)

    def context(self) -> Context:
        """What a work horse has: the run's code is called with it (it never fetches here)."""
        return Context(settings=self.settings, store=self.store, redis=self.redis, fetcher=cast(Any, None))

    def task(self, index: int) -> TaskModel:
        return self.tasks[index % len(self.tasks)]

    def model(self, task_id: int) -> TaskModel:
        return next(task for task in self.tasks if task.task_id == task_id)

    def row(self, task_id: int) -> TaskRow:
        row = self.store.get(task_id)
        assert row is not None
        return row

    def data(self, task_id: int) -> TaskPayload:
        row = self.row(task_id)
        return TaskPayload(task_id=row.id, email=row.email, course_url=row.course_url)

    def enqueue(self, task_id: int) -> None:
        """What RQ does for a run that will be retried or was handed back: the job is queued again."""
        row = self.row(task_id)
        if row.status == PROCESSING:
            self.producer().add_download_job({"taskId": row.id, "email": row.email, "courseUrl": row.course_url})

    def end(self, run: Run) -> None:
        if run in self.live:
            self.live.remove(run)

    def settle_failure(self, run: Run, reason: str) -> bool:
        """A run's failure, settled as `_attempt` settles it (only while the lease is the run's);
        a stale run (its attempt counted before a reopen) must change nothing."""
        before = self.row(run.task_id)
        holder = lease_holder(self.redis, run.task_id)
        lease_free = not run.cut_off and holder in (None, run.lease.token)
        settled = download_job._settle_failure(self.context(), self.data(run.task_id), reason, run.attempt, run.lease)
        self.check_stale(run, before, "failure", guarded=lease_free)
        return settled

    def check_stale(self, run: Run, before: TaskRow, what: str, guarded: bool) -> None:
        """A run from before the task's last reopen leaves the reopened row as it is, except where
        neither the lease nor the attempt guard can tell the two runs apart: Redis lost its data
        while the stale run was live (so no record of later lease takers survives) or the run is cut
        off from Redis (so it cannot ask), *guarded* (the lease let the run through, or could not
        say no) and the reopened row counts as many attempts as the stale run's."""
        if run.generation == self.model(run.task_id).generation:
            return
        after = self.row(run.task_id)
        if same_row(before, after):
            return
        indistinguishable = (run.outlived_data_loss or run.cut_off) and guarded and before.attempts == run.attempt
        if not indistinguishable:
            raise StaleSettle(f"stale {what} of {run!r} changed the reopened row: {before} -> {after}")
        self.model(run.task_id).undone_by_stale_run = True

    # -- rules ----------------------------------------------------------------------------------

    @initialize(
        statuses=st.lists(st.sampled_from(UNPAID), min_size=TASKS, max_size=TASKS),
        max_attempts=st.integers(1, 3),
        webhooks=st.booleans(),
    )
    def orders(self, statuses: list[str], max_attempts: int, webhooks: bool) -> None:
        """The shop creates unpaid orders; the service runs with MAX_ATTEMPTS 1-3, webhooks on or off."""
        self.settings = replace(
            self.world.settings,
            max_attempts=max_attempts,
            webhook_url=self.world.settings.webhook_url if webhooks else None,
        )
        for status in statuses:
            task_id = self.store.insert_task("buyer@example.com", "https://cdn.example/courses/c", status)
            self.tasks.append(TaskModel(task_id))
        self.rows = {row.id: row for row in self.store.get_many([task.task_id for task in self.tasks])}

    @rule(index=st.integers(0, TASKS - 1), through_producer=st.booleans())
    def confirm(self, index: int, through_producer: bool) -> None:
        """Payment confirmed (again, perhaps): confirm_payment, or the bare UPDATE another
        language's caller runs."""
        task = self.task(index)
        self.confirming.add(task.task_id)
        if through_producer:
            self.producer().confirm_payment([task.task_id])
        else:
            self.store.mark_processing([task.task_id])

    @rule(target=runs, index=st.integers(0, TASKS - 1))
    def begin_run(self, index: int) -> Any:
        """A worker picks up the task: takes its lease (or steps aside), counts an attempt; with no
        attempt to count, `_run_leased` does what it does (nothing, resend the final event, record
        files already in place, or fail a task whose attempts are used up) and the run ends."""
        task = self.task(index)
        self.counter += 1
        lease = ManualLease(self.redis, task.task_id, job_id_for(task.task_id))
        try:
            lease.acquire()
        except LeaseBusyError:
            return multiple()  # RQ retries the job later
        job = self.producer().queues.fetch_job(job_id_for(task.task_id))
        if job is not None:
            job.delete(remove_from_queue=True)  # the worker took it: it is this run now
        attempt = self.store.begin_attempt(task.task_id, self.settings.max_attempts)
        if attempt is None:
            try:
                download_job._run_leased(self.context(), self.data(task.task_id), None, lease)
            finally:
                lease.release()
            return multiple()
        run = Run(f"run{self.counter}", task.task_id, attempt, task.generation, lease)
        self.live.append(run)
        return run

    @rule(run=runs, percent=st.integers(0, 99))
    def report_progress(self, run: Run, percent: int) -> None:
        """A run reports progress (the reporter caps it at 99: 100 means completed)."""
        self.store.set_progress(run.task_id, percent)

    @rule(run=consumes(runs))
    def run_completes(self, run: Run) -> None:
        """The fetch succeeded: confirm the lease, move the verified folder into place, record it
        `completed` (`_download`). A run that lost its lease is interrupted and gives its attempt back;
        files a run already put in place are recorded as they are."""
        self.end(run)
        final = final_path(self.settings, run.task_id)
        record = read_record(final) if final.is_dir() else None
        try:
            if record is None:
                if not run.lease.still_held():
                    self.hand_back(run)
                    return
                record = self.promote(run.task_id)
            download_job._record_completed(self.context(), self.data(run.task_id), final, record)
        finally:
            run.lease.release()

    @rule(run=consumes(runs))
    def run_dies_after_rename(self, run: Run) -> None:
        """The work horse is killed right after moving the files into place (issue 8, item 2)."""
        self.end(run)
        final = final_path(self.settings, run.task_id)
        if not (final.is_dir() and read_record(final) is not None) and run.lease.still_held():
            self.promote(run.task_id)

    @rule(run=consumes(runs))
    def run_fails_permanently(self, run: Run) -> None:
        """A permanent error: the run settles `failed` at its attempt, if the lease is still its own."""
        self.end(run)
        try:
            self.settle_failure(run, "origin refused: HTTP 404")
        finally:
            run.lease.release()

    @rule(run=consumes(runs))
    def run_fails_transiently(self, run: Run) -> None:
        """A transient error: retried by RQ (the job is queued again), or settled `failed` on the
        last attempt."""
        self.end(run)
        try:
            if run.attempt >= self.settings.max_attempts:
                self.settle_failure(run, "ConnectionError: reset (after all attempts)")
            else:
                self.enqueue(run.task_id)
        finally:
            run.lease.release()

    @rule(run=consumes(runs))
    def run_handed_back(self, run: Run) -> None:
        """The worker is stopping (or the lease was lost): the run gives its attempt back."""
        self.end(run)
        try:
            self.hand_back(run)
        finally:
            run.lease.release()

    @rule(run=consumes(runs))
    def run_dies(self, run: Run) -> None:
        """kill -9 mid-fetch: nothing is recorded; the lease stays until it runs out."""
        self.end(run)

    @rule(run=runs)
    def run_cut_off(self, run: Run) -> None:
        """The run's host is cut off from Redis for longer than the lease's lifetime: the lease
        expires and the run can no longer confirm it."""
        if run.cut_off:
            return
        run.cut_off = True
        if run.lease.holder() == run.lease.token:
            self.redis.delete(run.lease.key)
        run.lease.connection = Redis(  # nothing listens there; asked once, no backoff
            host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
        )
        run.lease._confirmed -= run.lease.ttl_ms / 1000 + 1

    @rule(index=st.integers(0, TASKS - 1))
    def lease_runs_out(self, index: int) -> None:
        """The task's lease expires: its holder died, or was out of touch for the lease's whole
        lifetime (and may come back)."""
        self.redis.delete(lease_key(self.task(index).task_id))

    @rule()
    def redis_loses_data(self) -> None:
        """Redis restarts empty: jobs, deliveries and leases are gone. Runs still going take their
        leases back (they renew every third of the lease's lifetime, before the reconciler's grace
        ends), those cut off cannot."""
        self.redis.flushdb()
        for task in self.tasks:
            task.delivery_lost = True
        for run in self.live:
            run.outlived_data_loss = True
            if not run.cut_off:
                run.lease.still_held()

    @rule()
    def reconcile(self) -> None:
        """A reconciler sweep: requeue processing tasks nobody runs, settle those whose attempts
        are used up, queue again final events Redis lost."""
        Reconciler(self.settings, self.producer()).sweep()
        for task in self.tasks:
            task.delivery_lost = False

    @rule(index=st.integers(0, TASKS - 1), through_producer=st.booleans())
    def requeue_failed(self, index: int, through_producer: bool) -> None:
        """The operator's requeue-failed: failed -> processing with its attempts back to 0."""
        task = self.task(index)
        self.reopening.add(task.task_id)
        if self.row(task.task_id).status == FAILED:
            task.generation += 1
            task.undone_by_stale_run = False
        if through_producer:
            self.producer().requeue_failed([task.task_id])
        else:
            self.store.reopen_failed([task.task_id])

    @rule(index=st.integers(0, TASKS - 1), stale=st.booleans())
    def webhook_acknowledged(self, index: int, stale: bool) -> None:
        """The payment service acknowledges the final event (or, late, one from an earlier
        settlement, which must not clear the current one)."""
        task = self.task(index)
        row = self.row(task.task_id)
        if stale:
            for event in sorted(task.events - {row.pending_event}):
                assert not self.store.event_delivered(task.task_id, event), f"stale ack {event} took effect"
        elif row.pending_event is not None:
            assert self.store.event_delivered(task.task_id, row.pending_event)
            task.acknowledged = True

    # -- the run's steps ------------------------------------------------------------------------

    def promote(self, task_id: int) -> dict[str, Any]:
        """Write a verified staging folder and move it into place, as `_download` does."""
        staging = staging_path(self.settings, task_id)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "lesson.mp4").write_bytes(b"x" * 10)
        record = {"files": [{"path": "lesson.mp4", "bytes": 10}], "bytes": 10, "title": "Course"}
        write_record(staging, record)
        promote(staging, final_path(self.settings, task_id))
        return record

    def hand_back(self, run: Run) -> None:
        """`_attempt`'s Interrupted branch: while the lease is still the run's, give the attempt
        back and queue the task again; a run that lost its lease leaves both alone."""
        before = self.row(run.task_id)
        lease_free = not run.cut_off and lease_holder(self.redis, run.task_id) in (None, run.lease.token)
        if run.lease.lost.is_set() or not run.lease.still_held():
            if not run.lease.taken_over:  # cut off from Redis: given back, guarded by its number
                self.store.undo_attempt(run.task_id, run.attempt)
            self.check_stale(run, before, "hand-back", guarded=not run.lease.taken_over)
            return
        self.store.undo_attempt(run.task_id, run.attempt)
        self.check_stale(run, before, "hand-back", guarded=lease_free)
        self.enqueue(run.task_id)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def rows_obey_the_rules(self) -> None:
        """After every step, each row against its previous state and against the model:

        - a status changes only along unpaid -> processing (a confirmation of that task),
          processing -> completed | failed, and failed -> processing (requeue-failed of that task);
          so an unpaid row is never settled and settling happens only from processing;
        - a completed row never changes again, but for its outbox being cleared;
        - attempts stay within 0..MAX_ATTEMPTS and move by one, but for a reopen's reset to 0;
        - progress is 100 exactly when completed;
        - an unpaid row has nothing of a run; a processing row has no finish time, error or
          pending event; a completed row has its verified files in place; a failed row a reason;
        - with webhooks on, a settled row holds its final event's webhook-id (the id
          `final_event` builds from the row, stable across re-sends) until acknowledged, and
          Redis holds that event's delivery unless Redis lost its data since (the next sweep
          queues it again); with webhooks off, no row holds an event;
        - every final event ever queued is the event of a settlement that happened.
        """
        if not self.tasks:
            return
        webhooks = bool(self.settings.webhook_url)
        rows = {row.id: row for row in self.store.get_many([task.task_id for task in self.tasks])}
        for task in self.tasks:
            row, before = rows[task.task_id], self.rows[task.task_id]
            label = f"task {row.id}: {before.status} -> {row.status}"
            if before.status != row.status:
                allowed = {
                    (PENDING, PROCESSING): row.id in self.confirming,
                    (ENROLLED, PROCESSING): row.id in self.confirming,
                    (PROCESSING, COMPLETED): True,
                    (PROCESSING, FAILED): True,
                    (FAILED, PROCESSING): row.id in self.reopening,
                }
                assert allowed.get((before.status, row.status), False), f"{label}: transition not allowed"
            if before.status == COMPLETED:
                assert same_row(before, row, outbox=False), f"{label}: a completed row changed: {before} -> {row}"
            assert 0 <= row.attempts <= self.settings.max_attempts, f"{label}: attempts {row.attempts}"
            reset = before.status == FAILED and row.status == PROCESSING
            assert abs(row.attempts - before.attempts) <= 1 or (reset and row.attempts == 0), (
                f"{label}: attempts {before.attempts} -> {row.attempts}"
            )
            assert (row.progress == 100) == (row.status == COMPLETED), f"{label}: progress {row.progress}"
            if row.status in UNPAID:
                assert (row.attempts, row.progress, row.finished_at, row.pending_event, row.error_message) == (
                    0,
                    0,
                    None,
                    None,
                    None,
                ), f"{label}: unpaid row touched: {row}"
            elif row.status == PROCESSING:
                assert (row.finished_at, row.error_message, row.pending_event) == (None, None, None), f"{label}: {row}"
            else:
                assert row.finished_at is not None, f"{label}: settled without a finish time"
                if row.status == COMPLETED:
                    final = final_path(self.settings, row.id)
                    assert row.output_path == str(final) and read_record(final) is not None, f"{label}: {row}"
                else:
                    assert row.error_message, f"{label}: failed without a reason"
                event = final_event(row)[0]
                if before.status not in SETTLED:
                    task.events.add(event)
                    task.acknowledged = task.delivery_lost = False
                if not webhooks:
                    assert row.pending_event is None, f"{label}: an event pending with webhooks off"
                elif task.acknowledged:
                    assert row.pending_event is None, f"{label}: acknowledged event back in the outbox"
                else:
                    assert row.pending_event == event, f"{label}: pending {row.pending_event}, final event {event}"
                    if not task.delivery_lost:
                        assert self.redis.exists(f"rq:job:webhook-{event}"), f"{label}: delivery of {event} lost"
        for key in self.redis.scan_iter(match="rq:job:webhook-msg_*"):
            msg_id = key.decode().removeprefix("rq:job:webhook-")
            task_id = final_event_of(msg_id)
            if task_id is not None:
                assert msg_id in self.model(task_id).events, f"{msg_id} queued, but no such settlement happened"
        self.rows = rows
        self.confirming.clear()
        self.reopening.clear()

    @invariant()
    def runs_hold_counted_attempts(self) -> None:
        """A live run of the task's current generation never holds an attempt number above the
        row's count (its attempt was counted and not given back by another run)."""
        rows = {row.id: row for row in self.store.get_many([run.task_id for run in self.live])}
        for run in self.live:
            row, task = rows[run.task_id], self.model(run.task_id)
            if row.status != PROCESSING or run.generation != task.generation or task.undone_by_stale_run:
                continue
            if lease_holder(self.redis, run.task_id) == run.lease.token:
                assert run.attempt <= row.attempts, f"{run!r} holds the lease, but the row counts {row.attempts}"


def lease_holder(redis: Redis, task_id: int) -> str | None:
    """The token of the task's lease in Redis, if any."""
    value = cast(bytes | None, redis.get(lease_key(task_id)))
    return None if value is None else value.decode()


def same_row(before: TaskRow, after: TaskRow, outbox: bool = True) -> bool:
    """Equal but for updated_at (and the outbox, when *outbox* is False)."""
    ignore: dict[str, Any] = {"updated_at": None}
    if not outbox:
        ignore["pending_event"] = None
    return replace(before, **ignore) == replace(after, **ignore)


# -- running it ---------------------------------------------------------------------------------


@pytest.fixture
def world(configure: Callable[..., Settings], redis_conn: Redis, backend: Backend) -> Iterator[World]:
    settings = configure(
        DATABASE_URL=backend.url,
        ALLOWED_HOSTS="cdn.example",
        WEBHOOK_URL="http://127.0.0.1:9/hook",
        API_SECRET_KEY="whsec_" + "A" * 44,
    )
    yield World(settings, backend.store, redis_conn)


def test_status_transitions_hold_under_any_interleaving(world: World) -> None:
    """Every invariant of StoreStates holds after every step of every interleaving hypothesis tries."""
    run_state_machine_as_test(cast(Any, lambda: StoreStates(world)), settings=RUN_SETTINGS)


def test_a_run_from_before_a_reopen_cannot_fail_the_reopened_task(world: World) -> None:
    """A run whose lease ran out (frozen, cut off) while its task failed and was reopened comes
    back when the reopened task has counted as many attempts as it had: the lease's last taker is
    another run, so it cannot take the lease again, and the reopened row stays as it is."""
    machine = StoreStates(world)
    machine.orders(statuses=[PENDING] * TASKS, max_attempts=2, webhooks=True)
    machine.confirm(index=0, through_producer=False)
    stale = machine.begin_run(index=0)
    assert isinstance(stale, Run)
    machine.lease_runs_out(index=0)
    other = machine.begin_run(index=0)
    machine.run_fails_permanently(run=other)
    machine.requeue_failed(index=0, through_producer=False)
    third = machine.begin_run(index=0)
    machine.run_dies(run=third)
    machine.lease_runs_out(index=0)
    before = machine.row(stale.task_id)
    assert before.attempts == stale.attempt

    machine.run_fails_permanently(run=stale)

    after = machine.row(stale.task_id)
    assert (after.status, after.attempts) == (PROCESSING, before.attempts)
    assert stale.lease.lost.is_set()
