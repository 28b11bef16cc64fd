"""ORIGIN_CONCURRENCY and FETCH_RATE_LIMIT with real workers (`udemy-dl worker` processes), Redis and
MariaDB, against the dev origin slowed down: what the origin sees is the proof."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable

import pytest
from redis import Redis

from tests.support.http_servers import make_tasks
from tests.support.origin_load import most_courses_at_once, steady_rate
from tests.support.processes import LoggedProcess
from tests.support.rq_state import download_job, live_workers, queued_job_ids
from tests.support.service import Service
from tests.support.waiting import wait_for
from udemy_dl.job import process_download
from udemy_dl.limits import slots_key
from udemy_dl.metrics import COUNTERS_KEY
from udemy_dl.producer import CANCELLED
from udemy_dl.queues import job_id_for
from udemy_dl.store import COMPLETED, FAILED, PROCESSING

StartWorker = Callable[..., LoggedProcess]


def start_workers(svc: Service, start_worker: StartWorker, count: int) -> list[LoggedProcess]:
    """*count* real workers, registered and waiting for work."""
    workers = [start_worker() for _ in range(count)]
    wait_for(lambda: len(live_workers(svc.redis)) == count, timeout=60, what=lambda: logs(workers))
    return workers


def logs(workers: list[LoggedProcess]) -> str:
    return "\n".join(f"== {worker.name}\n{worker.log(3000)}" for worker in workers)


def all_completed(svc: Service, task_ids: list[int]) -> bool:
    return all(svc.row(task_id).status == COMPLETED for task_id in task_ids)


def job_status(connection: Redis, task_id: int) -> str | None:
    job = download_job(connection, task_id)
    return None if job is None else job.get_status(refresh=True)


def handed_back_for_origin(connection: Redis) -> int:
    raw = connection.hget(COUNTERS_KEY, "origin_busy")
    return int(raw) if isinstance(raw, bytes) else 0


def test_five_workers_never_download_more_than_the_cap_from_one_origin(svc: Service, start_worker: StartWorker) -> None:
    """ORIGIN_CONCURRENCY=2, five workers, seven tasks of 3 s each: the origin never sends files of more
    than two tasks at once, yet does send two at once, and every task completes on its first attempt
    (waiting for a slot, or being handed back for one, counts none)."""
    svc.reconfigure(ORIGIN_CONCURRENCY="2")
    svc.origin.throttle = 1_000_000  # bytes/s per response: each task's 3 MB take 3 s
    workers = start_workers(svc, start_worker, 5)
    tasks = make_tasks(svc.origin, svc.store, 7, 3_000_000)
    ids = [task.id for task in tasks]
    assert svc.producer().confirm_payment(ids).enqueued == ids
    wait_for(lambda: all_completed(svc, ids), timeout=120, interval=0.2, what=lambda: logs(workers))
    assert most_courses_at_once(svc.origin) == 2
    assert [svc.row(task_id).attempts for task_id in ids] == [1] * len(ids)
    assert svc.redis.zcard(slots_key("127.0.0.1")) == 0, "every slot was released"


def test_a_task_whose_origin_is_full_goes_back_to_the_queue_without_an_attempt(
    svc: Service, start_worker: StartWorker
) -> None:
    """Both slots held elsewhere: the run waits a few seconds, then hands the task back (scheduled again
    in a few seconds) with no attempt counted and nothing asked of the origin; once a slot frees,
    the task completes on its first attempt."""
    svc.reconfigure(ORIGIN_CONCURRENCY="2")
    far = (time.time() + 600) * 1000
    busy = {f"another-server|{n}|download-x{n}|0123456789abcdef": far for n in (1, 2)}
    svc.redis.zadd(slots_key("127.0.0.1"), busy)  # two runs on another server hold the origin
    task_id = svc.confirm(svc.origin.add_course("patient", {"a.bin": 100_000}))
    workers = start_workers(svc, start_worker, 1)
    wait_for(lambda: handed_back_for_origin(svc.redis) >= 1, timeout=60, interval=0.1, what=lambda: logs(workers))
    wait_for(lambda: job_status(svc.redis, task_id) == "scheduled", timeout=10, what="the task's job to be scheduled")
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 0)
    assert svc.origin.requests.paths() == []
    svc.redis.zrem(slots_key("127.0.0.1"), *busy)  # one of them ends
    wait_for(lambda: all_completed(svc, [task_id]), timeout=60, interval=0.2, what=lambda: logs(workers))
    assert svc.row(task_id).attempts == 1
    assert "no attempt counted" in workers[0].log()


@pytest.mark.serial  # a rate measured at the origin: `make test` runs it alone, not beside other suites
def test_the_downloads_of_one_machine_together_keep_to_the_rate_limit(svc: Service, start_worker: StartWorker) -> None:
    """FETCH_RATE_LIMIT=2M and three workers downloading at once (4 MB each, about 6 s in all): the
    rate the origin sends at while all three run, once their socket buffers are full, is within
    10 % of 2 MB/s."""
    svc.reconfigure(FETCH_RATE_LIMIT="2M")
    svc.origin.send_buffer = 64 * 1024
    svc.origin.block_size = 64 * 1024  # finer-grained times for the measurement
    workers = start_workers(svc, start_worker, 3)
    tasks = make_tasks(svc.origin, svc.store, 3, 4_000_000)
    ids = [task.id for task in tasks]
    assert svc.producer().confirm_payment(ids).enqueued == ids
    wait_for(lambda: all_completed(svc, ids), timeout=60, interval=0.2, what=lambda: logs(workers))
    assert most_courses_at_once(svc.origin) == 3, "the downloads overlapped"
    rate, seconds = steady_rate(svc.origin, skip=1.0)
    print(f"FETCH_RATE_LIMIT=2M: the origin sent {rate / 1e6:.3f} MB/s over {seconds:.2f} s")
    assert 1_800_000 <= rate <= 2_200_000, f"{rate / 1e6:.3f} MB/s over {seconds:.2f} s"


def test_a_worker_stopping_while_its_run_waits_for_a_slot_hands_the_task_back_at_once(
    svc: Service, start_worker: StartWorker
) -> None:
    """SIGTERM while the run waits for a slot: the task goes back to the front of its queue, not
    scheduled for later, and no attempt is used."""
    svc.reconfigure(ORIGIN_CONCURRENCY="1")
    svc.redis.zadd(slots_key("127.0.0.1"), {"another-server|1|download-x|0123456789abcdef": (time.time() + 600) * 1000})
    task_id = svc.confirm(svc.origin.add_course("stopped", {"a.bin": 100_000}))
    worker = start_workers(svc, start_worker, 1)[0]
    wait_for(lambda: "the most allowed; waiting" in worker.log(), timeout=30, what=worker.log)
    worker.stop()
    assert worker.process.returncode is not None
    assert queued_job_ids(svc.redis) == [job_id_for(task_id)], worker.log()
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (PROCESSING, 0)
    assert "no attempt counted" in worker.log()


def test_a_fetch_command_task_waits_for_a_slot_at_its_url_s_host(svc: Service) -> None:
    """FETCH_COMMAND tasks count under the host of their course URL: with that host's only slot held
    elsewhere, the command starts only once the slot has expired, and the slot is given back after."""
    script = (
        "import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
        "(d / 'started.txt').write_text(repr(time.time()))"
    )
    svc.reconfigure(
        FETCH_COMMAND=shlex.join([sys.executable, "-c", script, "{dest}", "{url}"]),
        ALLOWED_HOSTS="cdn.example",
        ORIGIN_CONCURRENCY="1",
    )
    held_until = (time.time() + 1.5) * 1000
    svc.redis.zadd(slots_key("cdn.example"), {"another-server|1|download-x|0123456789abcdef": held_until})
    task_id = svc.paid_task("https://cdn.example:8443/courses/operator")
    result = process_download(svc.payload(task_id))  # called directly: it waits as long as it takes
    assert result["success"] is True, result
    started = float((svc.settings.download_dir / str(task_id) / "started.txt").read_text())
    assert started * 1000 >= held_until
    assert svc.redis.zcard(slots_key("cdn.example")) == 0
    assert svc.row(task_id).attempts == 1


def test_a_task_cancelled_while_its_run_waits_for_a_slot_is_settled_without_a_fetch(
    svc: Service, start_worker: StartWorker
) -> None:
    """A cancel reaches a run waiting for an origin slot: the wait ends, the task is `failed` as
    cancelled on no attempt, and nothing is asked of the origin."""
    svc.reconfigure(ORIGIN_CONCURRENCY="1")
    svc.redis.zadd(slots_key("127.0.0.1"), {"another-server|1|download-x|0123456789abcdef": (time.time() + 600) * 1000})
    task_id = svc.confirm(svc.origin.add_course("refunded", {"a.bin": 100_000}))
    worker = start_workers(svc, start_worker, 1)[0]
    wait_for(lambda: "the most allowed; waiting" in worker.log(), timeout=30, what=worker.log)
    result = svc.producer().cancel(task_id, "refund")
    assert result.outcome == CANCELLED, (result, worker.log())
    row = svc.row(task_id)
    assert (row.status, row.cancelled, row.attempts) == (FAILED, True, 0)
    assert svc.origin.requests.paths() == []
