"""The command line, run as a real process (`python -m udemy_dl` / `udemy-dl`) against real Redis and databases."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from tests.support.disks import Usage, report_far_host
from tests.support.mariadb import TEST_URL, drop_tasks_table
from tests.support.processes import LoggedProcess
from tests.support.scripts import clean_environ, cli_command, rq_info, run_command
from tests.support.service import Backend
from tests.support.waiting import wait_for
from udemy_dl import __version__
from udemy_dl.cli import RET_BROKEN_PIPE, RET_CONFIG, RET_CONNECT, RET_OK, RET_UNHEALTHY, build_parser, main
from udemy_dl.queues import job_id_for
from udemy_dl.settings import Settings, load_settings
from udemy_dl.store import COMPLETED, ENROLLED, FAILED, PENDING, PROCESSING, open_store, utcnow
from udemy_dl.webhooks import generate_secret

EMAIL = "buyer@shop.example"
URL = "https://cdn.example/courses/1"
CLOSED_REDIS = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: connecting fails at once."""


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `udemy-dl ARGS` with this test's environment plus *env*, in this test's working directory."""
    return run_command([*cli_command(), *args], env={**os.environ, **env}, cwd=Path.cwd())


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """Every subcommand the parser defines, nested ones as `db init`."""
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub)
                names += [f"{name} {child}" for child in nested] if nested else [name]
    return names


SUBCOMMANDS = subcommands(build_parser())


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- help and version -----------------------------------------------------------------------------


def test_module_help_exits_zero() -> None:
    """`python -m udemy_dl --help` prints usage listing the subcommands and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "udemy_dl", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, explain(result)
    assert "usage:" in result.stdout and "confirm-payment" in result.stdout


def test_spec_subcommands_exist() -> None:
    """Every subcommand the spec names is there."""
    required = {"enqueue", "confirm-payment", "stats", "health", "reconcile", "requeue-failed", "db init", "gen-secret"}
    assert required <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_zero(command: str) -> None:
    """`udemy-dl <subcommand> --help` prints its usage and exits 0."""
    result = cli(*command.split(), "--help")
    assert result.returncode == 0, explain(result)
    assert f"usage: udemy-dl {command}" in " ".join(result.stdout.split())


def test_version_is_printed() -> None:
    """`udemy-dl --version` shows the package version."""
    result = cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"udemy-dl {__version__}")


# -- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORKER_COUNT", "abc"),
        ("MAX_ATTEMPTS", "0"),
        ("REDIS_URL", "http://x"),
        ("DATABASE_URL", "postgres://u@h/db"),
        ("API_SECRET_KEY", "not-a-whsec"),
        ("WEBHOOK_URL", "ftp://pay.example/hook"),
    ],
)
def test_bad_setting_exits_3_naming_the_variable(variable: str, value: str) -> None:
    """A malformed setting stops any command with exit 3 and the variable's name on stderr."""
    result = cli("stats", **{variable: value})
    assert result.returncode == RET_CONFIG == 3, explain(result)
    assert variable in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("REDIS_URL", "redis://127.0.0.1:6379/ten", None),
        ("REDIS_URL", "redis://127.0.0.1:abc/0", None),
        ("REDIS_URL", "redis://:s3c/ret@127.0.0.1:6379/0", "s3c"),
        ("REDIS_URL", "redis://:s3c#ret@127.0.0.1:6379/0", "s3c"),
        ("DATABASE_URL", "mysql://root:pw-9@127.0.0.1:abc/udemy_dl_test", "pw-9"),
        ("DATABASE_URL", "mysql://root:s3c/ret@127.0.0.1/udemy_dl_test", "s3c"),
        ("REDIS_PORT", "70000", None),
    ],
)
def test_malformed_url_or_port_exits_3_without_a_traceback(variable: str, value: str, secret: str | None) -> None:
    """A malformed REDIS_URL/DATABASE_URL/port is a configuration error (exit 3, which systemd does not
    restart), named on stderr: no traceback, no exit 1, no password, and `/ten` is not read as db 0."""
    result = cli("health", **{"DATABASE_URL": "sqlite:///x.db", "ALLOWED_HOSTS": "cdn.example", variable: value})
    assert result.returncode == RET_CONFIG, explain(result)
    assert variable in result.stderr and "Traceback" not in result.stderr
    if secret is not None:
        assert secret not in result.stdout + result.stderr, explain(result)


REQUIRED_ARGUMENTS = {
    "cancel": ["1"],
    "confirm-payment": ["1"],
    "status-token": ["1"],
    "enqueue": ["--task-id", "1", "--email", "buyer@shop.example", "--course-url", "https://cdn.example/c"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_exits_3_on_a_malformed_setting(command: str) -> None:
    """Whatever the command, a bad value stops it with exit 3 naming the variable (systemd's
    RestartPreventExitStatus=3 relies on it)."""
    result = cli(*command.split(), *REQUIRED_ARGUMENTS.get(command, []), REDIS_URL="redis://127.0.0.1:6379/ten")
    assert result.returncode == RET_CONFIG, explain(result)
    assert "REDIS_URL" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "environ", "variable"),
    [
        ("health", {"DATABASE_URL": "sqlite:///x.db"}, "ALLOWED_HOSTS"),
        ("health", {"ALLOWED_HOSTS": "cdn.example"}, "DATABASE_URL"),
        ("reconciler", {}, "DATABASE_URL"),
        ("reconcile", {}, "DATABASE_URL"),
        ("pool", {"DATABASE_URL": "sqlite:///x.db"}, "ALLOWED_HOSTS"),
    ],
)
def test_missing_setting_a_command_needs_exits_3(command: str, environ: dict[str, str], variable: str) -> None:
    """A setting a command cannot do without is a configuration error too (exit 3), not a failed
    health check (5), nor a loop that logs the same warning forever."""
    try:
        env = {**os.environ, "REDIS_URL": CLOSED_REDIS, **environ}
        result = run_command([*cli_command(), command], env=env, cwd=Path.cwd(), timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command} did not stop on a missing {variable}: {exc.stderr!r}")
    assert result.returncode == RET_CONFIG, explain(result)
    assert variable in result.stdout + result.stderr


def test_bad_setting_in_dotenv_exits_3(tmp_path: Path) -> None:
    """A malformed value in `.env` (in the working directory) is caught the same way."""
    (tmp_path / ".env").write_text("RETRY_DELAY=soon\n", encoding="utf-8")
    result = cli("stats")
    assert result.returncode == RET_CONFIG, explain(result)
    assert "RETRY_DELAY" in result.stderr


# -- database -------------------------------------------------------------------------------------


@pytest.mark.parametrize("back_end", ["mysql", "sqlite"])
def test_db_init_twice_creates_a_usable_table(back_end: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`db init` creates download_tasks; running it again succeeds and keeps the rows."""
    if back_end == "mysql":
        request.getfixturevalue("mysql_url")
        drop_tasks_table()
        request.addfinalizer(drop_tasks_table)
        url = TEST_URL
    else:
        url = f"sqlite:///{tmp_path}/fresh/tasks.db"
    first = cli("db", "init", DATABASE_URL=url)
    assert first.returncode == 0, explain(first)
    store = open_store(url)
    task_id = store.insert_task(EMAIL, URL)
    second = cli("db", "init", DATABASE_URL=url)
    assert second.returncode == 0, explain(second)
    row = store.get(task_id)
    store.close()
    assert row is not None and row.status == PENDING


def test_db_init_without_database_names_the_variable() -> None:
    """`db init` with no DATABASE_URL/DB_* exits 3 naming DATABASE_URL."""
    result = cli("db", "init")
    assert result.returncode == RET_CONFIG, explain(result)
    assert "DATABASE_URL" in result.stderr


def test_unreachable_database_exits_4() -> None:
    """A database that does not answer is a connection error (exit 4), not a traceback."""
    result = cli("db", "init", DATABASE_URL="mysql://root@127.0.0.1:1/udemy_dl_test")
    assert result.returncode == RET_CONNECT, explain(result)
    assert "Traceback" not in result.stderr


def test_serve_on_a_taken_port_exits_4_naming_the_address(tmp_path: Path, redis_url: str) -> None:
    """`serve` on a port another process holds: exit 4 with the address, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli(
            "serve",
            "--port",
            str(port),
            DATABASE_URL=f"sqlite:///{tmp_path / 'tasks.db'}",
            API_SECRET_KEY=generate_secret(),
        )
    assert result.returncode == RET_CONNECT, explain(result)
    assert f"udemy-dl serve: cannot listen on 127.0.0.1:{port}:" in result.stderr, explain(result)
    assert "Traceback" not in result.stderr


# -- secrets and settings -------------------------------------------------------------------------


def test_gen_secret_output_is_accepted_by_settings() -> None:
    """`gen-secret` prints one whsec_ key that settings accept as API_SECRET_KEY."""
    result = cli("gen-secret")
    assert result.returncode == 0, explain(result)
    secret = result.stdout.strip()
    assert load_settings(environ={"API_SECRET_KEY": secret}, env_file=None).api_secret_key == secret


def test_shell_settings_prints_what_the_scripts_need(tmp_path: Path) -> None:
    """`shell-settings` prints shell assignments that a shell evaluates back to the configured values."""
    result = cli("shell-settings", WORKER_COUNT="7", STOP_TIMEOUT="12", PID_DIR=str(tmp_path / "my run"))
    assert result.returncode == 0, explain(result)
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert (values["WORKER_COUNT"], values["STOP_TIMEOUT"]) == ("7", "12")
    assert shlex.split(values["PID_DIR"]) == [str(tmp_path / "my run")]


# -- producer commands ----------------------------------------------------------------------------


@pytest.fixture
def cli_backend(configure: Callable[..., Settings], redis_conn: Redis, backend: Backend) -> Backend:
    """Environment pointing the CLI at Redis DB 15 and each store back end."""
    configure(DATABASE_URL=backend.url)
    return backend


def queued(redis_conn: Redis) -> list[str]:
    return list(Queue("downloads", connection=redis_conn).job_ids)


def test_confirm_payment_enqueues_and_reports_json(cli_backend: Backend, redis_conn: Redis) -> None:
    """`confirm-payment ID --json` marks the task processing, enqueues it, and prints the result as JSON."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PENDING)
    result = cli("confirm-payment", str(task_id), "--json")
    assert result.returncode == RET_OK, explain(result)
    assert json.loads(result.stdout) == {"enqueued": [task_id], "alreadyQueued": [], "refused": []}
    assert queued(redis_conn) == [job_id_for(task_id)]
    row = cli_backend.store.get(task_id)
    assert row is not None and row.status == PROCESSING


def test_confirm_payment_twice_reports_already_queued(cli_backend: Backend, redis_conn: Redis) -> None:
    """A repeated `confirm-payment` changes nothing and says the task is already queued."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PENDING)
    cli("confirm-payment", str(task_id), "--json")
    result = cli("confirm-payment", str(task_id), "--json")
    assert result.returncode == RET_OK, explain(result)
    assert json.loads(result.stdout) == {"enqueued": [], "alreadyQueued": [task_id], "refused": []}
    assert queued(redis_conn) == [job_id_for(task_id)]


def test_confirm_payment_of_unknown_task_exits_non_zero(cli_backend: Backend, redis_conn: Redis) -> None:
    """A refused task makes `confirm-payment` exit non-zero with the reason."""
    result = cli("confirm-payment", "424242", "abc")
    assert result.returncode != 0, explain(result)
    assert "424242: no such task" in result.stdout and "'abc'" in result.stdout
    assert queued(redis_conn) == []


RECORDED_NOT_QUEUED = 8
"""confirm-payment's own exit code: the rows are paid and recorded, Redis could not take the jobs."""


def test_confirm_payment_with_redis_down_says_the_rows_are_recorded(cli_backend: Backend, redis_conn: Redis) -> None:
    """With Redis unreachable, `confirm-payment` still records the payment (rows `processing`) and says
    so, names the reconciler as the one who will enqueue them, and exits with its own code (8), not a
    bare error; once Redis answers again, a reconcile enqueues them."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PENDING)
    done_id = cli_backend.store.insert_task(EMAIL, URL, COMPLETED)
    result = cli("confirm-payment", str(task_id), str(done_id), "nope", REDIS_URL=CLOSED_REDIS)
    assert result.returncode == RECORDED_NOT_QUEUED, explain(result)
    assert "Traceback" not in result.stderr
    words = " ".join((result.stdout + result.stderr).split())
    assert f"paid and recorded (processing), not queued yet: [{task_id}]" in words, explain(result)
    assert "reconciler" in words and "Redis" in words
    assert f"refused: task {done_id}: task is completed" in words and "'nope'" in words
    row = cli_backend.store.get(task_id)
    assert row is not None and row.status == PROCESSING

    as_json = cli("confirm-payment", str(task_id), "--json", REDIS_URL=CLOSED_REDIS)
    assert as_json.returncode == RECORDED_NOT_QUEUED, explain(as_json)
    body = json.loads(as_json.stdout)
    assert (body["enqueued"], body["alreadyQueued"], body["refused"], body["recordedNotQueued"]) == (
        [],
        [],
        [],
        [task_id],
    )
    assert "ConnectionError" in body["redisError"]

    assert queued(redis_conn) == []
    assert cli("reconcile").returncode == RET_OK
    assert queued(redis_conn) == [job_id_for(task_id)]


def test_confirm_payment_help_documents_its_exit_codes() -> None:
    """The operator reading `confirm-payment --help` learns what exit 8 means."""
    result = cli("confirm-payment", "--help")
    words = " ".join(result.stdout.split())
    assert result.returncode == 0 and "8" in words and "reconciler" in words, explain(result)


def test_enqueue_queues_one_job(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """`enqueue` queues download-<id> once; a second call says it is already queued."""
    configure()
    args = ("enqueue", "--task-id", "77", "--email", EMAIL, "--course-url", URL)
    first, second = cli(*args), cli(*args)
    assert (first.returncode, second.returncode) == (0, 0), explain(second)
    assert "download-77 enqueued" in first.stdout
    assert queued(redis_conn) == ["download-77"]


def test_enqueue_again_says_already_queued(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """A second `enqueue` of a queued task says, in words, that it is already queued."""
    configure()
    args = ("enqueue", "--task-id", "79", "--email", EMAIL, "--course-url", URL)
    cli(*args)
    second = cli(*args)
    assert second.returncode == 0, explain(second)
    assert "already queued" in second.stdout


def test_enqueue_refuses_bad_task_data(configure: Callable[..., Settings], redis_conn: Redis) -> None:
    """`enqueue` with an invalid email exits non-zero naming it and queues nothing."""
    configure()
    result = cli("enqueue", "--task-id", "78", "--email", "nope", "--course-url", URL)
    assert result.returncode != 0, explain(result)
    assert "nope" in result.stderr
    assert queued(redis_conn) == []


def test_stats_json_reports_queue_and_tasks(cli_backend: Backend, redis_conn: Redis) -> None:
    """`stats --json` prints parseable JSON with queue counts, task counts for every status (zero ones too, as the
    table shows them) and running tasks."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PENDING)
    cli_backend.store.insert_task(EMAIL, URL, COMPLETED)
    cli("confirm-payment", str(task_id))
    result = cli("stats", "--json")
    assert result.returncode == RET_OK, explain(result)
    stats = json.loads(result.stdout)
    assert stats["queue"]["waiting"] == 1 and stats["queue"]["workers"] == 0
    assert stats["tasks"] == {PENDING: 0, ENROLLED: 0, PROCESSING: 1, COMPLETED: 1, FAILED: 0}
    assert [item["taskId"] for item in stats["running"]] == [task_id]
    assert stats["events_unacknowledged"] == 0


def test_stats_counts_final_events_not_yet_acknowledged(cli_backend: Backend, redis_conn: Redis) -> None:
    """A settled task whose final event the payment service has not taken yet shows in `stats`."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PROCESSING)
    assert cli_backend.store.mark_completed(task_id, "/srv/downloads/1", 1, utcnow(), event="msg_1_completed_x")
    stats = json.loads(cli("stats", "--json").stdout)
    assert stats["events_unacknowledged"] == 1
    lines = [line.split()[:3] for line in cli("stats").stdout.splitlines()]
    assert ["events", "pending", "1"] in lines


def test_stats_table_is_printed(cli_backend: Backend, redis_conn: Redis) -> None:
    """Plain `stats` prints the queue counts and one line per task status."""
    cli_backend.store.insert_task(EMAIL, URL, FAILED)
    result = cli("stats")
    assert result.returncode == RET_OK, explain(result)
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["waiting", "0"] in lines and ["failed", "1"] in lines and ["pending", "0"] in lines


def test_stats_names_a_running_tasks_job_status_plainly(cli_backend: Backend, redis_conn: Redis) -> None:
    """A running task's line says `job started` (RQ's status value), never the enum's `JobStatus.STARTED`;
    `--json` gives the same value."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PENDING)
    assert cli("confirm-payment", str(task_id)).returncode == RET_OK
    job = Job.fetch(job_id_for(task_id), connection=redis_conn)
    job.set_status(JobStatus.STARTED)
    progress = {"bytes": 2_000_000, "total": 8_000_000, "files": 0, "filesTotal": 1, "percent": 25, "rate": 1_000_000}
    job.meta["progress"] = progress
    job.save_meta()
    result = cli("stats")
    assert result.returncode == RET_OK, explain(result)
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith(f"task {task_id} "))
    assert "job started," in line and "JobStatus" not in result.stdout, line
    assert [item["job"] for item in json.loads(cli("stats", "--json").stdout)["running"]] == ["started"]


@pytest.mark.parametrize("args", [["stats"], ["stats", "--json"], ["health", "--no-workers"]])
def test_output_whose_reader_is_gone_ends_quietly(healthy_env: Settings, args: list[str]) -> None:
    """`udemy-dl stats | head -1` where head has exited already: the command ends with 141, as a program
    SIGPIPE ended would, and without a traceback or an "Exception ignored" line."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written
    try:
        result = subprocess.run(
            [*cli_command(), *args],
            env=dict(os.environ),
            cwd=Path.cwd(),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == RET_BROKEN_PIPE, result.stderr
    assert result.stderr == "", result.stderr


def test_stats_never_prints_the_redis_password(cli_backend: Backend) -> None:
    """Whatever happens, `stats` output and errors do not contain the Redis password."""
    result = cli("stats", REDIS_URL="redis://:stats-pw-xyz@127.0.0.1:6379/15")
    assert "stats-pw-xyz" not in result.stdout + result.stderr, explain(result)


def test_watch_refreshes_the_stats(cli_backend: Backend, redis_conn: Redis) -> None:
    """`watch --count 2 --interval 0` shows the stats twice and exits 0."""
    result = cli("watch", "--count", "2", "--interval", "0")
    assert result.returncode == RET_OK, explain(result)
    assert result.stdout.count("queue 'downloads'") == 2


def test_stats_with_redis_down_exits_4(cli_backend: Backend) -> None:
    """`stats` with Redis unreachable exits 4 (connection) naming redis, without a traceback."""
    result = cli("stats", REDIS_URL=CLOSED_REDIS)
    assert result.returncode == RET_CONNECT, explain(result)
    assert "redis" in result.stderr.lower() and "Traceback" not in result.stderr


def test_reconcile_requeues_lost_tasks(cli_backend: Backend, redis_conn: Redis) -> None:
    """`reconcile` enqueues processing tasks that have no job and reports them."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PROCESSING)
    result = cli("reconcile")
    assert result.returncode == RET_OK, explain(result)
    assert f"1 re-enqueued: [{task_id}]" in result.stdout
    assert queued(redis_conn) == [job_id_for(task_id)]


def test_reconcile_settles_a_row_no_job_could_run_and_goes_on(cli_backend: Backend, redis_conn: Redis) -> None:
    """A processing row whose data a job would refuse (edited after it was confirmed) is settled failed with
    the reason, and the rows after it are enqueued all the same: one bad row never holds up the others."""
    bad = cli_backend.store.insert_task(f"{EMAIL}\nforged log line", URL, PROCESSING)
    good = cli_backend.store.insert_task(EMAIL, URL, PROCESSING)
    result = cli("reconcile")
    assert result.returncode == RET_OK, explain(result)
    assert queued(redis_conn) == [job_id_for(good)]
    row = cli_backend.store.get(bad)
    assert row is not None and row.status == FAILED, row
    assert row.error_message is not None and row.error_message.startswith("bad task data"), row
    assert f"1 re-enqueued: [{good}]" in result.stdout, explain(result)


def test_requeue_failed_refuses_a_row_no_job_could_run_and_requeues_the_others(
    cli_backend: Backend, redis_conn: Redis
) -> None:
    """`requeue-failed BAD GOOD`: the bad row is named and stays failed (not reopened, no second event);
    the good one is back in processing and queued; the exit is non-zero for the refusal."""
    bad = cli_backend.store.insert_task(f"{EMAIL}\nforged log line", URL, PROCESSING)
    good = cli_backend.store.insert_task(EMAIL, URL, PROCESSING)
    for task_id in (bad, good):
        cli_backend.store.mark_failed(task_id, "boom", None, utcnow())
    result = cli("requeue-failed", str(bad), str(good))
    assert result.returncode != 0, explain(result)
    assert f"task {bad}: bad task data" in result.stdout, explain(result)
    assert queued(redis_conn) == [job_id_for(good)]
    rows = {row.id: row for row in cli_backend.store.get_many([bad, good])}
    assert (rows[bad].status, rows[bad].error_message) == (FAILED, "boom")
    assert rows[good].status == PROCESSING


def test_requeue_failed_puts_failed_tasks_back(cli_backend: Backend, redis_conn: Redis) -> None:
    """`requeue-failed` moves failed tasks back to processing and enqueues them."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, PROCESSING)
    cli_backend.store.mark_failed(task_id, "boom", None, utcnow())
    result = cli("requeue-failed")
    assert result.returncode == RET_OK, explain(result)
    assert queued(redis_conn) == [job_id_for(task_id)]
    row = cli_backend.store.get(task_id)
    assert row is not None and row.status == PROCESSING


def test_requeue_failed_refusal_exits_non_zero(cli_backend: Backend, redis_conn: Redis) -> None:
    """Naming a task that is not failed (here: completed) is refused with a non-zero exit."""
    task_id = cli_backend.store.insert_task(EMAIL, URL, COMPLETED)
    result = cli("requeue-failed", str(task_id))
    assert result.returncode != 0, explain(result)
    assert f"task {task_id}: task is completed" in result.stdout


# -- health ---------------------------------------------------------------------------------------


@pytest.fixture
def healthy_env(configure: Callable[..., Settings], redis_conn: Redis, mysql_store: object) -> Settings:
    """Everything a worker needs, so that only what a test breaks can be unhealthy."""
    return configure(DATABASE_URL=TEST_URL, ALLOWED_HOSTS="cdn.example")


def unhealthy_checks(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("UNHEALTHY")]


def test_health_without_workers_names_workers(healthy_env: Settings) -> None:
    """With Redis and the database up but no worker listening, `health` fails naming only `workers`."""
    result = cli("health")
    assert result.returncode == RET_UNHEALTHY != 0, explain(result)
    assert unhealthy_checks(result) == ["workers"]


def test_health_with_redis_down_names_redis(healthy_env: Settings) -> None:
    """With REDIS_URL on a closed port, `health` fails naming `redis`."""
    result = cli("health", REDIS_URL=CLOSED_REDIS)
    assert result.returncode != 0, explain(result)
    assert "redis" in unhealthy_checks(result)


def test_health_with_database_down_names_database(healthy_env: Settings) -> None:
    """With the database unreachable, `health` fails naming `database`."""
    result = cli("health", DATABASE_URL="mysql://root@127.0.0.1:1/udemy_dl_test")
    assert result.returncode != 0, explain(result)
    assert "database" in unhealthy_checks(result)


def test_health_with_a_worker_running_is_healthy(
    healthy_env: Settings, redis_conn: Redis, start_worker: Callable[..., LoggedProcess]
) -> None:
    """With a worker listening on the queue, `health` exits 0."""
    worker = start_worker()
    downloads = Queue("downloads", connection=redis_conn)
    wait_for(lambda: Worker.count(connection=redis_conn, queue=downloads) > 0, timeout=20, what=worker.log)
    result = cli("health")
    assert result.returncode == RET_OK, explain(result)
    assert "healthy" in result.stdout


def test_health_without_the_worker_check_is_what_a_start_needs(healthy_env: Settings) -> None:
    """`health --no-workers` (start_workers.sh's check before starting anything): Redis and the
    database up is healthy with no worker running; the database down is unhealthy, named."""
    result = cli("health", "--no-workers")
    assert result.returncode == RET_OK, explain(result)
    assert result.stdout.strip() == "healthy: redis ok, database ok"
    down = cli("health", "--no-workers", DATABASE_URL="mysql://root@127.0.0.1:1/udemy_dl_test")
    assert down.returncode == RET_UNHEALTHY, explain(down)
    assert unhealthy_checks(down) == ["database"]


def test_health_without_the_tasks_table_names_it_and_the_command_that_creates_it(healthy_env: Settings) -> None:
    """A database that answers but was never set up (`db init` not run) is unhealthy: health and
    `health --no-workers` (start_workers.sh's check) fail naming the missing table and the fix."""
    drop_tasks_table()
    for args in (["health"], ["health", "--no-workers"]):
        result = cli(*args)
        assert result.returncode == RET_UNHEALTHY, explain(result)
        assert "database" in unhealthy_checks(result), explain(result)
        assert "table download_tasks missing: run `udemy-dl db init`" in result.stdout, explain(result)
        assert "database ok" not in result.stdout


# -- the download disk ----------------------------------------------------------------------------


def test_health_warns_of_a_low_download_disk_and_stays_healthy(
    healthy_env: Settings,
    configure: Callable[..., Settings],
    redis_conn: Redis,
    tmp_path: Path,
    start_worker: Callable[..., LoggedProcess],
) -> None:
    """Free space below DISK_WARN_BYTES (but above the floor): a `WARNING disk:` line naming the host,
    the folder and the level, and `health` still exits 0; `--no-workers` (before a start) leaves it out."""
    configure(DOWNLOAD_DIR=str(tmp_path), DISK_WARN_BYTES=str(2**62))
    worker = start_worker()
    wait_for(lambda: json.loads(cli("stats", "--json").stdout)["queue"]["workers"] == 1, timeout=20, what=worker.log)
    result = cli("health")
    assert result.returncode == RET_OK, explain(result)
    warning, healthy = result.stdout.splitlines()
    assert warning.startswith(f"WARNING disk: {socket.gethostname()}: ") and str(tmp_path) in warning, warning
    assert "(DISK_WARN_BYTES)" in warning and healthy.startswith("healthy:"), result.stdout
    assert cli("health", "--no-workers").stdout.strip() == "healthy: redis ok, database ok"


def test_health_fails_below_the_disk_floor(
    healthy_env: Settings,
    configure: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Less free than DISK_HEADROOM (no download can go on): `UNHEALTHY disk:`, saying downloads fail. The
    disk's answer is faked at shutil.disk_usage."""
    configure(DOWNLOAD_DIR=str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**10, 10**10 - 10**8, 10**8))
    assert main(["health"]) == RET_UNHEALTHY
    out = capsys.readouterr().out
    assert {"disk", "workers"} == {line.split()[1].rstrip(":") for line in out.splitlines() if "UNHEALTHY" in line}
    assert "100.0 MB free of 10.0 GB (1%)" in out and "downloads fail" in out, out


def test_stats_show_each_hosts_download_disk(
    cli_backend: Backend, configure: Callable[..., Settings], redis_conn: Redis, tmp_path: Path
) -> None:
    """`stats --json` lists the download disk of every host that reported one, and this host's measured
    now; the table marks a low one."""
    configure(DOWNLOAD_DIR=str(tmp_path))
    far = report_far_host(redis_conn)
    stats = json.loads(cli("stats", "--json").stdout)
    disks = {item["host"]: item for item in stats["disks"]}
    assert disks["far-host"] == {**asdict(far), "level": "low"}
    here = disks[socket.gethostname()]
    assert here["path"] == str(tmp_path) and here["total"] == shutil.disk_usage(tmp_path).total
    table = cli("stats").stdout
    assert "far-host: 3.0 GB free of 100.0 GB (3%) on /srv/courses  LOW: below 10.0 GB" in table, table


def test_rq_info_lists_every_queue_a_worker_listens_on_from_its_start(
    healthy_env: Settings, redis_conn: Redis, start_worker: Callable[..., LoggedProcess]
) -> None:
    """Before any order: once a worker has started, `rq info` lists `downloads-high`, `downloads` and
    `webhooks` (RQ lists a queue only from its first enqueue otherwise)."""
    worker = start_worker()
    wait_for(lambda: json.loads(cli("stats", "--json").stdout)["queue"]["workers"] == 1, timeout=20, what=worker.log)
    info = rq_info("--url", healthy_env.redis_url, "-Q", env=clean_environ())
    listed = sorted(line.split()[0] for line in info.splitlines() if "|" in line)
    assert listed == ["downloads", "downloads-high", "webhooks"], info
