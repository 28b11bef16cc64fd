"""The command line: `python -m udemy_dl …` and `udemy-dl …`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from . import __version__, defaults, disk
from .cancellation import parse_reason
from .connection import redis_connection
from .download_worker import default_worker_name, run_pool, run_worker
from .errors import ConfigError, InvalidTaskError, StoreError, UdemyDlError
from .logs import setup_logging
from .metrics import render_latest
from .pausing import PauseState, pause, pause_state, resume
from .payload import parse_task_id
from .producer import Producer
from .queues import job_id_for, worker_queues
from .reconciler import Reconciler, run_reconciler
from .settings import Settings, load_settings
from .store import PROCESSING, open_store
from .tokens import DEFAULT_TTL, generate_status_secret, status_token
from .web import serve
from .webhooks import generate_secret

STATUS_ORDER = ("pending", "enrolled", "processing", "completed", "failed")

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_CONFIG = 3
RET_CONNECT = 4
RET_UNHEALTHY = 5
RET_RECORDED_NOT_QUEUED = 8
"""confirm-payment: the rows are paid and recorded (`processing`), but Redis did not take the jobs;
the reconciler enqueues them once Redis answers. (6 and 7 are start_workers.sh's.)"""
RET_BROKEN_PIPE = 141
"""The output's reader closed it early (`udemy-dl stats | head -1`): what a shell reports for a
program SIGPIPE ended, 128 + 13."""

EXIT_CODES = f"""exit codes:
  {RET_OK}  done
  {RET_ERROR}  error (confirm-payment, requeue-failed: a task was refused)
  {RET_USAGE}  usage
  {RET_CONFIG}  configuration error: the message names the variable (systemd does not restart it)
  {RET_CONNECT}  cannot reach Redis or the database
  {RET_UNHEALTHY}  health: a check failed (the lines name it)
  {RET_RECORDED_NOT_QUEUED}  confirm-payment: paid and recorded, not queued (Redis unreachable); the
     reconciler enqueues them when Redis is back
  {RET_BROKEN_PIPE}  the output's reader closed it early (piped into head, say)"""


def _producer(settings: Settings) -> Any:
    return Producer(settings)


def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    producer = _producer(settings)
    outcome = producer.add_download_job(
        {"taskId": args.task_id, "email": args.email, "courseUrl": args.course_url}, priority=args.priority
    )
    state = "enqueued" if outcome.created else f"already {outcome.job.get_status().value}"
    print(f"task {args.task_id}: job {outcome.job.id} {state}")
    return RET_OK


def cmd_confirm_payment(settings: Settings, args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    producer = _producer(settings)
    try:
        result = producer.confirm_payment(args.task_ids, priority=args.priority)
    except RedisError as exc:  # the rows are marked first: the payment is recorded, the jobs are not
        return _confirmed_without_redis(producer, args, exc)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"enqueued: {result.enqueued or '-'}")
        print(f"already queued: {result.already_queued or '-'}")
        for item in result.refused:
            print(f"refused: task {item['taskId']}: {item['reason']}")
    return RET_OK if not result.refused else RET_ERROR


def _confirmed_without_redis(producer: Any, args: argparse.Namespace, exc: Exception) -> int:
    """Say what confirm-payment recorded when Redis failed after the rows were marked `processing`:
    they are paid and safe, and the reconciler (its sweep enqueues `processing` rows that have no
    job) puts them on the queue once Redis answers."""

    refused: list[dict[str, Any]] = []
    ids: list[int] = []
    for raw in args.task_ids:
        try:
            task_id = parse_task_id(raw)
        except InvalidTaskError as bad:
            refused.append({"taskId": raw, "reason": str(bad)})
            continue
        if task_id not in ids:
            ids.append(task_id)
    rows = {row.id: row for row in producer.store.get_many(ids)} if ids else {}
    recorded = []
    for task_id in ids:
        row = rows.get(task_id)
        if row is None:
            refused.append({"taskId": task_id, "reason": "no such task"})
        elif row.status != PROCESSING:
            refused.append({"taskId": task_id, "reason": f"task is {row.status}"})
        else:
            recorded.append(task_id)
    error = f"{type(exc).__name__}: {exc}"
    advice = (
        f"Redis is unreachable ({error}). The payment is recorded: the reconciler enqueues these tasks "
        "when Redis is back (at its next sweep), or run 'udemy-dl reconcile' then."
    )
    if args.json:
        body = {"enqueued": [], "alreadyQueued": [], "refused": refused, "recordedNotQueued": recorded}
        print(json.dumps({**body, "redisError": error}))
        print(f"udemy-dl: {advice}", file=sys.stderr)
    else:
        print(f"paid and recorded (processing), not queued yet: {recorded or '-'}")
        for item in refused:
            print(f"refused: task {item['taskId']}: {item['reason']}")
        print(advice)
    return RET_RECORDED_NOT_QUEUED


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    try:
        task_id = parse_task_id(args.task_id)
        reason = parse_reason(args.reason)
    except InvalidTaskError as exc:
        print(f"udemy-dl cancel: {exc}", file=sys.stderr)
        return RET_USAGE
    result = _producer(settings).cancel(task_id, reason)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(result.message)
    return RET_OK if result.ok else RET_ERROR


def _queue_names(settings: Settings) -> list[str]:
    """The queues workers take jobs from (what pause and resume accept)."""
    return [queue.name for queue in worker_queues(settings, redis_connection(settings))]


def _pause_target(settings: Settings, args: argparse.Namespace) -> tuple[list[str], str | None]:
    names = _queue_names(settings)
    if args.queue is not None and args.queue not in names:
        raise UdemyDlError(f"--queue {args.queue!r} is not one of the worker queues: {', '.join(names)}")
    return names, args.queue


def _describe_pause(state: PauseState, names: Sequence[str]) -> str:
    if state.everything:
        return "paused: every queue (rq suspend / udemy-dl pause); running tasks finish, none starts"
    held = state.held(names)
    return f"paused: queue(s) {', '.join(held)}; running tasks finish" if held else "not paused"


def cmd_pause(settings: Settings, args: argparse.Namespace) -> int:
    names, queue = _pause_target(settings, args)
    connection = redis_connection(settings)
    pause(connection, queue)
    print(_describe_pause(pause_state(connection, names), names))
    return RET_OK


def cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    names, queue = _pause_target(settings, args)
    connection = redis_connection(settings)
    resume(connection, queue, names)
    state = pause_state(connection, names)
    print(_describe_pause(state, names) if state else "resumed: every queue")
    return RET_OK


def _bar(percent: int, width: int = 20) -> str:
    filled = width * max(0, min(percent, 100)) // 100
    return "[" + "#" * filled + "." * (width - filled) + f"] {percent:3d}%"


_human = disk.human


def _collect_stats(settings: Settings) -> dict[str, Any]:
    producer = _producer(settings)
    stats: dict[str, Any] = {"queue": producer.get_queue_stats()}
    stats["disks"] = [{**asdict(found), "level": found.level} for found in disk.known(settings, producer.connection)]
    names = [queue.name for queue in worker_queues(settings, producer.connection)]
    state = pause_state(producer.connection, names)
    stats["paused"] = {"all": state.everything, "queues": state.held(names)}
    try:
        counts = producer.store.count_by_status()
        stats["tasks"] = {**dict.fromkeys(STATUS_ORDER, 0), **counts}  # every status, as the table shows them
        stats["events_unacknowledged"] = producer.store.count_pending_events()
        running = []
        for row in producer.store.rows_with_status("processing", limit=50):
            item: dict[str, Any] = {"taskId": row.id, "progress": row.progress, "attempts": row.attempts}
            job = producer.queues.fetch_job(job_id_for(row.id))
            if job is not None:
                status = job.get_status(refresh=False)
                item["job"] = getattr(status, "value", status)  # `started`, not the enum's repr
                item.update(job.meta.get("progress") or {})
            running.append(item)
        stats["running"] = running
    except (ConfigError, StoreError) as exc:
        stats["tasks_error"] = str(exc)
    return stats


def _render_stats(settings: Settings, stats: dict[str, Any]) -> str:
    lines = [f"queue {settings.queue_name!r} on {settings.redis_url_redacted}"]
    lines += [f"  {key:<17} {value}" for key, value in stats["queue"].items()]
    lines += _disk_lines(stats["disks"])
    paused = stats["paused"]
    if paused["all"] or paused["queues"]:
        held = "every queue" if paused["all"] else ", ".join(paused["queues"])
        lines.append(f"  {'PAUSED':<17} {held} (udemy-dl resume / rq resume)")
    if "tasks" not in stats:
        lines.append(f"tasks: unavailable ({stats['tasks_error']})")
        return "\n".join(lines)
    lines.append(f"tasks in {settings.database_url_redacted}")
    lines += [f"  {key:<17} {count}" for key, count in stats["tasks"].items()]
    lines.append(f"  {'events pending':<17} {stats['events_unacknowledged']}  (final webhooks not yet acknowledged)")
    if stats["running"]:
        lines.append("running")
    for item in stats["running"]:
        percent = int(item.get("percent", item["progress"]))
        detail = f"attempt {item['attempts']}, job {item.get('job', 'none')}"
        if "bytes" in item:
            total = _human(item["total"]) if item.get("total") else "?"
            detail += f", {_human(item['bytes'])} of {total}, files {item['files']}/{item['filesTotal']}"
            detail += f", {_human(item.get('rate', 0))}/s"
        lines.append(f"  task {item['taskId']:<8} {_bar(percent)}  {detail}")
    return "\n".join(lines)


def _disk_lines(disks: list[dict[str, Any]]) -> list[str]:
    """The download disk of each host: free space, and LOW or FULL next to one that is."""
    lines = ["download disk"] if disks else []
    for item in disks:
        found = disk.DiskReport(**{key: value for key, value in item.items() if key != "level"})
        mark = {"ok": "", "low": f"  LOW: below {_human(found.warn)}", "full": "  FULL: downloads fail"}
        lines.append(f"  {disk.describe(found)}{mark[found.level]}")
    return lines


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    stats = _collect_stats(settings)
    if args.json:
        print(json.dumps(stats, default=str))
    else:
        print(_render_stats(settings, stats))
    return RET_OK


def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    """`stats`, refreshed every --interval seconds until Ctrl-C (or --count refreshes)."""
    shown = 0
    try:
        while args.count is None or shown < args.count:
            screen = _render_stats(settings, _collect_stats(settings))
            clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
            print(f"{clear}{time.strftime('%H:%M:%S')}  (Ctrl-C to quit)\n{screen}", flush=True)
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(args.interval)  # the refresh period of a display, not a synchronisation
    except KeyboardInterrupt:
        pass
    return RET_OK


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    failures: list[str] = []
    workers = 0
    paused = ""
    try:
        connection = redis_connection(settings)
        connection.ping()
        names = [queue.name for queue in worker_queues(settings, connection)]
        state = pause_state(connection, names)
        if state:
            paused = f"; {_describe_pause(state, names)}"
        if not args.no_workers:
            workers = Producer(settings, connection=connection).get_queue_stats()["workers"]
            if workers == 0:
                failures.append(f"workers: none listening on queue {settings.queue_name!r}")
    except Exception as exc:
        failures.append(f"redis: {settings.redis_url_redacted}: {type(exc).__name__}: {exc}")
    if settings.database_url:  # not set: the config check below names the variable
        try:
            open_store(settings.database_url).ping()
        except StoreError as exc:
            failures.append(f"database: {settings.database_url_redacted}: {exc}")
    warnings: list[str] = []
    if not args.no_workers:
        _check_disk(settings, failures, warnings)
    config_error = False
    try:
        settings.require_worker_ready()
    except ConfigError as exc:
        failures.append(f"config: {exc}")
        config_error = True
    for warning in warnings:
        print(f"WARNING {warning}")
    if failures:
        for failure in failures:
            print(f"UNHEALTHY {failure}")
        if paused:
            print(paused.removeprefix("; "))
        # A configuration error is exit 3 whatever else failed: fixing it comes first.
        return RET_CONFIG if config_error else RET_UNHEALTHY
    # Paused is the operator's choice, not a fault: exit 0, but say so (and what is held).
    print("healthy: redis ok, database ok" + ("" if args.no_workers else f", {workers} worker(s)") + paused)
    return RET_OK


def _check_disk(settings: Settings, failures: list[str], warnings: list[str]) -> None:
    """This host's download disk: a warning below its warning level, a failure below the floor."""
    found = disk.measure(settings)
    if found is None or found.level == "ok":
        return
    if found.level == "full":
        failures.append(f"disk: {disk.describe(found)}, below {_human(found.floor)}: downloads fail")
    else:
        limit = "DISK_WARN_BYTES" if settings.disk_warn_bytes else f"{defaults.DISK_WARN_SHARE:.0%} of the disk"
        warnings.append(f"disk: {disk.describe(found)}, below {_human(found.warn)} ({limit})")


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_database()
    reconciler = Reconciler(settings)
    recovered = reconciler.recover_started()
    result = reconciler.sweep()
    requeued = sorted(set(result.requeued) | set(recovered))
    print(f"{result.processing} task(s) processing, {len(requeued)} re-enqueued: {requeued or '-'}")
    if result.failed:
        print(f"failed (no attempts left): {result.failed}")
    return RET_OK


def cmd_requeue_failed(settings: Settings, args: argparse.Namespace) -> int:
    result = _producer(settings).requeue_failed(args.task_ids or None)
    print(f"re-enqueued: {result.enqueued or '-'}")
    for item in result.refused:
        print(f"refused: task {item['taskId']}: {item['reason']}")
    return RET_OK if not result.refused else RET_ERROR


def cmd_db_init(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.require_database())
    store.init_schema()
    print(f"download_tasks ready in {settings.database_url_redacted}")
    return RET_OK


def cmd_gen_secret(settings: Settings, args: argparse.Namespace) -> int:
    print(generate_status_secret() if args.status else generate_secret())
    return RET_OK


def cmd_status_token(settings: Settings, args: argparse.Namespace) -> int:
    try:
        task_id = parse_task_id(args.task_id)
        token = status_token(task_id, args.ttl, secret=settings.require_status_tokens())
    except (InvalidTaskError, ValueError) as exc:
        print(f"udemy-dl status-token: {exc}", file=sys.stderr)
        return RET_USAGE
    print(token)
    return RET_OK


def cmd_shell_settings(settings: Settings, args: argparse.Namespace) -> int:
    """Print the settings the shell scripts need, as shell assignments (validated, .env applied)."""

    values = {
        "WORKER_COUNT": settings.worker_count,
        "STOP_TIMEOUT": settings.stop_timeout,
        "PID_DIR": settings.pid_dir,
        "LOG_DIR": settings.log_dir,
        "QUEUE_NAME": settings.queue_name,
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")
    return RET_OK


def cmd_metrics(settings: Settings, args: argparse.Namespace) -> int:
    body, _ = render_latest(settings, redis_connection(settings))
    sys.stdout.write(body.decode())
    return RET_OK


def _listen(name: str, server: Callable[[Settings, str, int], None], settings: Settings, host: str, port: int) -> int:
    """Run *server* on host:port until it stops; exit RET_CONNECT, naming the address, if it cannot listen."""
    try:
        server(settings, host, port)
    except OSError as exc:  # the address is taken or not ours to bind
        print(f"udemy-dl {name}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return RET_CONNECT
    return RET_OK


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    def run(settings: Settings, host: str, port: int) -> None:
        serve(settings, host, port, workers=args.workers)

    return _listen("serve", run, settings, args.host, args.port)


def _workers(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 64, got {text!r}")
    return int(text)


def cmd_dashboard(settings: Settings, args: argparse.Namespace) -> int:
    from .dashboard import run_dashboard  # an optional extra: imported only here

    return _listen("dashboard", run_dashboard, settings, args.bind, args.port)


def cmd_reconciler(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_database()  # without it every round would fail the same way: stop with exit 3 instead
    run_reconciler(settings)
    return RET_OK


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    run_worker(settings, args.name or default_worker_name(1), burst=args.burst, logging_level=args.log_level)
    return RET_OK


def cmd_pool(settings: Settings, args: argparse.Namespace) -> int:
    run_pool(settings, args.count or settings.worker_count, logging_level=args.log_level)
    return RET_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udemy-dl",
        description="Download-order worker service.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"udemy-dl {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enqueue", help="enqueue one download job (idempotent per task id)")
    p.add_argument("--task-id", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--course-url", required=True)
    p.add_argument("--priority", choices=defaults.PRIORITIES, default="normal", help="high: VIP queue")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser(
        "confirm-payment",
        help="mark paid tasks processing and enqueue them",
        description="Mark paid tasks processing (recorded in the database), then enqueue them.",
        epilog=f"""exit codes:
  {RET_OK}  every task enqueued or already queued
  {RET_ERROR}  a task was refused (no such task, already completed or failed, bad id): see 'refused:'
  {RET_CONNECT}  the database is unreachable: nothing was recorded
  {RET_RECORDED_NOT_QUEUED}  Redis is unreachable: the tasks are paid and recorded (processing) but not queued;
     the reconciler enqueues them when Redis is back (or run 'udemy-dl reconcile' then)""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--priority", choices=defaults.PRIORITIES, default="normal", help="high: VIP orders go first")
    p.set_defaults(func=cmd_confirm_payment)

    p = sub.add_parser(
        "cancel",
        help="cancel a task (a refund, a mistake): it never starts, or its download stops; failed 'cancelled…'",
        description="Cancel a task that has not completed. A queued task never starts; a running one stops "
        "within seconds on whatever host runs it, its partial files are removed, nothing is retried. The task "
        "becomes failed with 'cancelled: REASON' and the payment service gets download.cancelled.",
        epilog=f"""exit codes:
  {RET_OK}  cancelled, already cancelled, or cancel requested (its download is still stopping)
  {RET_ERROR}  refused: the task is completed or had failed before, or there is no such task
  {RET_USAGE}  a bad task id or reason""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--reason", help="why (recorded as 'cancelled: REASON' and sent in the event)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_cancel)

    for name, func, text in (
        ("pause", cmd_pause, "hold every worker on every host: no new task starts, running ones finish"),
        ("resume", cmd_resume, "let workers take tasks again (all queues, or --queue)"),
    ):
        p = sub.add_parser(name, help=text, description=text + ". Without --queue: RQ's own rq suspend / rq resume.")
        p.add_argument("--queue", help="only this queue (default: every queue)")
        p.set_defaults(func=func)

    p = sub.add_parser("stats", help="queue counts, task counts and running tasks")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("watch", help="stats with a progress bar per running task, refreshed until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=int, help="stop after this many refreshes")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("health", help="exit 0 when Redis, the database and workers are up; else name what is not")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="check the settings, Redis and the database only (start_workers.sh runs this before starting any)",
    )
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("reconcile", help="re-enqueue processing tasks that have no live job")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("metrics", help="print the Prometheus metrics (what /metrics on serve shows)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "serve",
        help="the web front: the intake (POST /orders/confirm, GET /tasks/<id>, /metrics, /healthz) and the live "
        "status (GET /tasks/<id>/events, /status/<id>)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--workers", type=_workers, default=1, help="processes sharing the port (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "dashboard", help="rq-dashboard on our Redis (optional extra: pip install -r requirements-dashboard.txt)"
    )
    p.add_argument("--bind", default="127.0.0.1", help="address (default 127.0.0.1; others need DASHBOARD_USERNAME)")
    p.add_argument("--port", type=int, default=9181, help="port (default 9181)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("reconciler", help="run the reconciler loop (start_workers.sh and the pool run it)")
    p.set_defaults(func=cmd_reconciler)

    p = sub.add_parser("requeue-failed", help="put failed tasks (all, or those named) back on the queue")
    p.add_argument("task_ids", nargs="*", type=int, metavar="TASK_ID")
    p.set_defaults(func=cmd_requeue_failed)

    p = sub.add_parser("db", help="database schema")
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p_init = db_sub.add_parser("init", help="create download_tasks (safe to run twice)")
    p_init.set_defaults(func=cmd_db_init)

    p = sub.add_parser("gen-secret", help="print a new API_SECRET_KEY (whsec_…); --status: a STATUS_TOKEN_SECRET")
    p.add_argument("--status", action="store_true", help="a STATUS_TOKEN_SECRET for status tokens instead")
    p.set_defaults(func=cmd_gen_secret)

    p = sub.add_parser(
        "status-token", help="print a token that lets a browser watch one task's live status (docs/STATUS.md)"
    )
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL, help=f"seconds it stays good (default {DEFAULT_TTL})")
    p.set_defaults(func=cmd_status_token)

    p = sub.add_parser("shell-settings", help="print the settings the shell scripts use, as shell assignments")
    p.set_defaults(func=cmd_shell_settings)

    p = sub.add_parser("worker", help="run one RQ worker (start_workers.sh runs these)")
    p.add_argument("--name", help="worker name shown by rq info (default: udemy-dl.<host>.1)")
    p.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("pool", help="run RQ's worker pool, replacing workers that die (the systemd unit runs this)")
    p.add_argument("--count", type=int, help="workers (default: WORKER_COUNT)")
    p.set_defaults(func=cmd_pool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()  # now, not at exit: a reader gone away is then caught below
    except BrokenPipeError:
        # `udemy-dl stats | head -1`: the reader has what it wanted. No traceback, and nothing more
        # written to the closed pipe (Python flushes stdout once more at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return RET_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        settings = load_settings()
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"udemy-dl: configuration error: {exc}", file=sys.stderr)
        return RET_CONFIG
    except StoreError as exc:
        print(f"udemy-dl: {exc}", file=sys.stderr)
        return RET_CONNECT
    except UdemyDlError as exc:
        print(f"udemy-dl: {exc}", file=sys.stderr)
        return RET_ERROR
    except Exception as exc:
        from redis.exceptions import RedisError

        if isinstance(exc, RedisError):
            print(f"udemy-dl: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
            return RET_CONNECT
        raise
