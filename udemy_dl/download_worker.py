"""Process control: run one named RQ worker (start_workers.sh) or RQ's worker pool (systemd)."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import select
import signal
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import InvalidJobOperation, NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.scripts import release_lock
from rq.utils import as_text, now
from rq.worker import WorkerStatus
from rq.worker_pool import WorkerPool

from . import crashpoints, defaults, disk, metrics, worker_rq
from .connection import redis_connection
from .errors import ConfigError
from .job import prepare_job_context
from .logs import set_task
from .pausing import PauseState, pause_state
from .process_control import HAND_BACK, die_with_parent, install_hand_back_handler, pid_alive, set_process_title
from .queues import DownloadQueues, priority_of, task_of_job, worker_queues
from .reconciler import run_reconciler
from .scheduler import ResilientScheduler
from .settings import Settings, get_settings
from .webhooks import task_of_delivery

log = logging.getLogger(__name__)


HAND_BACK_SIGNAL = getattr(signal, defaults.HAND_BACK_SIGNAL_NAME)

JOB_FUNCTIONS = {
    defaults.DOWNLOAD_JOB_FUNCTION: worker_rq.process_download,
    defaults.DELIVER_JOB_FUNCTION: worker_rq.deliver_webhook,
}
"""The jobs' stored paths and their functions, loaded in the worker: each horse finds them imported
instead of importing worker_rq again for every job."""

WAKE_KEY = "udemy_dl:worker:{name}:wake"
"""A list each DownloadWorker's dequeue waits on besides its queues (and before them): a stop pushes
WAKE_VALUE there, which ends a blocked dequeue at once with a proper answer (see
DownloadWorker.dequeue_job_and_maintain_ttl)."""
WAKE_VALUE = "stop"
WAKE_TTL = 300
"""Seconds a wake token outlives a worker that could not delete it (killed while stopping)."""

HEARTBEAT_FRESH = 1.0
"""Seconds within which a worker's dequeue loop does not beat again (its registration lives WORKER_TTL
seconds from each beat)."""

PAUSE_POLL = 1.0
"""Seconds between two looks at the pause keys while something this worker listens to is paused
(a paused worker's dequeue blocks no longer than this, so a resume is seen within it)."""

HORSE_READY = b"r"
"""What a kept work horse writes to its worker when its job has ended and it can take the next."""

TITLE = "rq worker udemy_dl {name}: {state}"
"""The process title of a worker and of its work horse (what `ps aux | grep "rq worker"` and
`pgrep -f "rq worker"` find); *state* is `idle`, `busy task 42 (downloads-high), horse 1234`,
`horse task 42 (downloads-high)` or `horse idle`."""


def task_of(job_id: str) -> int | None:
    """The task a download or webhook delivery job is about, else None."""
    return task_of_job(job_id) or task_of_delivery(job_id)


def job_label(job: Job) -> str:
    """`task 42 (downloads-high)`, `task 42 webhook (webhooks)`, or `job <id> (<queue>)`."""
    task_id = task_of(job.id)
    if task_id is None:
        return f"job {job.id} ({job.origin})"
    kind = " webhook" if task_of_job(job.id) is None else ""
    return f"task {task_id}{kind} ({job.origin})"


class _QuietUnlessCompleted(logging.Filter):
    """Drops RQ's success lines ("Successfully completed … job", "Job OK") while a job that did not
    complete its task (handed back, cancelled, failed for good) is being recorded: RQ sees a job
    that returned, the task is not done."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.active:
            return True
        text = str(record.msg) + " ".join(str(arg) for arg in (record.args or ()) if isinstance(arg, str))
        return "Successfully completed" not in text and "Job OK" not in text


QUIET_UNLESS_COMPLETED = _QuietUnlessCompleted()


@dataclass
class _KeptHorse:
    """A work horse its worker keeps for the next download, and the two pipes between them."""

    pid: int
    orders: int
    """The worker's end of the pipe that hands the horse its next job (one JSON line each)."""
    ready: int
    """The worker's end of the pipe on which the horse reports HORSE_READY after each job; end of
    file once the horse is gone."""


class DownloadWorker(Worker):
    """RQ's forking worker, with what a download service needs on top:

    - its work horse dies with it (no orphan keeps writing a staging folder);
    - a short worker TTL and a heartbeat every WORKER_HEARTBEAT seconds, idle or busy, so the key
      of a worker killed with SIGKILL expires within WORKER_TTL seconds and every host stops
      counting it;
    - on a warm shutdown (SIGTERM/SIGINT) it asks the horse to hand its task back to the queue
      at once, instead of waiting for a download that may take an hour;
    - a stop never loses a job it is being handed: a job that a stopping worker dequeues (a task a
      stopping peer has just handed back, say) goes back to the front of its queue, and a stop
      that comes between the dequeue and the horse's start hands the task back like any other;
    - after Redis has lost its data, its next heartbeat registers it again (rq info shows it);
    - a webhook delivery (a short POST, bounded by its own timeout) runs in the worker process
      itself, as RQ's SimpleWorker runs jobs: no horse is forked for it;
    - the metrics a job records reach Redis in one round trip as it ends (see metrics.deferred);
    - its work horse is kept for the next download, up to HORSE_MAX_JOBS of them, rather than
      forked anew for each (see main_work_horse): a fresh fork costs more than a small download;
    - a pause (`rq suspend`, `udemy-dl pause [--queue Q]`) holds it even while it is blocked on its
      queues: a job it pops from a held queue goes back to the front of that queue, untouched, and
      it waits (see pausing.py). RQ itself looks only before each dequeue.
    """

    def __init__(self, *args: Any, titles: bool = False, **kwargs: Any) -> None:
        """*titles*: show the worker's state in its process title (and its horse's); the programs
        that run a worker process set it, a worker run inside another program leaves its title alone."""
        self._titles = titles
        kwargs.setdefault("worker_ttl", defaults.WORKER_TTL)
        kwargs.setdefault("job_monitoring_interval", defaults.WORKER_HEARTBEAT)
        super().__init__(*args, **kwargs)
        self._high_in_a_row = 0
        self._preferred_order = list(self._ordered_queues)
        self._holding_job = False
        """True from the moment a dequeue may hand this worker a job until that job's horse has
        forked: a stop then only records itself (raising, as RQ's handler does for an idle worker,
        would drop a job already popped from its queue)."""
        self._kept: _KeptHorse | None = None
        """In the worker: the horse waiting for its next job, or running it (then also horse_pid)."""
        self._pipes: tuple[int, int] | None = None
        """In a kept horse: its ends of the pipes (orders in, ready out)."""
        self._next_scheduler_try = 0.0
        """Monotonic time before which _keep_scheduler_alive does not try the scheduler locks again."""
        self._paused = PauseState()
        """What was paused when this worker last looked (after its last pop, or each PAUSE_POLL
        while something was): its dequeue leaves those queues alone."""
        self._next_disk_report = 0.0
        """Monotonic time before which a heartbeat does not report the download disk again."""
        rq_log = logging.getLogger("rq.worker")
        if QUIET_UNLESS_COMPLETED not in rq_log.filters:
            rq_log.addFilter(QUIET_UNLESS_COMPLETED)
        self.procline("starting")

    def procline(self, message: str) -> None:
        """The process title, as TITLE (RQ's would read `rq:worker:<name>: …`, which `pgrep -f "rq
        worker"` does not find)."""
        if self._titles:
            set_process_title(TITLE.format(name=self.name, state=message))

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        self.procline(f"{'horse' if self._is_horse else 'busy'} {job_label(job)}")

    @property
    def dequeue_timeout(self) -> int:
        """An idle worker's blocking dequeue, after which it beats again (RQ's: worker_ttl - 15)."""
        return defaults.WORKER_HEARTBEAT

    @property
    def wake_key(self) -> str:
        return WAKE_KEY.format(name=self.name)

    def reorder_queues(self, reference_queue: Queue) -> None:
        """VIP first, but never more than HIGH_PICKUPS_BEFORE_NORMAL VIP tasks in a row while
        normal ones wait: after that run the normal queue is asked first, once."""
        high = [q for q in self._preferred_order if q.name.endswith(defaults.HIGH_QUEUE_SUFFIX)]
        if not high or reference_queue.name not in (
            high[0].name,
            high[0].name.removesuffix(defaults.HIGH_QUEUE_SUFFIX),
        ):
            return  # a webhook delivery: neither a VIP pickup nor a normal one, the order stands
        if reference_queue.name == high[0].name:
            self._high_in_a_row += 1
        elif reference_queue.name + defaults.HIGH_QUEUE_SUFFIX == high[0].name:
            self._high_in_a_row = 0
        if self._high_in_a_row >= defaults.HIGH_PICKUPS_BEFORE_NORMAL:
            normal = [q for q in self._preferred_order if q.name + defaults.HIGH_QUEUE_SUFFIX == high[0].name]
            others = [q for q in self._preferred_order if q not in normal and q is not high[0]]
            self._ordered_queues = [*others, *normal, high[0]]
            self._high_in_a_row = 0
        else:
            self._ordered_queues = list(self._preferred_order)

    # -- the work horse, kept from one download to the next ----------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        """The horse: RQ's (perform the job, then exit) for as many jobs as its worker hands it.

        Between jobs it waits for the next on its pipe, and keeps what a fresh fork would have to
        build again: its Redis and HTTP connections, and the pages and code it has touched. It
        runs each job exactly as a fresh horse would (RQ's perform_job: registries, result,
        retries, the job's timeout), and exits instead of waiting for another once it has run
        HORSE_MAX_JOBS, after a job that failed or left a thread running, after a hand-back, or
        when its worker lets it go (end of file on the pipe). It never outlives its worker.
        """
        install_hand_back_handler(HAND_BACK_SIGNAL)
        # Born with the signal blocked (fork_work_horse): a hand-back asked for before the handler
        # was in place is delivered now, to the handler, instead of killing the horse.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {HAND_BACK_SIGNAL})
        die_with_parent()
        if self._pipes is None:
            super().main_work_horse(job, queue)  # forked by RQ's own code: one job, then exit
            return
        orders, ready = self._pipes
        # What RQ's main_work_horse does once, before its job.
        random.seed()
        self.setup_work_horse_signals()  # type: ignore[no-untyped-call]
        self._is_horse = True
        self.log = logging.getLogger("rq.worker")
        incoming = os.fdopen(orders, "rb")
        served = 0
        while True:
            try:
                succeeded = self.perform_job(job, queue)
            except BaseException:  # as RQ's horse: the worker reports the job's failure
                os._exit(1)
            served += 1
            if not succeeded or not self._horse_may_go_on(served):
                os._exit(0)
            try:
                self.procline("horse idle")
                os.write(ready, HORSE_READY)
                order = incoming.readline()
                if not order:
                    os._exit(0)  # its worker let it go
                job, queue = self._job_handed_over(order)
            except BaseException:
                self.log.exception("Work horse %s: could not take the next job", os.getpid())
                os._exit(1)

    @staticmethod
    def _horse_may_go_on(served: int) -> bool:
        """May a horse that has run *served* jobs take another? Not once it has run its share, not
        when its worker is stopping (a hand-back), and not with a thread of a finished job still
        running (a lease renewal or a fetch that did not stop in time). The share is HORSE_MAX_JOBS."""
        return served < get_settings().horse_max_jobs and not HAND_BACK.is_set() and threading.active_count() == 1

    def _job_handed_over(self, order: bytes) -> tuple[Job, Queue]:
        """In a kept horse: the job its worker has prepared (as RQ's SpawnWorker's horse reads it)."""
        handed = json.loads(order)
        os.environ["RQ_JOB_ID"] = handed["job"]
        job = self.job_class.fetch(handed["job"], connection=self.connection, serializer=self.serializer)
        job.redis_server_version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
        self.execution = Execution.fetch(handed["execution"], job.id, self.connection)
        queue = next((q for q in self.queues if q.name == handed["queue"]), None)
        if queue is None:
            queue = self.queue_class(handed["queue"], connection=self.connection, serializer=self.serializer)
        return job, queue

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {HAND_BACK_SIGNAL})
        try:
            if not self._hand_to_kept_horse(job, queue):
                self._fork_kept_horse(job, queue)  # the horse itself never returns from this call
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._holding_job = False
        if self._stop_requested:
            # The stop came after the dequeue, before there was a horse to ask: ask it now.
            self._ask_horse_to_hand_back()

    def _fork_kept_horse(self, job: Job, queue: Queue) -> None:
        """RQ's fork_work_horse, with the pipes that let the horse stay for the next job."""
        orders_in, orders_out = os.pipe()
        ready_in, ready_out = os.pipe()
        child_pid = os.fork()
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job.id
        if child_pid == 0:
            os.close(orders_out)
            os.close(ready_in)
            self._pipes = (orders_in, ready_out)
            os.setpgrp()
            self.main_work_horse(job, queue)
            os._exit(0)  # just in case
        os.close(orders_in)
        os.close(ready_out)
        os.set_blocking(ready_in, False)  # a horse that has not reported is never waited for when handing
        self._kept = _KeptHorse(child_pid, orders=orders_out, ready=ready_in)
        self._horse_pid = child_pid
        self.procline(f"busy {job_label(job)}, horse {child_pid}")

    def _hand_to_kept_horse(self, job: Job, queue: Queue) -> bool:
        """Give *job* to the horse waiting for it; False if there is none (or it has died)."""
        kept = self._kept
        if kept is None or self.execution is None:
            return False
        order = json.dumps({"job": job.id, "queue": queue.name, "execution": self.execution.id}) + "\n"
        try:
            if os.read(kept.ready, len(HORSE_READY)) != HORSE_READY:  # the report the wait left there
                raise BrokenPipeError("the horse is gone")
            os.write(kept.orders, order.encode())  # far below PIPE_BUF: written whole or not at all
        except OSError:  # it died while waiting (killed, out of memory), or never reported: fork another
            self._let_horse_go()
            return False
        os.environ["RQ_JOB_ID"] = job.id
        self._horse_pid = kept.pid
        self.procline(f"busy {job_label(job)}, horse {kept.pid}")
        return True

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        """Until the horse has ended its job: it reports ready (and stays), or it is gone (reaped
        here, its exit status returned as RQ's wait for a horse returns it). RQ's monitoring
        interrupts the wait (SIGALRM) to heartbeat, as it interrupts its own, then waits again: so
        the wait takes nothing off the pipe (a report taken just before an interruption would be
        lost, and the worker would wait for ever on a horse waiting for its next job). The report
        is taken off when the horse is handed its next job."""
        kept = self._kept
        if kept is None or kept.pid != self.horse_pid:
            return super().wait_for_horse()
        select.select([kept.ready], [], [])
        if _unread(kept.ready):
            return kept.pid, os.EX_OK, None
        self._kept = None  # end of file: the horse is gone
        os.close(kept.orders)
        os.close(kept.ready)
        return super().wait_for_horse()

    def _let_horse_go(self) -> None:
        """End the kept horse, which has no job (it holds no task, no lease, no staging folder)."""
        kept, self._kept = self._kept, None
        if kept is None:
            return
        os.close(kept.orders)
        os.close(kept.ready)
        try:
            os.kill(kept.pid, signal.SIGKILL)
            os.waitpid(kept.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def _ask_horse_to_hand_back(self) -> None:
        self.log.info("Worker %s: asking horse %s to hand its task back", self.name, self.horse_pid)
        try:
            os.kill(self.horse_pid, HAND_BACK_SIGNAL)
        except ProcessLookupError:
            pass

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        if self._holding_job:
            # A dequeue may be handing this worker a job: end it with a wake token, not an
            # exception (see dequeue_job_and_maintain_ttl); _shutdown below only records the stop.
            self._wake()
        elif self.horse_pid:
            self._ask_horse_to_hand_back()
        # Otherwise no job is in hand (between jobs, a heartbeat, a backoff): RQ's _shutdown raises
        # StopRequested and the worker ends at once.

    def _shutdown(self) -> None:
        if not self._holding_job:
            super()._shutdown()  # type: ignore[no-untyped-call]
            return
        self._stop_requested = True
        try:
            self.set_shutdown_requested_date()  # type: ignore[no-untyped-call]
        except RedisError as exc:  # in a signal handler: nothing may escape into the dequeue
            self.log.warning("Worker %s: could not record the stop request: %s", self.name, exc)
        if self.scheduler:
            self.stop_scheduler()  # type: ignore[no-untyped-call]

    def _wake(self) -> None:
        """Push the wake token: a blocked dequeue returns it at once, one about to block finds it."""
        try:
            with self.connection.pipeline() as pipe:
                pipe.rpush(self.wake_key, WAKE_VALUE)
                pipe.expire(self.wake_key, WAKE_TTL)
                pipe.execute()
        except RedisError as exc:  # the dequeue then ends at its timeout (or fails with Redis itself)
            self.log.warning("Worker %s: could not wake its dequeue: %s", self.name, exc)

    def _clear_wake(self) -> None:
        try:
            self.connection.delete(self.wake_key)
        except RedisError as exc:
            self.log.warning("Worker %s: could not clear its wake list: %s", self.name, exc)

    def bootstrap(
        self,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        # RQ installs its stop handlers only after this registers the worker and starts its
        # scheduler: a stop in between (a pool stopping just as it replaces a worker, systemd
        # stopping a worker still starting) would end the process with its registration left
        # behind, counted by `rq info` until the key expires. Until then a stop is only noted; the
        # work loop sees it before its first dequeue and ends the worker cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_while_starting)
        super().bootstrap(logging_level, date_format, log_format)
        crashpoints.crash_point(crashpoints.WORKER_REGISTERED)
        self.heartbeat()  # RQ registers with worker_ttl + 60 s: from now on the key lives WORKER_TTL
        # List every queue it listens on in RQ's set of queues, as a first enqueue would: `rq info`
        # then shows `downloads-high` (and `webhooks`) before the first VIP order (or event).
        self.connection.sadd(self.queue_class.redis_queues_keys, *(queue.key for queue in self.queues))
        self._clear_wake()  # a token left by an earlier worker of this name must not stop this one

    def _stop_while_starting(self, signum: int, frame: Any) -> None:
        self.log.info("Worker %s: stop requested (%s) while starting", self.name, signal.Signals(signum).name)
        self._stop_requested = True

    def teardown(self) -> None:
        super().teardown()  # type: ignore[no-untyped-call]
        if not self.is_horse:
            self._let_horse_go()
            self._clear_wake()

    def _put_back(self, job_id: str, queue: Queue, why: str = "stopping") -> None:
        """Return a job this worker was handed, untouched, to the front of its queue: it is
        stopping, or the queue is paused."""
        self._holding_job = False
        try:
            queue.push_job_id(job_id, at_front=True)
        except RedisError as exc:  # the reconciler's sweep finds the task without a job
            self.log.error("Worker %s: %s; could not put job %s back on %s: %s", self.name, why, job_id, queue, exc)
            return
        self.log.info("Worker %s: %s; job %s goes back to the front of %s", self.name, why, job_id, queue.name)

    def _look_for_pause(self) -> PauseState:
        """Read the pause keys of this worker's queues (one round trip); an unreachable Redis
        leaves the last answer standing (the dequeue will meet the outage itself)."""
        try:
            self._paused = pause_state(self.connection, self.queue_names())
        except RedisError as exc:
            self.log.warning("Worker %s: could not read the pause state: %s", self.name, exc)
        return self._paused

    def _wait_while_paused(self) -> bool:
        """While every queue of this worker is paused: mark it suspended (as RQ does), wait
        PAUSE_POLL seconds and return True, for the dequeue loop to look again. False once
        something may be taken (the worker is marked idle again)."""
        paused = self._look_for_pause()
        held = paused.held(self.queue_names())
        if len(held) < len(self.queues):
            if self.get_state() == WorkerStatus.SUSPENDED:
                self.log.info("Worker %s: resumed; listening on %s", self.name, ",".join(self.queue_names()))
                self.set_state(WorkerStatus.IDLE)
                self.procline("idle")
            return False
        if self.get_state() != WorkerStatus.SUSPENDED:
            what = "every queue (rq suspend)" if paused.everything else ", ".join(held)
            self.log.info("Worker %s: paused: %s; run `udemy-dl resume` or `rq resume` to resume", self.name, what)
            self.set_state(WorkerStatus.SUSPENDED)
            self.procline("paused")
        time.sleep(PAUSE_POLL)  # waiting for a resume; a stop raises out of it (RQ's handler)
        return True

    def _pop(self, timeout: int | None) -> tuple[str, str] | None:
        """(key, value) from the wake list or the first queue that has a job and is not paused, in
        that order; None if nothing came within *timeout* seconds (None: do not block)."""
        queues = [queue for queue in self._ordered_queues if not self._paused.holds(queue.name)]
        if self._paused and timeout is not None:
            timeout = max(1, min(timeout, math.ceil(PAUSE_POLL)))  # look again at the pause soon
        keys = [self.wake_key, *(queue.key for queue in queues)]
        if timeout is None:
            for key in keys:
                value: bytes | None = self.connection.lpop(key)  # type: ignore[assignment]
                if value is not None:
                    return key, as_text(value)
            return None
        popped: tuple[bytes, bytes] | None = self.connection.blpop(keys, timeout)  # type: ignore[assignment]
        if popped is None:
            return None
        return as_text(popped[0]), as_text(popped[1])

    def _queue_of(self, key: str) -> Queue:
        for queue in self.queues:
            if queue.key == key:
                return queue
        return self.queue_class.from_queue_key(key, connection=self.connection, serializer=self.serializer)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue loop, except that a stop cannot make it drop a job.

        RQ's stop handler raises out of an idle worker's blocking BLPOP. If Redis had already
        answered that BLPOP with a job (pushed a moment before: a download a stopping peer hands
        back, say), the job is off its queue and run by no one: its task waits for the reconciler.
        Here the BLPOP also waits on this worker's wake list, and while a pop may be handing over a
        job the handler only records the stop and pushes the wake token: the BLPOP then answers the
        token (the worker stops) or the job it had already taken, which goes back to the front of
        its queue, the same job, before the worker stops. Returns None when stopping, like RQ's
        loop does on a timeout or in burst mode when the queues are empty.
        """
        qnames = ",".join(self.queue_names())
        set_task(None)
        if self.get_state() != WorkerStatus.IDLE:  # the job before has just set it
            self.set_state(WorkerStatus.IDLE)
        self.procline("idle")
        self.log.debug("Worker %s: *** Listening on %s...", self.name, qnames)
        connection_wait_time = 1.0
        idle_since = now()
        idle_time_left = max_idle_time
        result: tuple[Job, Queue] | None = None
        while not self._stop_requested:
            try:
                self._heartbeat_unless_fresh()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()  # type: ignore[no-untyped-call]
                if timeout is not None and idle_time_left is not None:
                    timeout = min(timeout, idle_time_left)
                if self._paused and self._wait_while_paused():
                    continue
                self.log.debug("Worker %s: dequeueing jobs on queues %s and timeout %s", self.name, qnames, timeout)
                result = self._dequeue_once(timeout)
                if result is None and timeout is not None and not self._stop_requested:
                    # Nothing came: look for a pause now and then even so, so that an idle worker shows
                    # it (`rq info`, its process title) within a dequeue timeout, not at the next job.
                    self._look_for_pause()
            except RedisConnectionError as exc:
                if self._stop_requested:
                    break
                self.log.error(
                    "Worker %s: could not connect to Redis instance: %s retrying in %d seconds...",
                    self.name,
                    exc,
                    connection_wait_time,
                )
                time.sleep(connection_wait_time)  # backoff while Redis is away (a stop raises out of it)
                connection_wait_time = min(
                    connection_wait_time * self.exponential_backoff_factor, self.max_connection_wait_time
                )
                continue
            if result is not None or timeout is None:
                break  # a job; or, in burst mode, the queues are empty
            if max_idle_time is not None:
                idle_time_left = math.ceil(max_idle_time - (now() - idle_since).total_seconds())
                if idle_time_left <= 0:
                    break
        if result is None and self._stop_requested:
            self.log.info("Worker %s: stopping on request", self.name)
        self._heartbeat_unless_fresh()
        return result

    def _heartbeat_unless_fresh(self) -> None:
        """Beat, unless the last beat is under HEARTBEAT_FRESH seconds old (a busy worker's loop
        beats after each job, and again before and after each dequeue)."""
        last = self.last_heartbeat
        if last is None or (now() - last).total_seconds() >= HEARTBEAT_FRESH:
            self.heartbeat()

    def _dequeue_once(self, timeout: int | None) -> tuple[Job, Queue] | None:
        """One pop (skipping a stale wake token or a job that no longer exists): the job and its
        queue, with _holding_job still set; or None (nothing came, or the worker is stopping)."""
        while True:
            self._holding_job = True
            try:
                popped = self._pop(timeout)
            except BaseException:
                self._holding_job = False
                raise
            if popped is None:
                self._holding_job = False
                return None
            key, job_id = popped
            if key == self.wake_key:
                self._holding_job = False
                if self._stop_requested:
                    return None
                continue  # a token from before this worker's start
            queue = self._queue_of(key)
            if self._stop_requested:
                self._put_back(job_id, queue)
                return None
            if self._look_for_pause().holds(queue.name):
                # Paused while this worker was blocked on the queue: the job goes back, untouched.
                self._put_back(job_id, queue, "paused")
                return None
            try:
                job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
            except NoSuchJobError:  # deleted meanwhile, as RQ's dequeue skips it
                self._holding_job = False
                continue
            except BaseException:
                self._holding_job = False
                raise
            set_task(task_of(job.id))  # until the job has ended (execute_job)
            if self._stop_requested:
                self._put_back(job.id, queue)
                return None
            self.reorder_queues(reference_queue=queue)
            self.log.debug("Worker %s: dequeued job %s from %s", self.name, job.id, queue.name)
            job.redis_server_version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
            if self.log_job_description:
                self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
            else:
                self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            return job, queue

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self._stop_requested:
            # Stopped after this job was dequeued, before it started: it goes back untouched.
            self._put_back(job.id, queue)
            raise StopRequested()
        renamed = defaults.RENAMED_JOB_FUNCTIONS.get(job.func_name or "")
        if renamed is not None:
            job.func_name = renamed  # queued before an upgrade: run under the function's current name
        if job.func_name in (defaults.DOWNLOAD_JOB_FUNCTION, defaults.DELIVER_JOB_FUNCTION):
            prepare_job_context(self.connection)
        try:
            if job.func_name == defaults.DELIVER_JOB_FUNCTION:
                self._execute_in_process(job, queue)
            else:
                super().execute_job(job, queue)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # RQ would let this end the worker. The job's outcome is in the database (or the
            # reconciler will see it is missing); wait for Redis and go on working.
            self.log.warning("Worker %s: Redis unreachable around job %s: %s; waiting for it", self.name, job.id, exc)
            self._wait_for_redis()
            self._settle_after_outage(job, queue)
        finally:
            self._holding_job = False
            set_task(None)

    def _execute_in_process(self, job: Job, queue: Queue) -> None:
        """Run *job* in this process, as RQ's SimpleWorker does: a webhook delivery is one short POST,
        and forking a horse for it would cost more than the POST itself. RQ's perform_job keeps the
        registries, the result, the retries and `rq info` exactly as for a forked job, and runs the
        job under its death penalty (the job's timeout, WEBHOOK_JOB_TIMEOUT): a receiver that hangs
        past it fails the attempt, which RQ retries, and this worker goes on. A stop meanwhile waits
        for the delivery to end, as it would wait for a horse."""
        self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat_until, args=(done,), name="heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat_until(self, done: threading.Event) -> None:
        """Heartbeat every WORKER_HEARTBEAT seconds until *done*: while this process runs a job itself,
        no monitoring loop beats for it, and a delivery may take up to its timeout (60 s)."""
        while not done.wait(defaults.WORKER_HEARTBEAT):
            try:
                with self.connection.pipeline(transaction=False) as pipe:
                    self.heartbeat(pipeline=pipe)
                    pipe.execute()
            except RedisError as exc:
                self.log.warning("Worker %s: heartbeat failed, Redis unreachable: %s", self.name, exc)

    def perform_job(self, job: Job, queue: Queue) -> bool:
        set_task(task_of(job.id))
        try:
            with metrics.deferred():
                return super().perform_job(job, queue)
        finally:
            QUIET_UNLESS_COMPLETED.active = False
            set_task(None)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        super().handle_execution_ended(job, queue, heartbeat_ttl)
        # Before RQ records the job finished or failed, so a finished job's events are counted.
        metrics.flush()

    def _settle_after_outage(self, job: Job, queue: Queue) -> None:
        """The job's end could not be recorded in Redis: unless it was, hand it to RQ's failure
        handling, which schedules its retry. A retry of a finished download only re-sends its event."""
        try:
            status = job.get_status(refresh=True)
            if status in (JobStatus.FINISHED, JobStatus.FAILED):
                return
            self.handle_job_failure(job, queue, exc_string="Redis was unreachable when the job ended")
        except (RedisConnectionError, RedisTimeoutError, InvalidJobOperation) as exc:
            self.log.warning("Worker %s: could not settle job %s after the outage: %s", self.name, job.id, exc)

    def _wait_for_redis(self) -> None:
        delay = 1.0
        while True:
            try:
                self.connection.ping()
                return
            except (RedisConnectionError, RedisTimeoutError):
                time.sleep(delay)  # backoff while Redis is away
                delay = min(delay * 2, 30.0)

    def set_current_job_working_time(self, current_job_working_time: float, pipeline: Pipeline | None = None) -> None:
        try:
            super().set_current_job_working_time(current_job_working_time, pipeline)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: could not record working time, Redis unreachable: %s", self.name, exc)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        handed_back = bool(job.meta.get("handed_back"))
        result = getattr(job, "_result", None)  # what the job returned (RQ sets it before this call)
        unsuccessful = isinstance(result, dict) and result.get("success") is False
        # Until perform_job ends: RQ's "OK" lines would mislead about a task handed back, cancelled,
        # failed for good or skipped; the job's own lines say what became of it.
        QUIET_UNLESS_COMPLETED.active = handed_back or unsuccessful
        super().handle_job_success(job, queue, started_job_registry)
        if handed_back and job.args:
            # Only now is the job finished, so the enqueue below makes a fresh job rather than
            # finding this one live. At the front: it was already running once.
            outcome = DownloadQueues(get_settings(), self.connection).enqueue(
                job.args[0], priority=priority_of(job), at_front=True, delay=float(job.meta.get("hand_back_in") or 0)
            )
            self.log.info(
                "Worker %s: handed back to the front of %s as job %s, its attempt given back",
                self.name,
                outcome.job.origin,
                outcome.job.id,
            )

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's beat, always with WORKER_TTL: RQ asks for a minute or more beyond its monitoring
        interval, which would keep a dead worker's key (and its count in `rq info`) that long."""
        timeout = defaults.WORKER_TTL
        found = self._disk_due()
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            if found is not None:
                disk.report(pipeline, found)
            return
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hexists(self.key, "birth")
                super().heartbeat(timeout, pipe)
                if found is not None:
                    disk.report(pipe, found)
                registered = pipe.execute()[0]
            if self.birth_date is not None and not registered:
                # Redis restarted without our registration (the beat just now wrote a bare key):
                # announce ourselves again.
                self.log.warning("Worker %s: registration lost (Redis restarted?); registering again", self.name)
                self.connection.delete(self.key)
                self.register_birth()  # type: ignore[no-untyped-call]
            self._keep_scheduler_alive()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # RQ would let this end the worker (and its horse, mid-download); Redis coming back is
            # the usual outcome, so keep working and beat again next time.
            self.log.warning("Worker %s: heartbeat failed, Redis unreachable: %s", self.name, exc)

    def _disk_due(self) -> disk.DiskReport | None:
        """This host's download disk, measured for a report every DISK_REPORT_INTERVAL seconds (by
        the worker, not its horse); None between reports."""
        if self._is_horse or time.monotonic() < self._next_disk_report:
            return None
        self._next_disk_report = time.monotonic() + defaults.DISK_REPORT_INTERVAL
        try:
            return disk.measure(get_settings())
        except ConfigError:  # a worker checks its settings at start; one run without them reports nothing
            return None

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """As RQ's, with a scheduler that outlives Redis outages (see udemy_dl.scheduler)."""
        self.scheduler = ResilientScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()  # type: ignore[no-untyped-call]
        if not self.scheduler.acquired_locks:
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
            finally:
                self.scheduler.release_locks()  # type: ignore[no-untyped-call]
                self.scheduler.register_death()
        else:
            self.scheduler.start()  # type: ignore[no-untyped-call]

    def _keep_scheduler_alive(self) -> None:
        """Restart a scheduler that died anyway (ours waits out Redis outages) at a heartbeat, not
        at RQ's next maintenance pass ten minutes on: scheduled retries depend on it. A worker whose
        peer's scheduler holds the locks tries to take them over at most every
        SCHEDULER_TAKEOVER_INTERVAL seconds (each try asks Redis once per queue, and a busy worker
        beats several times per job)."""
        scheduler = self.scheduler
        if scheduler is None or self._stop_requested:
            return
        process = scheduler._process
        if process is not None and process.is_alive():
            return
        if time.monotonic() < self._next_scheduler_try:
            return
        self._next_scheduler_try = time.monotonic() + defaults.SCHEDULER_TAKEOVER_INTERVAL
        if scheduler.acquire_locks(auto_start=True):
            self.log.info("Worker %s: scheduler (re)started", self.name)

    def maintain_heartbeats(self, job: Job) -> None:
        try:
            super().maintain_heartbeats(job)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: heartbeat for job %s failed, Redis unreachable: %s", self.name, job.id, exc)


def _unread(fd: int) -> int:
    """Bytes waiting to be read on pipe *fd*, without reading them."""
    waiting = fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4)
    return int(struct.unpack("i", waiting)[0])


def default_worker_name(index: int) -> str:
    return f"udemy-dl.{socket.gethostname()}.{index}"


def clear_stale_registration(connection: Redis, name: str) -> bool:
    """Retire a registration left by a dead worker of the same name on this host, so the name can be reused.

    RQ refuses to start a worker whose name is still registered; after a kill -9 the old key
    lives until its TTL runs out (minutes). Only a registration from this host whose PID is gone
    is retired; a live worker elsewhere keeps its name.
    """
    old = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if old is None or old.death_date is not None:
        return False  # none, or a worker that stopped cleanly (its key lingers a minute): RQ reuses the name
    if old.hostname != socket.gethostname() or not old.pid or pid_alive(old.pid):
        return False
    log.warning("worker %s: retiring the registration of dead pid %s", name, old.pid)
    old.register_death()
    return True


def release_dead_scheduler_locks(connection: Redis, queue_names: list[str]) -> list[str]:
    """Free scheduler locks held by a dead scheduler process of this host.

    RQ's scheduler lock outlives a killed worker for a minute, and a worker that cannot take it at
    start only tries again at its next maintenance pass (about 10 minutes): until then retries
    scheduled before the crash would not fire. Returns the queue names whose lock was freed.
    """
    freed = []
    for queue_name in queue_names:
        lock_key = RQScheduler.get_locking_key(queue_name)
        owner = connection.get(lock_key)
        if owner is None:
            continue
        owner_name = owner.decode() if isinstance(owner, bytes) else str(owner)
        data: dict[bytes, bytes] = connection.hgetall(SCHEDULER_KEY_TEMPLATE % owner_name)  # type: ignore[assignment]
        hostname = (data.get(b"hostname") or b"").decode()
        pid = int(data.get(b"pid") or 0)
        if hostname != socket.gethostname() or not pid or pid_alive(pid):
            continue
        if release_lock(connection, lock_key, owner_name):
            log.warning("queue %s: freed the scheduler lock of dead scheduler pid %s", queue_name, pid)
            freed.append(queue_name)
    return freed


def run_worker(settings: Settings, name: str, burst: bool = False, logging_level: str = "INFO") -> bool:
    """Run one RQ worker (with the scheduler, so retry delays fire) until it is told to stop."""
    settings.require_worker_ready()
    connection = redis_connection(settings)
    clear_stale_registration(connection, name)
    queues = worker_queues(settings, connection)
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    worker = DownloadWorker(queues, connection=connection, name=name, titles=True)
    return worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)


class DownloadPool(WorkerPool):
    """RQ's worker pool plus one reconciler process, each replaced if it dies."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reconciler: BaseProcess | None = None
        self._pool_pid = os.getpid()

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        if os.getpid() != self._pool_pid:
            # A worker process forked a moment ago still carries the pool's handler: the stop
            # meant for it arrived before it could install its own. It has nothing to finish.
            os._exit(0)
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO") -> BaseProcess:
        """Each worker builds its own Redis client from the settings (so Sentinel works too) and is
        named like the scripts' workers: udemy-dl.<host>.<id>."""
        return get_context("fork").Process(
            target=_run_pool_worker,
            args=(self.settings, f"udemy-dl.{socket.gethostname()}.{name[:8]}", burst, logging_level),
            name=f"Worker {name} (WorkerPool {self.name})",
        )

    def _ensure_reconciler(self) -> None:
        if self.reconciler is not None and self.reconciler.is_alive():
            return
        if self.reconciler is not None:
            self.log.warning("reconciler (pid %s) died; starting another", self.reconciler.pid)
        self.reconciler = get_context("fork").Process(target=run_reconciler, args=(self.settings,), name="reconciler")
        self.reconciler.start()

    def check_workers(self, respawn: bool = True) -> None:
        super().check_workers(respawn)
        if respawn and self.status != self.Status.STOPPED:
            self._ensure_reconciler()

    def stop_workers(self) -> None:
        super().stop_workers()  # type: ignore[no-untyped-call]
        if self.reconciler is not None and self.reconciler.is_alive():
            self.reconciler.terminate()


def _run_pool_worker(settings: Settings, name: str, burst: bool, logging_level: str) -> None:
    connection = redis_connection(settings)
    queues = worker_queues(settings, connection)
    # Replacing a worker that died: its scheduler went with it, its lock need not wait a minute.
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    worker = DownloadWorker(queues, connection=connection, name=name, titles=True)
    worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)


def run_pool(settings: Settings, count: int, logging_level: str = "INFO") -> None:
    """Run RQ's worker pool: *count* workers and a reconciler, each replaced if it dies;
    SIGTERM stops them warmly (a running download is handed back to the queue)."""
    settings.require_worker_ready()
    connection = redis_connection(settings)
    queues = worker_queues(settings, connection)
    release_dead_scheduler_locks(connection, [queue.name for queue in queues])
    pool = DownloadPool(settings, queues, connection=connection, num_workers=count, worker_class=DownloadWorker)
    try:
        pool.start(logging_level=logging_level)
    finally:
        if pool.reconciler is not None:
            pool.reconciler.terminate()
            pool.reconciler.join(5)
