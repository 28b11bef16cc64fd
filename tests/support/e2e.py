"""The end-to-end tests' deployment: the real scripts and workers on the machine's Redis (DB 14) and
MariaDB (`udemy_dl_e2e`), every process a test starts marked `E2E_RUN_ID=<uuid>`."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from dev.devservers import WebhookReceiver
from udemy_dl.store import MySQLStore

from .deployment import Deployment
from .http_servers import Origin
from .processes import cmdline, marked_pids
from .scripts import rq_info_workers

MARKER = "E2E_RUN_ID"
HOSTNAME = socket.gethostname()


class E2EEnv(Deployment):
    """The environment one test's scripts and workers run with (environment variables win over .env)."""

    def __init__(
        self, tmp: Path, run_id: str, vars: dict[str, str], store: MySQLStore, origin: Origin, receiver: WebhookReceiver
    ) -> None:
        super().__init__(tmp, vars)
        self.run_id = run_id
        self.store = store
        self.origin = origin
        self.receiver = receiver

    def leftover_processes(self) -> list[int]:
        return marked_pids(MARKER, self.run_id)


def host_workers(rq_info: str) -> dict[str, int]:
    """This host's udemy-dl workers in `rq info` output: name -> pid.

    A worker line reads `udemy-dl.<host>.<n> (<host> <ip:port> <pid>): idle webhooks, downloads. ...`.
    """
    mine = re.compile(rf"udemy-dl\.{re.escape(HOSTNAME)}\.\d+")
    return {name: pid for name, _, pid in rq_info_workers(rq_info) if mine.fullmatch(name)}


def worker_pids_by_name(run_id: str) -> dict[str, list[int]]:
    """`pgrep -f "udemy-dl worker"` restricted to this test's processes: worker name -> pids (horses included)."""
    done = subprocess.run(["pgrep", "-f", "udemy-dl worker --name"], capture_output=True, text=True, timeout=10)
    mine = set(marked_pids(MARKER, run_id))
    found: dict[str, list[int]] = {}
    for raw in done.stdout.split():
        pid = int(raw)
        if pid not in mine:
            continue
        parts = cmdline(pid).split()
        if "--name" in parts:
            found.setdefault(parts[parts.index("--name") + 1], []).append(pid)
    return found
