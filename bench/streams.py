"""Part (e): the web front under load. One `udemy-dl serve` process (uvicorn, one worker) holds 1,000 open
Server-Sent Events streams of running tasks while a publisher appends progress to each task's Redis
Stream as the workers do; the bench measures how long each event takes from its publication to the
client, the serve process's memory, and the Redis connections it holds. Then the confirm path:
signed `POST /orders/confirm` requests per second, beside the intake it replaced (the standard library's
ThreadingHTTPServer: the package as of OLD_INTAKE_COMMIT, unpacked from git and measured in turn with
ours, and the figure recorded for it on a quiet machine) and beside a bare Starlette endpoint under the
same uvicorn, measured in the same run.

Run on its own: `python -m bench --parts e`. The intake's recorded figure comes from
`python -m bench.streams --confirm-only --serve-path CHECKOUT` run against a checkout that still has it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from redis import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from udemy_dl import status_stream
from udemy_dl.store import PENDING, PROCESSING, open_store
from udemy_dl.tokens import generate_status_secret, status_token
from udemy_dl.webhooks import generate_secret, sign_headers

from .harness import Bench
from .report import Part, Row
from .services import BenchMariaDB, BenchRedis
from .support import (
    BIN,
    REPO,
    BenchError,
    Child,
    Children,
    clean_env,
    descendants,
    free_port,
    percentile,
    port_open,
    say,
    vm_hwm_kb,
    wait_until,
)

CONFIRM = "/orders/confirm"
CONFIRM_CONCURRENCY = 16
"""Connections the confirm load keeps open (each one request at a time, keep-alive)."""
CONFIRM_REQUESTS = 3000
CONFIRM_WARMUP = 200
CONFIRM_ROUNDS = 2
"""Rounds of the confirm path, serve and the old intake in turn (the median of each is shown)."""
OLD_INTAKE_COMMIT = "da7786c"
"""The last commit whose `udemy-dl serve` is the standard library's ThreadingHTTPServer intake."""

RECORDED_INTAKE_RPS = 237.0
"""Confirm requests per second of the ThreadingHTTPServer intake, recorded in docs/BENCHMARKS.md (its median)."""


# -- a minimal HTTP/1.1 client on asyncio streams ------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One HTTP/1.1 answer with a Content-Length (or none, for a bodiless answer)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length") or 0))
    return Reply(status, headers, body)


def request_bytes(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the confirm load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def signed_confirms(secret: str, task_ids: Sequence[int]) -> list[bytes]:
    """One signed `POST /orders/confirm` per task (signed before the clock starts: the load measures the server)."""
    out = []
    for task_id in task_ids:
        body = json.dumps({"taskIds": [task_id]})
        headers = sign_headers(secret, f"msg_bench_{uuid.uuid4().hex}", f"POST {CONFIRM}\n{body}")
        out.append(request_bytes("POST", CONFIRM, headers, body.encode()))
    return out


async def _load(port: int, requests: list[bytes], concurrency: int) -> LoadResult:
    """Send *requests* over *concurrency* keep-alive connections, each one request at a time."""
    pending = iter(requests)
    statuses: Counter[int] = Counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for raw in pending:
                writer.write(raw)
                reply = await read_reply(reader)
                statuses[reply.status] += 1
                if reply.headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return LoadResult(len(requests), time.perf_counter() - started, statuses)


def run_load(port: int, requests: list[bytes], concurrency: int = CONFIRM_CONCURRENCY) -> LoadResult:
    return asyncio.run(_load(port, requests, concurrency))


def plain_gets(target: str, count: int) -> list[bytes]:
    return [request_bytes("GET", target, {})] * count


# -- the serve process --------------------------------------------------------------------------------


def start_serve(
    children: Children, name: str, workdir: Path, env: dict[str, str], extra_args: Sequence[str] = ()
) -> tuple[Child, int]:
    """`udemy-dl serve` on a free port; returns once it accepts connections."""
    port = free_port()
    child = children.start(
        name,
        [str(BIN / "udemy-dl"), "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args],
        workdir / "logs" / f"{name}.log",
        env=clean_env(**env),
        cwd=workdir,
    )

    def up() -> bool:
        if not child.alive():
            raise BenchError(f"{name} exited ({child.popen.returncode}):\n{child.tail()}")
        return port_open(port)

    wait_until(up, timeout=30, what=f"{name} to listen on port {port}", interval=0.05, on_timeout=child.tail)
    return child, port


def measure_confirm(
    children: Children, workdir: Path, env: dict[str, str], store_url: str, requests: int, name: str = "serve-confirm"
) -> LoadResult:
    """Confirm *requests* distinct pending tasks (one per request) against a fresh `udemy-dl serve`."""
    secret = env["API_SECRET_KEY"]
    store = open_store(store_url)
    try:
        ids = [store.insert_task("bench@example.com", "https://cdn.example/c", PENDING) for _ in range(requests)]
        warm = [store.insert_task("bench@example.com", "https://cdn.example/c", PENDING) for _ in range(CONFIRM_WARMUP)]
    finally:
        store.close()
    child, port = start_serve(children, name, workdir, env)
    try:
        run_load(port, signed_confirms(secret, warm))
        result = run_load(port, signed_confirms(secret, ids))
    finally:
        children.stop(child)
    if set(result.statuses) != {202}:
        raise BenchError(f"confirm answers were not all 202: {dict(result.statuses)}\n{child.tail()}")
    return result


# -- 1,000 open streams ---------------------------------------------------------------------------------

STREAMS = 1000
ROUNDS = 10
"""Progress entries per task, one a second for every task (as a worker's reporter publishes), then the final one."""
ROUND_SECONDS = 1.0
OPEN_BATCH = 100
"""Streams opened at once while connecting (so the server's listen backlog is not the thing measured)."""
COURSE_BYTES = 100_000_000
COURSE_FILES = 10
FINAL = ("completed", "failed")


@dataclass
class Received:
    task_id: int
    status: str
    progress: int
    at: float
    """perf_counter() when the client had parsed the event."""


@dataclass
class StreamsRun:
    received: list[Received] = field(default_factory=list)
    opened: int = 0
    snapshots: int = 0
    closed_by_server: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    published: dict[tuple[int, str, int], float] = field(default_factory=dict)
    """(task, status, progress) -> perf_counter() just before the XADD."""


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body of a streamed answer: chunked (HTTP/1.1) or until the server closes."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    while data := await reader.read(65536):
        yield data


async def sse_events(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """Server-Sent Events as the browser parses them: fields of each event (comments dropped, data joined)."""
    buffer = b""
    async for chunk in _chunks(reader, headers):
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            event: dict[str, str] = {}
            for line in block.decode("utf-8").split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                event[name] = f"{event[name]}\n{value}" if name == "data" and name in event else value
            if "data" in event:
                yield event


async def _watch(port: int, task_id: int, token: str, run: StreamsRun, opened: asyncio.Semaphore) -> None:
    async with opened:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes("GET", f"/tasks/{task_id}/events?token={token}", {"Accept": "text/event-stream"}))
        head = await reader.readuntil(b"\r\n\r\n")
    try:
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
            if name
        }
        if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
            run.refused[f"{status} {headers.get('content-type')}"] += 1
            return
        run.opened += 1
        final = False
        count = 0
        async for event in sse_events(reader, headers):
            data = json.loads(event["data"])
            if final:
                raise BenchError(f"task {task_id}: an event after the final one: {data}")
            run.received.append(Received(task_id, data["status"], int(data["progress"]), time.perf_counter()))
            run.snapshots += count == 0
            count += 1
            final = data["status"] in FINAL
        run.closed_by_server += final  # the body ended after the final event: the server closed the stream
    finally:
        writer.close()


def _publish(redis_url: str, task_ids: list[int], run: StreamsRun, rounds: int, round_seconds: float) -> None:
    """The workers' side: each task's progress once per round, spread evenly over the round, then its final entry.
    Each entry goes in with its own XADD, as a worker's reporter sends it (status_stream.publish_progress)."""
    connection = Redis.from_url(redis_url)
    per_file = COURSE_BYTES // COURSE_FILES
    try:
        for number in range(1, rounds + 2):
            started = time.perf_counter()
            for index, task_id in enumerate(task_ids):
                ahead = started + round_seconds * index / len(task_ids) - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the publisher to one entry per task per second
                if number > rounds:
                    run.published[(task_id, "completed", 100)] = time.perf_counter()
                    status_stream.publish_completed(connection, task_id, COURSE_BYTES, COURSE_FILES)
                    continue
                progress = number * 100 // (rounds + 1)
                done = COURSE_BYTES * progress // 100
                run.published[(task_id, "processing", progress)] = time.perf_counter()
                status_stream.publish_progress(
                    connection, task_id, progress, done, COURSE_BYTES, done // per_file, COURSE_FILES
                )
    finally:
        connection.close()


def serve_family(pid: int) -> list[int]:
    """The serve process and its children (uvicorn's workers, when --workers asks for several)."""
    return [pid, *descendants(pid)]


def serve_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the serve process and its children, added up."""
    return sum(vm_hwm_kb(member) or 0 for member in serve_family(pid)) / 1024


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    found.add(target[8:-1])
    return found


def _tcp_peers(port: int) -> dict[str, str]:
    """Established TCP connections to *port* on this host (/proc/net/tcp): socket inode -> local `ip:port`."""
    peers = {}
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                address, local_port = local.split(":")
                ip = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
                peers[inode] = f"{ip}:{int(local_port, 16)}"
    return peers


def serve_redis_clients(pid: int, redis: Redis, redis_port: int) -> tuple[int, int]:
    """Redis connections the serve process holds: its own TCP connections to Redis's port, and how many of
    those CLIENT LIST shows (the two agree unless a connection is half open)."""
    inodes = set().union(*(_socket_inodes(member) for member in serve_family(pid)))
    local = {address for inode, address in _tcp_peers(redis_port).items() if inode in inodes}
    clients = cast(list[dict[str, Any]], redis.client_list())
    return len(local), sum(1 for client in clients if client.get("addr") in local)


class Sampler:
    """The serve process's RSS and Redis connections, sampled in a thread while the streams are open."""

    def __init__(self, pid: int, redis_url: str, interval: float = 0.25) -> None:
        self.pid = pid
        self.redis = Redis.from_url(redis_url)
        self.redis_port = int(self.redis.connection_pool.connection_kwargs.get("port", 6379))
        self.interval = interval
        self.rss_mb: list[float] = []
        self.sockets: list[int] = []
        self.clients: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.redis.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss_mb.append(serve_rss_mb(self.pid))
            sockets, clients = serve_redis_clients(self.pid, self.redis, self.redis_port)
            self.sockets.append(sockets)
            self.clients.append(clients)


async def _streams(
    port: int, tokens: dict[int, str], run: StreamsRun, redis_url: str, rounds: int, round_seconds: float
) -> None:
    opened = asyncio.Semaphore(OPEN_BATCH)
    watchers = [asyncio.create_task(_watch(port, task_id, token, run, opened)) for task_id, token in tokens.items()]
    deadline = time.monotonic() + 120
    while run.snapshots + sum(run.refused.values()) < len(tokens):
        if time.monotonic() > deadline:
            raise BenchError(f"only {run.snapshots} of {len(tokens)} streams got their snapshot within 120 s")
        await asyncio.sleep(0.05)  # polling the watchers' counts
    if run.refused:
        raise BenchError(f"streams refused: {dict(run.refused)}")
    say(f"{run.opened} streams open, each with its snapshot; publishing {rounds} rounds of progress, then the end")
    await asyncio.to_thread(_publish, redis_url, list(tokens), run, rounds, round_seconds)
    done, pending = await asyncio.wait(watchers, timeout=60)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise BenchError(f"a stream failed: {task.exception()!r}")
    if pending:
        raise BenchError(f"{len(pending)} streams had not ended 60 s after their final entry")


def latencies_ms(run: StreamsRun) -> list[float]:
    """Publish -> received, in ms, for every published entry a client got as an event of its own."""
    found = []
    for item in run.received:
        sent = run.published.get((item.task_id, item.status, item.progress))
        if sent is not None and item.at >= sent:
            found.append((item.at - sent) * 1000)
    return found


@dataclass
class StreamsResult:
    run: StreamsRun
    latencies: list[float]
    rss_mb: float
    redis_sockets: int
    redis_clients: int
    seconds: float


def measure_streams(
    children: Children,
    workdir: Path,
    env: dict[str, str],
    store_url: str,
    redis_url: str,
    streams: int = STREAMS,
    rounds: int = ROUNDS,
    round_seconds: float = ROUND_SECONDS,
) -> StreamsResult:
    """*streams* running tasks, each watched by one SSE client, while each gets *rounds* progress entries."""
    store = open_store(store_url)
    try:
        ids = [store.insert_task("bench@example.com", "https://cdn.example/c", PROCESSING) for _ in range(streams)]
    finally:
        store.close()
    secret = env["STATUS_TOKEN_SECRET"]
    tokens = {task_id: status_token(task_id, 3600, secret=secret) for task_id in ids}
    _raise_open_files(4 * streams + 256)
    child, port = start_serve(children, "serve-streams", workdir, env)
    run = StreamsRun()
    started = time.perf_counter()
    try:
        with Sampler(child.pid, redis_url) as sampler:
            asyncio.run(_streams(port, tokens, run, redis_url, rounds, round_seconds))
    finally:
        children.stop(child)
    if not sampler.rss_mb:
        raise BenchError("the serve process was never sampled")
    return StreamsResult(
        run,
        latencies_ms(run),
        max(sampler.rss_mb),
        max(sampler.sockets),
        max(sampler.clients),
        time.perf_counter() - started,
    )


def _raise_open_files(needed: int) -> None:
    """The soft limit on open files up to its hard limit: the bench and serve each hold one socket per stream."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BenchError(f"open files limited to {hard}; {needed} are needed (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- the baseline: a bare Starlette endpoint under the same uvicorn ---------------------------------------


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


hello_app = Starlette(routes=[Route("/hello", _hello)])
"""`uvicorn bench.streams:hello_app`: what one uvicorn worker answers with no work behind the answer."""


def measure_hello(children: Children, workdir: Path, requests: int) -> LoadResult:
    port = free_port()
    child = children.start(
        "uvicorn-hello",
        [
            str(BIN / "uvicorn"),
            "bench.streams:hello_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
        ],
        workdir / "logs" / "uvicorn-hello.log",
        env=clean_env(PYTHONPATH=str(REPO)),
        cwd=workdir,
    )
    try:
        wait_until(lambda: port_open(port), timeout=30, what="uvicorn (hello) to listen", on_timeout=child.tail)
        run_load(port, plain_gets("/hello", CONFIRM_WARMUP))
        result = run_load(port, plain_gets("/hello", requests))
    finally:
        children.stop(child)
    if set(result.statuses) != {200}:
        raise BenchError(f"hello answers were not all 200: {dict(result.statuses)}")
    return result


# -- the part ---------------------------------------------------------------------------------------------------


def part_env(bench: Bench) -> dict[str, str]:
    return bench.service_env(API_SECRET_KEY=generate_secret(), STATUS_TOKEN_SECRET=generate_status_secret())


def old_intake_tree(workdir: Path) -> Path | None:
    """The package as it was with the ThreadingHTTPServer intake (OLD_INTAKE_COMMIT), unpacked from git for
    `udemy-dl serve` to import through PYTHONPATH; None when the checkout has no such history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_INTAKE_COMMIT, "udemy_dl"],
            capture_output=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"part (e): no same-run baseline for the old intake (git archive {OLD_INTAKE_COMMIT}: {exc})")
        return None
    target = workdir / "old-intake"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


@dataclass
class ConfirmFigures:
    ours: list[float]
    old: list[float]
    hello: LoadResult


def measure_confirm_paths(bench: Bench, env: dict[str, str], requests: int, rounds: int) -> ConfirmFigures:
    """The confirm path of this checkout's serve and of the old intake, alternating, then a bare Starlette GET."""
    workdir = bench.service_dir
    old_tree = old_intake_tree(bench.workdir)
    ours: list[float] = []
    old: list[float] = []
    for number in range(rounds):
        result = measure_confirm(bench.children, workdir, env, bench.db.admin_db_url, requests, f"serve-{number}")
        ours.append(result.rps)
        if old_tree is not None:
            old_env = {**env, "PYTHONPATH": str(old_tree)}
            previous = measure_confirm(
                bench.children, workdir, old_env, bench.db.admin_db_url, requests, f"old-intake-{number}"
            )
            old.append(previous.rps)
        say(
            f"part (e): confirm round {number + 1}: serve {ours[-1]:.0f}/s"
            + (f", old intake {old[-1]:.0f}/s" if old else "")
        )
    return ConfirmFigures(ours, old, measure_hello(bench.children, workdir, requests))


def run_streams(bench: Bench) -> Part:
    quick = bench.profile.name == "quick"
    streams = 200 if quick else STREAMS
    rounds = 3 if quick else ROUNDS
    requests = 500 if quick else CONFIRM_REQUESTS
    env = part_env(bench)
    bench.service_dir.mkdir(parents=True, exist_ok=True)
    say(f"part (e): {streams} open status streams on one serve process, {rounds} progress entries each")
    result = measure_streams(
        bench.children, bench.service_dir, env, bench.db.admin_db_url, bench.redis.url, streams, rounds
    )
    run = result.run
    published = sum(1 for key in run.published if key[1] == "processing")
    delivered = sum(
        1
        for item in run.received
        if item.status == "processing" and (item.task_id, item.status, item.progress) in run.published
    )
    say(f"part (e): {requests} signed confirms, serve and the old intake in turn, then a bare Starlette GET")
    confirm = measure_confirm_paths(bench, env, requests, 1 if quick else CONFIRM_ROUNDS)
    ours_rps = percentile(confirm.ours, 50)
    old_rps = percentile(confirm.old, 50) if confirm.old else None
    p50 = percentile(result.latencies, 50) if result.latencies else None
    p99 = percentile(result.latencies, 99) if result.latencies else None
    part = Part(
        "e",
        f"web front: {streams} open status streams on one serve process; the confirm path",
        f"the ThreadingHTTPServer intake (commit {OLD_INTAKE_COMMIT}) and a bare Starlette GET under the same "
        "uvicorn, same run; the intake's recorded figure",
    )
    part.rows = [
        Row("streams open, each with its snapshot", run.snapshots, None, "", f"{streams}", run.snapshots == streams, 0),
        Row("publish -> event in client, p50", p50, None, "ms", "", None, 1),
        Row("publish -> event in client, p99", p99, None, "ms", "<= 1000 ms", p99 is not None and p99 <= 1000, 1),
        Row("progress entries delivered as events", delivered, published, "", "all", delivered == published, 0),
        Row(
            "final event, then stream closed by serve",
            run.closed_by_server,
            None,
            "",
            f"{streams}",
            run.closed_by_server == streams,
            0,
        ),
        Row("serve RSS, peak", result.rss_mb, None, "MB", "< 300 MB", result.rss_mb < 300, 1),
        Row(
            "Redis connections held by serve, peak",
            result.redis_clients,
            None,
            "",
            "a handful (<= 8)",
            result.redis_clients <= 8,
            0,
        ),
        Row("POST /orders/confirm vs the old intake, same run", ours_rps, old_rps, "req/s", "", None, 0),
        Row("POST /orders/confirm vs the old intake, recorded", ours_rps, RECORDED_INTAKE_RPS, "req/s", "", None, 0),
        Row("POST /orders/confirm vs bare Starlette GET", ours_rps, confirm.hello.rps, "req/s", "", None, 0),
    ]
    part.notes = [
        f"one serve process (uvicorn, 1 worker); {streams} SSE clients on asyncio in the bench process; the publisher "
        f"appends each task's progress once a second (status_stream.publish_progress, one XADD each), spread evenly: "
        f"{streams} entries/s for {rounds} s, then each task's final entry",
        "latency: perf_counter() just before the XADD to the client's parse of the event's data; a progress entry the "
        "server folded into a later event counts as not delivered, not as a latency",
        f"Redis connections: the serve process's own TCP connections to Redis that CLIENT LIST also shows "
        f"(sockets seen: {result.redis_sockets})",
        f"confirm: {requests} signed requests over {CONFIRM_CONCURRENCY} keep-alive connections, each confirming a "
        f"distinct pending task, medians of {len(confirm.ours)} round(s), serve and the old intake in turn (the old "
        f"one is the package at {OLD_INTAKE_COMMIT} from git, run by the same udemy-dl script); the recorded figure "
        "is in docs/BENCHMARKS.md",
    ]
    part.raw = {
        "latencies_ms": [round(value, 2) for value in result.latencies],
        "streams_seconds": round(result.seconds, 1),
        "confirm_rps": [round(value, 1) for value in confirm.ours],
        "old_intake_rps": [round(value, 1) for value in confirm.old],
        "hello": {"requests": confirm.hello.requests, "seconds": round(confirm.hello.seconds, 3)},
        "hello_rps": round(confirm.hello.rps, 1),
        "recorded_intake_rps": RECORDED_INTAKE_RPS,
    }
    return part


# -- on its own: the confirm figure of any checkout's serve ------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    parser.add_argument("--confirm-only", action="store_true", help="measure the confirm path only")
    parser.add_argument("--serve-path", type=Path, default=None, help="PYTHONPATH for `udemy-dl serve` (a checkout)")
    parser.add_argument("--requests", type=int, default=CONFIRM_REQUESTS)
    parser.add_argument("--rounds", type=int, default=3, help="measure this many times; the median is shown")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--mysql", default=os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306"))
    args = parser.parse_args(argv)
    if not args.confirm_only:
        parser.error("on its own this module measures the confirm path only (--confirm-only); see python -m bench")
    workdir = Path(tempfile.mkdtemp(prefix="udemy_dl_bench_confirm."))
    redis, db, children = BenchRedis(args.redis), BenchMariaDB(args.mysql), Children()
    try:
        redis.setup()
        db.setup(workdir)
        env = {
            "REDIS_URL": redis.url,
            "DATABASE_URL": db.worker_url,
            "API_SECRET_KEY": generate_secret(),
            "LOG_DIR": str(workdir / "logs"),
        }
        if args.serve_path:
            env["PYTHONPATH"] = str(args.serve_path.resolve())
        figures = []
        for round_ in range(args.rounds):
            result = measure_confirm(children, workdir, env, db.admin_db_url, args.requests, f"serve-confirm-{round_}")
            say(f"round {round_ + 1}: {result.requests} confirms in {result.seconds:.2f} s = {result.rps:.0f}/s")
            figures.append(result.rps)
        print(f"confirm: median {percentile(figures, 50):.0f} requests/s over {args.rounds} rounds: {figures}")
    except BenchError as exc:
        print(f"bench.streams: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        redis.teardown()
        db.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
