"""The kept work horse: a worker hands one horse download after download (a fresh one after
HORSE_MAX_JOBS, after a failure or a hand-back, or when it died), and runs webhook deliveries itself.

Real `udemy-dl worker` processes on Redis and MariaDB, the local origin and receiver. Which process
ran each attempt is read from the job's own log lines, which name their process.
"""

from __future__ import annotations

import itertools
import os
import signal

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus

from tests.support.horses import (
    HorseWorld,
    TricklingReceiver,
    attempt_pids,
    deadline,
    delivery_pids,
    interrupted_at_line,
    standing_horse,
)
from tests.support.processes import children, pid_running
from tests.support.rq_state import live_workers
from tests.support.waiting import wait_for
from udemy_dl import crashpoints
from udemy_dl.download_worker import DownloadWorker, _KeptHorse
from udemy_dl.queues import job_id_for
from udemy_dl.store import PROCESSING

pytestmark = pytest.mark.e2e


def test_one_horse_runs_task_after_task_and_the_worker_delivers_their_webhooks(horses: HorseWorld) -> None:
    """Several downloads in a row run in one horse, each completed once; their webhook deliveries run in
    the worker process itself, between them, and fork nothing: the horse stays the same throughout."""
    worker = horses.start()
    tasks = horses.courses(4)
    first, rest = tasks[0], tasks[1:]
    horses.run([first])
    horse = horses.horse(worker)
    family = set(children(worker.pid, zombies=False))
    horses.run(rest)
    horses.assert_completed_once(tasks)

    log = horses.log()
    assert [attempt_pids(log, task_id) for task_id in tasks] == [[horse]] * len(tasks), log
    assert horse != worker.pid
    assert horses.horse(worker) == horse
    wait_for(  # started and completed of each, logged once the receiver has answered
        lambda: len(delivery_pids(horses.log())) >= 2 * len(tasks),
        timeout=10,
        what=lambda: f"two deliveries per task in the log\n{horses.log()}",
    )
    delivered = delivery_pids(horses.log())
    assert set(delivered.values()) == {worker.pid}, delivered
    assert set(children(worker.pid, zombies=False)) == family, "a process was forked or lost meanwhile"


def test_horse_killed_between_downloads_is_replaced_and_the_next_task_completes(horses: HorseWorld) -> None:
    worker = horses.start()
    first, second = horses.courses(2)
    horses.run([first])
    horse = horses.horse(worker)
    os.kill(horse, signal.SIGKILL)
    wait_for(lambda: not pid_running(horse), timeout=10, what="the idle horse to die")

    horses.run([second])
    horses.assert_completed_once([first, second])
    (runner,) = attempt_pids(horses.log(), second)
    assert runner not in (horse, worker.pid)
    assert worker.process.poll() is None, worker.log()
    assert horses.horse(worker) == runner
    assert "terminated unexpectedly" not in worker.log()


def test_horse_killed_mid_download_is_retried_in_a_fresh_horse_resuming_its_bytes(horses: HorseWorld) -> None:
    """kill -9 of a kept horse in the middle of its second download (crash point mid_fetch): the worker sees
    its horse gone, RQ retries the job, and a fresh horse resumes the file (a Range request) and keeps
    going for the next task."""
    marker = horses.svc.settings.download_dir.parent / "crash-mid-fetch"
    # mid_fetch is passed at each chunk received, counted per process: a 1 KiB course passes it at most
    # twice, so the kill lands in the kept horse's second download, some chunks into its 4 MiB.
    horses.svc.reconfigure(
        **{
            crashpoints.CRASH_AT: crashpoints.MID_FETCH,
            crashpoints.CRASH_MARKER: str(marker),
            crashpoints.CRASH_SKIP: "4",
        }
    )
    first, after = horses.courses(2, prefix="small")
    (slow,) = horses.courses(1, size=4 * 1024 * 1024, prefix="big")
    worker = horses.start()
    horses.run([first])
    kept = horses.horse(worker)
    assert not marker.exists(), horses.log()

    horses.svc.enqueue(slow)
    wait_for(marker.exists, timeout=30, interval=0.05, what=lambda: f"the crash point\n{horses.log()}")
    horses.wait_completed([slow])
    horses.assert_retried_in_a_fresh_horse(worker, kept, slow, after)
    horses.assert_completed_once([first])
    assert "Work-horse terminated unexpectedly" in horses.log()


def test_warm_stop_of_a_worker_whose_horse_is_idle_leaves_no_process(horses: HorseWorld) -> None:
    worker = horses.start()
    (task,) = horses.courses(1)
    horses.run([task])
    horses.assert_completed_once([task])  # its webhooks delivered too: the worker waits for work
    horse = horses.horse(worker)

    horses.stop_warmly(worker, horse)
    assert worker.name not in live_workers(horses.svc.redis)


def test_warm_stop_while_the_kept_horse_downloads_hands_the_task_back(horses: HorseWorld) -> None:
    """SIGTERM while the kept horse runs its second download: the task goes back to the queue with its
    attempt given back and its bytes kept, the worker exits cleanly with its horse gone, and the next
    worker finishes the task, resuming the file."""
    first, slow = horses.courses(2, size=2_000_000)
    worker = horses.start()
    horses.run([first])
    horse = horses.horse(worker)
    horses.svc.origin.throttle = 200_000  # bytes/s: ten seconds for the file
    horses.svc.enqueue(slow)
    wait_for(
        lambda: horses.svc.partial_bytes(slow) > 0, timeout=30, interval=0.05, what=lambda: f"bytes\n{horses.log()}"
    )

    horses.stop_warmly(worker, horse)
    assert attempt_pids(horses.log(), slow) == [horse]
    row = horses.svc.row(slow)
    assert row.status == PROCESSING and row.attempts == 0, row
    assert horses.svc.queued() == [job_id_for(slow)]

    horses.svc.origin.throttle = None
    horses.start()
    horses.wait_completed([slow])
    horses.assert_completed_once([first, slow])
    assert len(horses.file_requests(slow)) == 2, horses.file_requests(slow)


def test_horse_is_replaced_after_horse_max_jobs_downloads(horses: HorseWorld) -> None:
    horses.svc.reconfigure(HORSE_MAX_JOBS="2")
    tasks = horses.courses(5)
    worker = horses.start()
    horses.run(tasks)
    horses.assert_completed_once(tasks)

    log = horses.log()
    runners = [attempt_pids(log, task_id) for task_id in tasks]
    assert all(len(pids) == 1 for pids in runners), runners
    a, b, c = runners[0][0], runners[2][0], runners[4][0]
    assert [pids[0] for pids in runners] == [a, a, b, b, c], runners
    assert len({a, b, c, worker.pid}) == 4, runners
    assert "terminated unexpectedly" not in log


def test_a_download_that_failed_gets_a_fresh_horse(horses: HorseWorld) -> None:
    """An attempt that raises (the origin answers 500 once, a transient error) ends its horse; RQ's retry
    and the downloads after it run in a fresh one, which is kept."""
    first, failing, after = horses.courses(3)
    worker = horses.start()
    horses.run([first])
    kept = horses.horse(worker)
    horses.svc.origin.fail_next(f"/files/course-{2}/lecture.mp4", 1)
    horses.run([failing])
    horses.assert_retried_in_a_fresh_horse(worker, kept, failing, after, refused=1)
    horses.assert_completed_once([first])
    assert "terminated unexpectedly" not in horses.log()


def test_hung_webhook_receiver_is_cut_off_by_the_delivery_timeout(
    horses: HorseWorld, trickling_receiver: TricklingReceiver
) -> None:
    """A receiver that answers one byte at a time and never finishes (no read timeout fires) holds a
    delivery only until its job timeout: the worker, which runs the delivery itself, cuts it off, RQ
    retries it, and the worker and its kept horse go on."""
    horses.svc.reconfigure(WEBHOOK_URL=trickling_receiver.url)
    first, after = horses.courses(2)
    worker = horses.start()
    horses.run([first])
    horse = horses.horse(worker)

    delivery = horses.enqueue_delivery("msg_hung", job_timeout=2)
    wait_for(
        lambda: delivery.get_status(refresh=True) == JobStatus.FINISHED,
        timeout=60,
        interval=0.1,
        what=lambda: f"the delivery to be retried and delivered\n{worker.log()}",
    )
    assert trickling_receiver.closed_by_client == ["msg_hung"], "the hung connection was not closed by the worker"
    assert "JobTimeoutException: Task exceeded maximum timeout value (2 seconds)" in worker.log(), worker.log()

    horses.run([after])
    assert worker.process.poll() is None, worker.log()
    assert attempt_pids(horses.log(), after) == [horse]
    assert delivery_pids(horses.log())["msg_hung"] == worker.pid


# -- the worker's wait for its kept horse -----------------------------------------------------------


def test_an_interruption_anywhere_in_the_wait_never_loses_the_horse_s_report(redis_conn: Redis) -> None:
    """RQ's monitor interrupts wait_for_horse (SIGALRM, every job_monitoring_interval) to heartbeat, then
    calls it again. Wherever in the wait the interruption lands, the next call must still see that the
    horse has ended its job: a report taken off the pipe and then lost to the interruption would leave
    the worker waiting for ever on a horse that waits for its next job."""
    code = DownloadWorker.wait_for_horse.__code__
    for position in itertools.count(1):
        worker = DownloadWorker([Queue("downloads", connection=redis_conn)], connection=redis_conn)
        pid, orders, ready = standing_horse()
        worker._kept = _KeptHorse(pid, orders=orders, ready=ready)
        worker._horse_pid = pid
        try:
            if not interrupted_at_line(code, position, worker.wait_for_horse):
                break  # the wait ended before this line: every line has had its interruption
            with deadline(5, f"the wait for a horse that has reported, interrupted at its line {position}"):
                assert worker.wait_for_horse()[:2] == (pid, os.EX_OK)
        finally:
            worker._let_horse_go()
    assert position > 2, "the wait was never interrupted"
