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
WORKER_TITLE = re.compile(r"rq worker udemy_dl (?P<name>\S+): (?P<state>.*)")
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
    """`pgrep -f "rq worker"` restricted to this test's processes: worker name -> pids (work horses
    included). A worker's title reads `rq worker udemy_dl <name>: <state>`, its horse's the same."""
    return {name: [pid for pid, _ in found] for name, found in worker_titles(run_id).items()}


def worker_titles(run_id: str) -> dict[str, list[tuple[int, str]]]:
    """What `pgrep -f "rq worker"` finds of this test's processes: worker name -> (pid, state) of
    the worker and of its work horse."""
    done = subprocess.run(["pgrep", "-f", "rq worker"], capture_output=True, text=True, timeout=10)
    mine = set(marked_pids(MARKER, run_id))
    found: dict[str, list[tuple[int, str]]] = {}
    for raw in done.stdout.split():
        pid = int(raw)
        title = WORKER_TITLE.match(cmdline(pid))
        if pid in mine and title is not None:
            found.setdefault(title["name"], []).append((pid, title["state"]))
    return found


def worker_gauge(metrics_text: str) -> int:
    """The live workers the metrics page counts: the sum of `udemy_dl_workers{state=...}`."""
    return sum(int(float(value)) for value in re.findall(r"^udemy_dl_workers\{[^}]*\} (\S+)$", metrics_text, re.M))
