"""Part (d): a flash sale. Many one-file orders are confirmed at once, with webhooks on, and 5 workers
and the reconciler (as start_workers.sh deploys them) drain them. The baseline is plain `rq worker`
x5 running one no-op job per order, on the same Redis.

Ours is done when the payment service holds every order's final event: the clock runs from the
confirm_payment call to the arrival of the last download.completed at the webhook receiver. Then
the bench checks that every order completed once, with one final event, and that the outbox is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from standardwebhooks import Webhook, WebhookVerificationError

from dev.devservers import write_sample_file
from udemy_dl.producer import Producer
from udemy_dl.store import COMPLETED, PENDING
from udemy_dl.webhooks import COMPLETED as EVENT_COMPLETED
from udemy_dl.webhooks import FAILED as EVENT_FAILED
from udemy_dl.webhooks import STARTED as EVENT_STARTED
from udemy_dl.webhooks import generate_secret

from .harness import Bench
from .queue_path import WORKERS, drain_rate, plain_rq_workers
from .report import Part, Row
from .support import BenchError, Child, say, wait_until

TARGET_RATIO = 0.5
FILE_BYTES = 1024
EMAIL = "sale@example.com"


@dataclass
class Delivery:
    webhook_id: str
    event_type: str
    task_id: int
    arrived: float
    """Unix time the receiver had it."""


@dataclass
class Receiver:
    """The payment service's webhook endpoint: verifies each signature, answers 204, notes the arrival.

    A minimal HTTP/1.1 server on asyncio, in a thread of the bench: it shares the machine with the
    workers it measures, so it should cost them as little as it can (http.server's thread and header
    parsing per delivery cost several times more).
    """

    secret: str
    deliveries: list[Delivery] = field(default_factory=list)
    final_ids: set[str] = field(default_factory=set)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/downloads"

    def start(self) -> Receiver:
        verifier = Webhook(self.secret)
        ready = threading.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        if name:
                            headers[name.strip().lower()] = value.strip()
                    body = await reader.readexactly(int(headers.get("content-length") or 0))
                    writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % self._take(verifier, headers, body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client closed the connection
            finally:
                writer.close()

        async def serve() -> None:
            server = await asyncio.start_server(answer, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, name="sale-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise BenchError("the webhook receiver did not start")
        return self

    def _take(self, verifier: Webhook, headers: dict[str, str], body: bytes) -> int:
        """Record one delivery; its HTTP status."""
        try:
            event = verifier.verify(body, headers)
        except WebhookVerificationError:
            with self.lock:
                self.refused += 1
            return 401
        delivery = Delivery(
            headers.get("webhook-id", ""),
            str(event.get("type")),
            int(event.get("data", {}).get("taskId", 0)),
            time.time(),
        )
        with self.lock:
            self.deliveries.append(delivery)
            if delivery.event_type in (EVENT_COMPLETED, EVENT_FAILED):
                self.final_ids.add(delivery.webhook_id)
        return 204

    def stop(self) -> None:
        loop = self._loop
        if loop is not None:
            for task in asyncio.all_tasks(loop):
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def seen(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def finals(self) -> int:
        """Distinct final events received so far."""
        with self.lock:
            return len(self.final_ids)


@dataclass
class Verdict:
    """What the sale left behind, order by order."""

    completed_once: int
    final_once: int
    failed_events: int
    repeated_deliveries: int
    started_events: int
    pending_events: int
    problems: list[str]


def _baseline(bench: Bench, orders: int) -> float:
    """Plain rq worker x5, one no-op job per order, all enqueued in a loop: orders per second."""
    with plain_rq_workers(bench, "bench-sale-rq") as (queue, workers):
        say(f"(d) plain rq worker x{WORKERS}: {orders} no-op jobs enqueued at once")
        return drain_rate(bench, [queue.enqueue("bench.noop.noop") for _ in range(orders)], workers)


def _verdict(bench: Bench, receiver: Receiver, task_ids: list[int]) -> Verdict:
    rows = bench.store.get_many(task_ids)
    problems = []
    completed_once = sum(1 for row in rows if row.status == COMPLETED and row.attempts == 1)
    if completed_once != len(task_ids):
        statuses = Counter((row.status, row.attempts) for row in rows)
        problems.append(f"orders by (status, attempts): {dict(statuses)}")
    deliveries = receiver.seen()
    finals = {(d.webhook_id, d.task_id) for d in deliveries if d.event_type == EVENT_COMPLETED}
    per_order = Counter(task_id for _, task_id in finals)
    final_once = sum(1 for task_id in task_ids if per_order[task_id] == 1)
    if final_once != len(task_ids):
        problems.append(f"{len(task_ids) - final_once} order(s) without exactly one download.completed")
    failed = sum(1 for d in deliveries if d.event_type == EVENT_FAILED)
    repeated = len(deliveries) - len({d.webhook_id for d in deliveries})
    started = len({d.webhook_id for d in deliveries if d.event_type == EVENT_STARTED})
    pending = bench.store.count_pending_events()
    if pending:
        problems.append(f"{pending} final event(s) still in the outbox")
    if receiver.refused:
        problems.append(f"{receiver.refused} delivery(ies) with a bad signature")
    return Verdict(completed_once, final_once, failed, repeated, started, pending, problems)


def _ours(bench: Bench, orders: int, receiver: Receiver) -> tuple[float, float, Verdict, int, list[Child]]:
    """The sale through the real path. Returns (orders per second, seconds to drain, verdict, SQL
    statements of the workers and the reconciler, the processes)."""
    sha = write_sample_file(bench.data / "files" / "sale" / "lesson.bin", FILE_BYTES, "bench-sale/lesson.bin")
    manifest = {
        "title": "Flash sale course",
        "files": [{"path": "lesson.bin", "url": "/files/sale/lesson.bin", "size": FILE_BYTES, "sha256": sha}],
    }
    course_url = bench.origin.publish_manifest("sale", manifest)
    hooks = {"WEBHOOK_URL": receiver.url, "API_SECRET_KEY": receiver.secret}
    workers = [bench.start_worker(f"bench-sale-{n}", **hooks) for n in range(1, WORKERS + 1)]
    bench.wait_registered(workers)
    reconciler = bench.start_reconciler("bench-sale-reconciler", **hooks)
    processes = [*workers, reconciler]
    say(f"(d) ours x{WORKERS} and the reconciler: {orders} one-file orders confirmed at once, webhooks on")
    task_ids = [bench.store.insert_task(EMAIL, course_url, status=PENDING) for _ in range(orders)]  # the shop's
    # The payment service's side, on the bench's own database connection (not the workers' user).
    shop = Producer(bench.settings(), connection=bench.connection, store=bench.store)
    before = bench.db.settled_count()
    started = time.time()
    confirmed = shop.confirm_payment(task_ids)
    if len(confirmed.enqueued) != orders:
        raise BenchError(f"confirm_payment enqueued {len(confirmed.enqueued)} of {orders}: {confirmed.as_dict()}")

    def drained() -> bool:
        if receiver.finals() >= orders:
            return True
        if any(not child.alive() for child in processes):
            dead = next(child for child in processes if not child.alive())
            raise BenchError(f"{dead.name} exited during the sale:\n{dead.tail()}")
        return False

    wait_until(
        drained,
        timeout=600,
        what=f"{orders} final events at the receiver",
        interval=0.02,
        on_timeout=lambda: "\n".join(child.tail() for child in processes),
    )
    last = max(d.arrived for d in receiver.seen() if d.event_type in (EVENT_COMPLETED, EVENT_FAILED))
    seconds = last - started
    # The acknowledgements are recorded just after each delivery: let the last ones land.
    wait_until(
        lambda: bench.store.count_pending_events() == 0 or None,
        timeout=30,
        what="the outbox to empty",
        interval=0.1,
    )
    sql = bench.db.settled_count() - before
    verdict = _verdict(bench, receiver, task_ids)
    return orders / seconds, seconds, verdict, sql.statements, processes


def run_flash_sale(bench: Bench) -> Part:
    orders = bench.profile.flash_orders
    part = Part(
        "d",
        f"flash sale: {orders} one-file orders confirmed at once, webhooks on, {WORKERS} workers and the reconciler",
        f"plain `rq worker` x{WORKERS} running one no-op job per order (bench.noop.noop) on the same Redis",
    )
    base = _baseline(bench, orders)
    receiver = Receiver(generate_secret()).start()
    try:
        rate, seconds, verdict, statements, processes = _ours(bench, orders, receiver)
        deliveries = len(receiver.seen())
    finally:
        receiver.stop()
    for child in processes:
        bench.children.stop(child)
    ok = not verdict.problems and verdict.failed_events == 0
    part.rows += [
        Row(
            "orders drained per second",
            rate,
            base,
            "orders/s",
            f">= {TARGET_RATIO}x plain RQ",
            rate >= TARGET_RATIO * base,
            digits=1,
        ),
        Row("time to drain the sale", seconds, orders / base, "s", digits=2),
        Row(
            "every order completed once, with one final event",
            f"{min(verdict.completed_once, verdict.final_once)} of {orders}",
            None,
            target=f"{orders} of {orders}",
            met=ok,
        ),
        Row("  orders completed at their first attempt", f"{verdict.completed_once} of {orders}", None),
        Row("  orders with exactly one download.completed", f"{verdict.final_once} of {orders}", None),
        Row("  download.failed events", verdict.failed_events, None, digits=0),
        Row("  the same event delivered twice", verdict.repeated_deliveries, None, digits=0),
        Row("  final events left in the outbox", verdict.pending_events, None, digits=0),
        Row("webhook deliveries per order (started, completed)", deliveries / orders, None),
        Row("SQL statements per order, workers and reconciler", statements / orders, None),
    ]
    part.notes += [
        f"ours: {orders} rows inserted as `pending` (the shop's, untimed), then one Producer.confirm_payment call "
        "(one UPDATE to `processing`, then one deduplicated enqueue per order); the clock runs from that call to the "
        "arrival of the last download.completed at the webhook receiver (a small asyncio HTTP server in the bench "
        "process that verifies each signature); each order is a course of one 1 KiB file with its sha256, served by "
        f"{bench.origin.kind}",
        f"{WORKERS} `udemy-dl worker` and one `udemy-dl reconciler`, as start_workers.sh runs them; each order's "
        "download runs in a work horse kept from one download to the next, and its two webhook deliveries run "
        "in the worker process itself",
        f"baseline: {orders} no-op jobs enqueued in a loop with Queue.enqueue; count / (last ended_at - first "
        "enqueued_at)",
        "checked after the sale: every row `completed` with attempts = 1, exactly one download.completed webhook-id "
        "per order at the receiver, no download.failed, no signature refused, and no final event left in the "
        "outbox (every delivery acknowledged in its row)",
        "SQL = MariaDB USER_STATISTICS of the workers' own user during the sale (the reconciler connects as the "
        "same user; the bench's inserts, confirm_payment and polls run as another)",
    ]
    if verdict.problems:
        part.notes.append("PROBLEMS: " + "; ".join(verdict.problems))
    part.raw = {
        "orders": orders,
        "ours_orders_per_s": rate,
        "ours_seconds": seconds,
        "baseline_orders_per_s": base,
        "verdict": verdict.__dict__,
        "deliveries": deliveries,
        "sql_statements": statements,
    }
    return part
