"""The benchmark's entry point: set up, run the parts, print the tables, write JSON, clean up everything."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .flash_sale import run_flash_sale
from .harness import FULL, QUICK, Bench, make_origin
from .origins import NginxOrigin, PythonOrigin, find_nginx
from .queue_path import run_queue_path
from .report import Part, render_machine, render_machine_markdown, render_markdown, render_part, write_json
from .resume import run_resume
from .services import BenchMariaDB, BenchRedis
from .streams import run_streams
from .support import REPO, BenchError, Children, machine_info, say
from .throughput import run_throughput

RESULTS = REPO / "bench" / "results"
PARTS: dict[str, Callable[[Bench], Part]] = {
    "a": run_throughput,
    "b": run_resume,
    "c": run_queue_path,
    "d": run_flash_sale,
    "e": run_streams,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the fetch step, the queue path and a flash sale against curl and plain rq worker, "
        "and the web front's open status streams and confirm path, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="a reduced run for smoke tests (under a minute)")
    parser.add_argument("--parts", default="".join(PARTS), help="which parts to run, e.g. 'cd' (default: all)")
    parser.add_argument(
        "--redis",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="Redis database the bench owns; flushed before and after (default: DB 13 on 127.0.0.1)",
    )
    parser.add_argument(
        "--mysql",
        default=os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306"),
        help="an admin account on MariaDB; the bench creates and drops database and user udemy_dl_bench",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: system temp)")
    parser.add_argument(
        "--origin",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx, installed from Debian's packages if missing (as root), else the Python ContentOrigin",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx; fall back instead")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) for a post-mortem")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="measure nothing: print (and --markdown) the results in FILE"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results as JSON")
    args = parser.parse_args(argv)
    if set(args.parts) - set(PARTS) or not args.parts:
        parser.error(f"--parts takes letters from {''.join(PARTS)}, got {args.parts!r}")
    return args


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _check_tools_and_disk(args: argparse.Namespace, profile_bytes: int) -> None:
    for tool in ("curl", "xargs"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH: it runs the baseline")
    base = args.dir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < profile_bytes:
        raise BenchError(f"{base} has {free / 2**30:.1f} GiB free; the bench needs {profile_bytes / 2**30:.1f} GiB")


def show(machine: dict[str, Any], parts: list[Part], markdown: Path | None) -> None:
    print()
    print(render_machine(machine))
    for part in parts:
        print()
        print(render_part(part))
    if markdown:
        tables = [render_machine_markdown(machine), *(render_markdown(part) for part in parts)]
        markdown.write_text("\n\n".join(tables) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        document = json.loads(args.from_json.read_text(encoding="utf-8"))
        show(document["machine"], [Part.from_dict(k, v) for k, v in document["parts"].items()], args.markdown)
        return 0
    profile = QUICK if args.quick else FULL
    json_path = args.json or RESULTS / ("latest-quick.json" if args.quick else "latest.json")
    needed = 2 * profile.course_bytes + 2 * profile.resume_bytes + 512 * 2**20
    try:
        _check_tools_and_disk(args, needed)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_term)
    started = time.monotonic()
    parts: list[Part] = []
    machine: dict[str, Any] = {}
    failed = False
    children = Children()
    servers = Children()  # the origins live through every part; workers and curls do not
    redis = BenchRedis(args.redis)
    db = BenchMariaDB(args.mysql)
    bench: Bench | None = None
    origins: list[NginxOrigin | PythonOrigin] = []
    workdir = Path(tempfile.mkdtemp(prefix="udemy_dl_bench.", dir=args.dir))
    workdir.chmod(0o755)  # nginx's workers read the served tree
    try:
        say(f"profile {profile.name}; temporary files in {workdir}")
        redis_version = redis.setup()
        mariadb_version = db.setup(workdir)
        data = workdir / "www"
        data.mkdir()
        nginx = None if args.origin == "python" else find_nginx(install=not args.no_install)
        if nginx is None and args.origin == "nginx":
            raise BenchError("nginx not found (and not installed): drop --origin nginx to fall back")
        if nginx is None:
            say(
                "WARNING: no nginx (not found, not installable, or --origin python): serving with udemy_dl's "
                "ContentOrigin, a Python http.server slower than both clients, so part (a)'s ratio measures the "
                "origin more than the client"
            )
        origin = make_origin(servers, nginx, data, workdir)
        origins.append(origin)
        cutting = PythonOrigin(data).start()
        origins.append(cutting)
        bench = Bench(profile, workdir, children, redis, db, origin, cutting, data)
        machine = machine_info(
            {
                "redis": redis_version,
                "mariadb": mariadb_version,
                "origin": origin.version if isinstance(origin, NginxOrigin) else origin.kind,
            }
        )
        for key in args.parts:
            try:
                parts.append(PARTS[key](bench))
            except BenchError as exc:
                failed = True
                say(f"part ({key}) could not be measured: {exc}")
                parts.append(Part(key, f"part ({key})", "-", error=str(exc).splitlines()[0]))
            finally:
                children.stop_all()  # nothing a part started outlives it
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        failed = True
    except KeyboardInterrupt:
        say("interrupted")
        failed = True
    finally:
        say("cleaning up")
        if bench is not None:
            bench.close()
        children.stop_all()
        for item in origins:
            with contextlib.suppress(Exception):
                item.stop()
        servers.stop_all()
        redis.teardown()
        db.teardown()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if parts:
        show(machine, parts, args.markdown)
        document = {
            "profile": profile.name,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
            "machine": machine,
            "parts": {part.key: part.as_dict() for part in parts},
        }
        write_json(json_path, document)
        print(f"\nresults written to {json_path} ({document['seconds']} s in all)")
    return 1 if failed else 0
