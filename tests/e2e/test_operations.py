"""Operating the service: the scripts refuse bad config and never start a worker twice; the unit verifies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from redis import Redis

from dev.devservers import WebhookReceiver, write_sample_file
from tests.support.ci import unavailable
from tests.support.deployment import Scripts
from tests.support.e2e import HOSTNAME, E2EEnv, host_workers, worker_pids_by_name
from tests.support.files import sha256_of
from tests.support.http_servers import Origin, completed_ids
from tests.support.mariadb import E2E_DB, drop_tasks_table
from tests.support.processes import parent, pid_running
from tests.support.scripts import CLEARED_VARIABLES, REPO_ROOT, STOP_SCRIPT, UNIT_FILE, venv_bin
from tests.support.waiting import wait_for
from udemy_dl.store import COMPLETED, PROCESSING, MySQLStore

pytestmark = pytest.mark.e2e


def test_start_twice_does_not_duplicate(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    first = e2e_scripts.start(WORKER_COUNT="2")
    assert first.returncode == 0, first.stdout + first.stderr + e2e_env.logs()
    pids = e2e_scripts.pids()
    assert sorted(pids) == [1, 2]
    expected = {f"udemy-dl.{HOSTNAME}.{n}": pid for n, pid in pids.items()}
    assert host_workers(e2e_env.rq_info()) == expected

    second = e2e_scripts.start(WORKER_COUNT="2")
    assert second.returncode == 0, second.stdout + second.stderr
    for number, pid in pids.items():
        assert f"worker {number} already running (pid {pid})" in second.stdout
    assert "started (pid" not in second.stdout
    assert e2e_scripts.pids() == pids, "the PID files must still name the first workers"
    assert all(pid_running(pid) for pid in pids.values())

    # Exactly two worker processes (their RQ scheduler children share the command line) and two registrations.
    running = worker_pids_by_name(e2e_env.run_id)
    assert set(running) == set(expected)
    ours = {pid for found in running.values() for pid in found}
    assert {pid for pid in ours if parent(pid) not in ours} == set(pids.values())
    info = e2e_env.rq_info()
    assert host_workers(info) == expected, "still the same two workers"
    assert re.search(r"^2 workers, ", info, re.MULTILINE), info

    stopped = e2e_scripts.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not e2e_scripts.pid_files()
    assert not any(pid_running(pid) for pid in pids.values())
    assert e2e_env.leftover_processes() == []


def test_bad_config_stops_startup(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    done = e2e_scripts.start(WORKER_COUNT="abc")
    assert done.returncode != 0
    assert "WORKER_COUNT" in done.stderr
    assert "abc" in done.stderr
    assert "started" not in done.stdout
    assert e2e_scripts.pid_files() == []
    assert e2e_env.leftover_processes() == []


def _nothing_started(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    assert e2e_scripts.pid_files() == []
    assert not (e2e_env.pid_dir / "reconciler.pid").exists()
    assert e2e_env.leftover_processes() == []


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("DATABASE_URL", f"mysql://root@127.0.0.1:1/{E2E_DB}", "database"),
        ("REDIS_URL", "redis://127.0.0.1:1/0", "redis"),
    ],
    ids=["database", "redis"],
)
def test_start_with_a_service_unreachable_starts_nothing(
    e2e_env: E2EEnv, e2e_scripts: Scripts, variable: str, value: str, named: str
) -> None:
    """Redis or the database down: start_workers.sh checks both before starting anything and exits 7
    (RET_UNREACHABLE) naming the one that does not answer; no worker, no reconciler, no PID file."""
    done = e2e_scripts.start(60, False, **{variable: value})
    assert done.returncode == 7, done.stdout + done.stderr
    assert f"UNHEALTHY {named}:" in done.stderr and "nothing was started" in done.stderr, done.stderr
    assert "started (pid" not in done.stdout
    _nothing_started(e2e_env, e2e_scripts)


def test_start_without_the_tasks_table_starts_nothing(e2e_env: E2EEnv, e2e_scripts: Scripts) -> None:
    """The database answers but `db init` never ran on it: start_workers.sh exits 7 naming the
    missing table and the command that creates it, and starts nothing (a worker would only burn
    its retries on every task)."""
    drop_tasks_table(E2E_DB)
    done = e2e_scripts.start(60, False)
    assert done.returncode == 7, done.stdout + done.stderr
    assert "UNHEALTHY database:" in done.stderr, done.stderr
    assert "table download_tasks missing: run `udemy-dl db init`" in done.stderr, done.stderr
    assert "nothing was started" in done.stderr and "started (pid" not in done.stdout
    _nothing_started(e2e_env, e2e_scripts)


def test_a_failed_start_leaves_nothing_running(e2e_env: E2EEnv, e2e_scripts: Scripts, tmp_path: Path) -> None:
    """When one worker does not start, start_workers.sh exits 6 and stops again everything it had
    started (the other worker and the reconciler), removing their PID files."""
    wrapper = tmp_path / "bin" / "udemy-dl"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "${1-}" == worker && "${3-}" == *.2 ]]; then echo "worker 2: simulated failure" >&2; exit 1; fi\n'
        f'exec {venv_bin("udemy-dl")} "$@"\n'
    )
    wrapper.chmod(0o755)
    done = e2e_scripts.start(WORKER_COUNT="2", UDEMY_DL_BIN=str(wrapper))
    assert done.returncode == 6, done.stdout + done.stderr + e2e_env.logs()
    assert "worker 2 failed to start" in done.stderr and "simulated failure" in done.stderr
    _nothing_started(e2e_env, e2e_scripts)
    assert "stopping the 3 process(es) this run started" in done.stderr, done.stderr


def test_stop_needs_nothing_but_the_pid_files(e2e_env: E2EEnv, e2e_scripts: Scripts, tmp_path: Path) -> None:
    """stop_workers.sh stops the workers whatever else .env and the environment hold: it reads PID_DIR
    (and STOP_TIMEOUT, falling back to its default with a warning) and needs no udemy-dl to do it."""
    started = e2e_scripts.start(WORKER_COUNT="1")
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    pids = [*e2e_scripts.pids().values(), int((e2e_env.pid_dir / "reconciler.pid").read_text())]
    assert len(pids) == 2 and all(pid_running(pid) for pid in pids)

    # The script as installed elsewhere, with its own .env holding the PID_DIR and bad values around it.
    install = tmp_path / "install"
    install.mkdir()
    stop = install / STOP_SCRIPT.name
    shutil.copy2(STOP_SCRIPT, stop)
    (install / ".env").write_text(
        "# operator's settings\n"
        "WORKER_COUNT=abc\n"
        "REDIS_URL=redis://:s3c/ret@cache.example:6379/ten\n"
        f'export PID_DIR = "{e2e_env.pid_dir}"   # where start_workers.sh wrote them\n'
        "STOP_TIMEOUT=soon\n"
        "QUEUE_NAME=bad name!\n"
    )
    env = {key: value for key, value in e2e_env.vars.items() if key not in ("PID_DIR", "STOP_TIMEOUT")}
    env.update(WORKER_COUNT="0", DATABASE_URL="postgres://nope", UDEMY_DL_BIN="/nonexistent/udemy-dl")
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run([str(stop)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "STOP_TIMEOUT" in done.stderr and "using 30" in done.stderr, done.stderr
    assert "sent SIGTERM to 2 process(es)" in done.stdout and "all workers stopped" in done.stdout, done.stdout
    assert "s3c" not in done.stdout + done.stderr
    assert list(e2e_env.pid_dir.glob("*.pid")) == []
    assert not any(pid_running(pid) for pid in pids)
    assert e2e_env.leftover_processes() == []


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    """A systemd time span (e.g. 40, 40s, 1min 30s) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    shipped = UNIT_FILE.read_text()
    settings = _unit_settings(shipped)

    # What the operator relies on, as shipped.
    assert settings.get("User") and settings["User"][0] not in ("root", "0")
    assert settings.get("KillMode") == ["mixed"]
    assert settings.get("Restart") == ["always"]
    assert settings.get("TimeoutStopSec") and _seconds(settings["TimeoutStopSec"][0]) >= 30
    assert any(value.endswith("udemy-dl pool") for value in settings["ExecStart"])

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze", "not on PATH")

    env_file = tmp_path / "udemy_dl.env"
    env_file.write_text("REDIS_URL=redis://127.0.0.1:6379/14\n")
    udemy_dl = str(venv_bin("udemy-dl"))
    lines = []
    for line in shipped.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("Exec"):
            value = re.sub(r"/opt/udemy_dl/\.venv/bin/udemy-dl", udemy_dl, value)
        elif sep and key == "EnvironmentFile":
            value = ("-" if value.startswith("-") else "") + str(env_file)
        if sep:
            value = value.replace("/opt/udemy_dl", str(REPO_ROOT))
            line = f"{key}={value}"
        lines.append(line)
    unit = tmp_path / UNIT_FILE.name
    unit.write_text("\n".join(lines) + "\n")
    assert "/opt/udemy_dl" not in unit.read_text()

    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, f"systemd-analyze verify failed:\n{done.stdout}{done.stderr}"
    assert "is not executable" not in done.stderr

    # The check has teeth: the same unit with a missing binary does not verify.
    broken = tmp_path / "broken-udemy-worker-rq.service"
    broken.write_text(unit.read_text().replace(f"ExecStart={udemy_dl}", "ExecStart=/nonexistent/udemy-dl"))
    failed = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0


def test_systemd_unit_does_not_restart_a_configuration_error(tmp_path: Path) -> None:
    """Exit 3 (configuration error) must reach RestartPreventExitStatus=3: systemd applies it to the
    main process only, so no ExecStartPre may be able to fail the start (a `-` prefix ignores its
    status), and the main process itself exits 3 on a bad value."""
    settings = _unit_settings(UNIT_FILE.read_text())
    assert "3" in " ".join(settings.get("RestartPreventExitStatus", [])).split()
    assert all(value.startswith("-") for value in settings.get("ExecStartPre", [])), settings["ExecStartPre"]
    (exec_start,) = settings["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == "/opt/udemy_dl/.venv/bin/udemy-dl", argv
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_VARIABLES}
    for bad in ({"REDIS_URL": "redis://127.0.0.1:6379/ten"}, {"DATABASE_URL": "mysql://u:pw@db.example:port/x"}):
        done = subprocess.run(
            [str(venv_bin("udemy-dl")), *argv[1:]],
            env={**env, **bad},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        (variable,) = bad
        assert done.returncode == 3, (bad, done.stdout, done.stderr)
        assert variable in done.stderr and "Traceback" not in done.stderr


def test_stop_hands_a_running_download_back(
    e2e_env: E2EEnv,
    e2e_scripts: Scripts,
    e2e_store: MySQLStore,
    token_origin: Origin,
    receiver: WebhookReceiver,
    e2e_redis: Redis,
) -> None:
    """stop_workers.sh hands a download under way back to the queue at once, without using up an
    attempt; the next start resumes it from its bytes (a Range request) and completes it once."""
    size = 20 * 1024 * 1024
    url_path = "/files/finishing/lecture.mp4"
    sha = write_sample_file(token_origin.file_path(url_path), size, "finishing")
    token_origin.throttle = 4 * 1024 * 1024  # about 5 s for the file
    task_id = e2e_store.insert_task("buyer@example.com", f"{token_origin.base_url}{url_path}")
    e2e_env.vars.update(WORKER_COUNT="1", STOP_TIMEOUT="20")
    started = e2e_scripts.start()
    assert started.returncode == 0, started.stdout + started.stderr + e2e_env.logs()
    assert e2e_env.cli("confirm-payment", str(task_id)).returncode == 0

    def under_way() -> bool:
        row = e2e_store.get(task_id)
        return bool(row and row.progress > 0)

    wait_for(under_way, timeout=30, what="the download to be under way", interval=0.05)

    began = time.monotonic()
    stopped = e2e_scripts.stop()
    elapsed = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "killed" not in stopped.stdout and elapsed < 5, (elapsed, stopped.stdout)
    assert e2e_scripts.pid_files() == [] and e2e_env.leftover_processes() == []
    assert "Traceback" not in e2e_env.logs(tail=1_000_000), "a warm stop is not a crash: " + e2e_env.logs()

    row = e2e_store.get(task_id)
    assert row is not None and row.status == PROCESSING and row.attempts == 0, e2e_env.logs()
    queued = [job_id.decode() for job_id in e2e_redis.lrange("rq:queue:downloads", 0, -1)]  # type: ignore[union-attr]
    assert queued == [f"download-{task_id}"], e2e_env.logs()

    restarted = e2e_scripts.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr

    def completed() -> bool:
        current = e2e_store.get(task_id)
        return current is not None and current.status == COMPLETED

    wait_for(completed, timeout=30, what="the task to complete", interval=0.1)
    row = e2e_store.get(task_id)
    assert row is not None and row.attempts == 1
    assert sha256_of(e2e_env.download_dir / str(task_id) / "lecture.mp4") == sha
    ranges = [headers.get("Range") for _, path, headers in token_origin.requests.entries if path == url_path]
    assert len(ranges) == 2 and ranges[0] is None and (ranges[1] or "").startswith("bytes="), ranges
    wait_for(lambda: task_id in completed_ids(receiver), timeout=20, what="the completed webhook", interval=0.1)
    assert len(completed_ids(receiver)[task_id]) == 1
