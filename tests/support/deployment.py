"""One installation of the service as an operator runs it: the environment its programs get and the
folders it names, its CLI, start_workers.sh / stop_workers.sh with their PID files, and `udemy-dl
pool` as the systemd unit runs it. Optionally inside a wrapper (a host's network namespace)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dev.devservers import ContentOrigin, WebhookReceiver

from .processes import LoggedProcess, cmdline, kill_tree, marked_pids, pid_running, set_child_subreaper, start_logged
from .processes import parent as parent_of
from .scripts import START_SCRIPT, STOP_SCRIPT, clean_environ, rq_info, run_command, venv_bin, worker_pid_files
from .scripts import worker_pids as read_worker_pids

FOLDERS = (("DOWNLOAD_DIR", "downloads"), ("FAILED_DIR", "failed"), ("LOG_DIR", "logs"), ("PID_DIR", "run"))
"""The folders the service writes to, and the name each gets below a test's own folder."""


def folder_settings(root: Path) -> dict[str, str]:
    """DOWNLOAD_DIR, FAILED_DIR, LOG_DIR and PID_DIR, each a folder of its own below *root*."""
    return {variable: str(root / name) for variable, name in FOLDERS}


def site_environ(marker: str, run_id: str, folder: Path, **settings: str) -> dict[str, str]:
    """The clean environment marked `<marker>=<run_id>`, the folders below *folder*, a stop timeout of
    10 s, retries after 1 s, and *settings*."""
    return {
        **clean_environ(),
        marker: run_id,
        "STOP_TIMEOUT": "10",
        "RETRY_DELAY": "1",
        **folder_settings(folder),
        **settings,
    }


def served_by(origin: ContentOrigin, receiver: WebhookReceiver, secret: str) -> dict[str, str]:
    """The settings that point the service at *origin* and *receiver* (signing with *secret*)."""
    return {
        "ALLOWED_HOSTS": origin.host_port,
        "CONTENT_TOKEN": origin.token or "",
        "API_SECRET_KEY": secret,
        "WEBHOOK_URL": receiver.url,
    }


class Deployment:
    """The service's programs run from *tmp* with the environment *vars* (inside *wrapper*, if any)."""

    def __init__(self, tmp: Path, vars: dict[str, str], wrapper: Sequence[str] = (), label: str = "") -> None:
        self.tmp = tmp
        self.vars = vars
        self.wrapper = list(wrapper)
        self.label = label

    def set_env(self, **variables: str) -> None:
        """Set environment variables for everything started from now on."""
        self.vars.update(variables)

    def with_vars(self, **extra: str) -> dict[str, str]:
        return {**self.vars, **extra}

    @property
    def download_dir(self) -> Path:
        return Path(self.vars["DOWNLOAD_DIR"])

    @property
    def log_dir(self) -> Path:
        return Path(self.vars["LOG_DIR"])

    @property
    def pid_dir(self) -> Path:
        return Path(self.vars["PID_DIR"])

    def run(self, *argv: str | Path, timeout: float = 90, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run *argv* to its end with this environment (and *extra*), its output captured."""
        return run_command([*self.wrapper, *argv], env=self.with_vars(**extra), cwd=self.tmp, timeout=timeout)

    def cli(self, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run `udemy-dl ARGS` (the venv's console script) with this environment."""
        return self.run(venv_bin("udemy-dl"), *args, timeout=timeout, **extra)

    def rq_info(self) -> str:
        return rq_info("--url", self.vars["REDIS_URL"], env=self.vars, cwd=self.tmp)

    def start_workers(self, count: int, timeout: float = 90) -> dict[int, int]:
        """start_workers.sh with WORKER_COUNT=*count*; returns worker number -> pid."""
        self.set_env(WORKER_COUNT=str(count))
        done = self.run(START_SCRIPT, timeout=timeout)
        assert done.returncode == 0, f"{self.label}start_workers.sh: {done.stdout}{done.stderr}\n{self.logs()}"
        pids = self.worker_pids()
        assert len(pids) == count, (pids, done.stdout)
        return pids

    def stop_script(self, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        """stop_workers.sh."""
        return self.run(STOP_SCRIPT, timeout=timeout, **extra)

    def worker_pids(self) -> dict[int, int]:
        """Worker number -> pid, from start_workers.sh's PID files."""
        return read_worker_pids(self.pid_dir)

    def launch_pool(self, count: int, log_path: Path) -> LoggedProcess:
        """`udemy-dl pool --count N` as the systemd unit's ExecStart runs it, in its own session (the unit's cgroup)."""
        argv = [*self.wrapper, str(venv_bin("udemy-dl")), "pool", "--count", str(count)]
        return start_logged(argv, self.vars, self.tmp, log_path)

    def logs(self, tail: int = 4000) -> str:
        """Every worker and reconciler log (the end of each), for assertion messages."""
        if not self.log_dir.is_dir():
            return f"== {self.label}(no logs)"
        return "\n".join(
            f"== {self.label}{p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.log_dir.iterdir())
        )


@dataclass
class Scripts:
    """start_workers.sh / stop_workers.sh of a deployment, remembering every worker they started."""

    site: Deployment
    seen_pids: set[int] = field(default_factory=set)
    adopted: set[int] = field(default_factory=set)

    def start(self, timeout: float = 60, adopt: bool = False, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run start_workers.sh. With *adopt*, the workers it leaves behind become this process's children
        (as they would be a container PID 1's), so the test decides when a killed one is reaped."""
        if adopt:
            set_child_subreaper(True)
        try:
            return self.site.run(START_SCRIPT, timeout=timeout, **extra)
        finally:
            if adopt:
                set_child_subreaper(False)
            for pid in self.pids().values():
                self.seen_pids.add(pid)
                if adopt and parent_of(pid) == os.getpid():
                    self.adopted.add(pid)

    def stop(self, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.site.stop_script(timeout, **extra)

    def reap(self, pid: int) -> None:
        """Collect an adopted worker that has died (blocks until it has)."""
        if pid in self.adopted:
            self.adopted.discard(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def pid_files(self) -> list[Path]:
        return worker_pid_files(self.site.pid_dir)

    def pids(self) -> dict[int, int]:
        """Worker number -> pid, from the PID files."""
        return self.site.worker_pids()

    def cleanup(self) -> None:
        """Stop the workers however it takes: the stop script, then SIGKILL to what the PID files named."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop(timeout=60)
        for pid in {*self.seen_pids, *self.pids().values()}:
            if pid_running(pid) and "udemy" in cmdline(pid):
                kill_tree(pid)
        for pid in list(self.adopted):
            self.reap(pid)
        for pid_file in self.pid_files():
            pid_file.unlink(missing_ok=True)


def leftovers(marker: str, run_id: str, exclude: Sequence[int] = ()) -> list[tuple[int, str]]:
    """(pid, command line) of each live process marked `<marker>=<run_id>` but *exclude*."""
    return [(pid, cmdline(pid)) for pid in marked_pids(marker, run_id) if pid not in exclude]
