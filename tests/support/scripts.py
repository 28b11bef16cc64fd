"""The repository's programs as an operator runs them: the venv's console scripts, start_workers.sh
and stop_workers.sh with the PID files they keep, `rq info`; and the clean environment they get."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from udemy_dl.settings import VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO_ROOT / "start_workers.sh"
STOP_SCRIPT = REPO_ROOT / "stop_workers.sh"
UNIT_FILE = REPO_ROOT / "udemy-worker-rq.service"

RUN_MARKERS = ("E2E_RUN_ID", "FAULTS_RUN_ID", "HOSTS_RUN_ID")
"""The variables each suite marks the processes of one test (or world) with."""

CLEARED_VARIABLES = frozenset(
    {*VARIABLES, *RUN_MARKERS, "UDEMY_DL_BIN", "RQ_REDIS_URL", "RQ_CONFIG", "WEBHOOK_RETRY_INTERVALS"}
)
"""Never inherited from the caller by the programs a test runs: only what the test sets reaches them."""

RQ_INFO_WORKER = re.compile(r"^(\S+) \((\S+) \S+ (\d+)\): ", re.MULTILINE)
"""A worker line of `rq info`: `<name> (<hostname> <ip:port> <pid>): <state> <queues>. jobs: ...`."""


def venv_bin(name: str) -> Path:
    """A console script of the repo's venv (what the scripts use), else the one next to this Python."""
    candidate = REPO_ROOT / ".venv" / "bin" / name
    return candidate if candidate.is_file() else Path(sys.executable).with_name(name)


def cli_command() -> list[str]:
    """The installed `udemy-dl` script next to this interpreter, or `python -m udemy_dl`."""
    script = Path(sys.executable).with_name("udemy-dl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "udemy_dl"]


def clean_environ() -> dict[str, str]:
    """This process's environment without the service's settings (and unbuffered Python output); the
    scripts are told where `udemy-dl` is when the repo has no venv of its own."""
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    if not (REPO_ROOT / ".venv" / "bin" / "udemy-dl").is_file():
        env["UDEMY_DL_BIN"] = str(venv_bin("udemy-dl"))
    return env


def run_command(
    argv: Sequence[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run *argv* to its end, no standard input, its output captured as text."""
    return subprocess.run(
        [str(arg) for arg in argv],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def rq_info(*args: str, env: dict[str, str], cwd: Path | None = None) -> str:
    """`rq info ARGS` (the venv's); fails the test if it fails."""
    done = run_command([venv_bin("rq"), "info", *args], env=env, cwd=cwd, timeout=30)
    assert done.returncode == 0, f"rq info failed: {done.stdout}{done.stderr}"
    return done.stdout


def rq_info_workers(text: str) -> list[tuple[str, str, int]]:
    """(name, hostname, pid) of each worker an `rq info` output lists."""
    return [(name, host, int(pid)) for name, host, pid in RQ_INFO_WORKER.findall(text)]


def worker_pid_files(pid_dir: Path) -> list[Path]:
    """The PID files start_workers.sh wrote (`rq_worker_<n>.pid`)."""
    return sorted(pid_dir.glob("rq_worker_*.pid")) if pid_dir.is_dir() else []


def worker_pids(pid_dir: Path) -> dict[int, int]:
    """Worker number -> pid, from start_workers.sh's PID files."""
    found = {}
    for pid_file in worker_pid_files(pid_dir):
        text = pid_file.read_text().strip()
        if text.isdigit():
            found[int(pid_file.stem.rsplit("_", 1)[1])] = int(text)
    return found


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`udemy-dl ARGS` with this test's environment, in its working directory."""
    return run_command([*cli_command(), *args], env=dict(os.environ), cwd=Path.cwd())


def run_rq(*args: str) -> subprocess.CompletedProcess[str]:
    """RQ's own command line (the venv's `rq`), with this test's environment."""
    return run_command([venv_bin("rq"), *args], env=dict(os.environ), cwd=Path.cwd(), timeout=30)
