"""Part (e): the web front under load. One `udemy-dl serve` process (uvicorn, one worker) holds 1,000 open
Server-Sent Events streams of running tasks while a publisher appends progress to each task's Redis
Stream as the workers do; the bench measures how long each event takes from its publication to the
client, the serve process's memory, and the Redis connections it holds. Then the confirm path:
signed `POST /orders/confirm` requests per second, beside the figure recorded for the intake it
replaced (the standard library's ThreadingHTTPServer, measured with this same load generator) and
beside a bare Starlette endpoint under the same uvicorn, measured in the same run.

Run on its own: `python -m bench --parts e`. The intake's recorded figure comes from
`python -m bench.streams --confirm-only --serve-path CHECKOUT` run against a checkout that still has it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from udemy_dl.store import PENDING, open_store
from udemy_dl.webhooks import generate_secret, sign_headers

from .services import BenchMariaDB, BenchRedis
from .support import BIN, BenchError, Child, Children, clean_env, free_port, percentile, port_open, say, wait_until

CONFIRM = "/orders/confirm"
CONFIRM_CONCURRENCY = 16
"""Connections the confirm load keeps open (each one request at a time, keep-alive)."""
CONFIRM_REQUESTS = 3000
CONFIRM_WARMUP = 200

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
