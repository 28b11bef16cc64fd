"""Several hosts on one machine: network namespaces `udl-host-a` and `udl-host-b`, each joined to the
root namespace by a veth pair (10.213.1.0/24 and 10.213.2.0/24), each resolving the service names
(redis.internal, db.internal, origin.internal, hooks.internal) to the root side of its own link;
each runs the real start_workers.sh with its own hostname and folders. Every process marked
HOSTS_RUN_ID=<uuid>."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from rq.job import Job

from dev.devservers import WebhookReceiver
from udemy_dl.store import PROCESSING, MySQLStore, TaskRow

from .deployment import Deployment, site_environ
from .http_servers import Origin, Task, completed_ids, make_tasks
from .mariadb import HOSTS_DB, database_url
from .processes import kill_marked, kill_pids
from .redis_servers import RedisServer
from .relay import Relay
from .rq_state import download_job
from .scripts import clean_environ, rq_info, rq_info_workers, run_command

MARKER = "HOSTS_RUN_ID"
"""Environment variable carried by every process the suite starts (value: a uuid per world)."""

NETNS_ETC = Path("/etc/netns")
SERVICE_NAMES = ("redis.internal", "db.internal", "origin.internal", "hooks.internal")
"""Names each host resolves to the root side of its own link."""


def run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a system command (ip, ...); with *check*, fail with its output."""
    done = run_command(argv, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


@dataclass(frozen=True)
class HostNet:
    """One host's network namespace and its veth link to the root namespace (named after *letter*)."""

    letter: str
    subnet: int

    @property
    def netns(self) -> str:
        return f"udl-host-{self.letter}"

    @property
    def hostname(self) -> str:
        return f"host-{self.letter}"

    def veth(self, side: str) -> str:
        """The veth pair's end on *side* (`root` or `host`)."""
        return f"udl-{self.letter}-{side}"

    def ip(self, last: int) -> str:
        """An address of the link: .1 is the root namespace's side (where this host finds Redis, MariaDB,
        the origin...), .2 the host's."""
        return f"10.213.{self.subnet}.{last}"

    @property
    def root_ip(self) -> str:
        return self.ip(1)

    def exists(self) -> bool:
        return self.netns in run(["ip", "netns", "list"], check=False).stdout.split()

    def pids(self) -> list[int]:
        """Every process in the namespace (`ip netns pids`)."""
        if not self.exists():
            return []
        done = run(["ip", "netns", "pids", self.netns], check=False)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def kill_everything(self, timeout: float = 15) -> list[int]:
        """SIGKILL every process in the namespace until none is left (a worker may fork meanwhile)."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.netns}: processes survive SIGKILL: {pids}")
            kill_pids(pids)
            killed += [pid for pid in pids if pid not in killed]
            time.sleep(0.05)
        return killed

    def create(self) -> None:
        root, host = self.veth("root"), self.veth("host")
        commands = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", root, "type", "veth", "peer", "name", host, "netns", self.netns],
            ["ip", "addr", "add", f"{self.root_ip}/24", "dev", root],
            ["ip", "link", "set", root, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.ip(2)}/24", "dev", host],
            ["ip", "-n", self.netns, "link", "set", host, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]
        for command in commands:
            run(command)
        folder = NETNS_ETC / self.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {self.hostname}\n{self.root_ip} {' '.join(SERVICE_NAMES)}\n"
        )

    def remove(self) -> None:
        """Kill what runs in the namespace, delete the veth pair and the namespace, and /etc/netns/<ns>."""
        with contextlib.suppress(AssertionError):
            self.kill_everything()
        run(["ip", "link", "del", self.veth("root")], check=False)
        if self.exists():
            run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(NETNS_ETC / self.netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty: someone else's namespaces keep theirs


HOST_NETS = (HostNet("a", 1), HostNet("b", 2))


class Host(Deployment):
    """A server of the site: a namespace with its own hostname, folders and start_workers.sh."""

    def __init__(self, net: HostNet, folder: Path, env: dict[str, str]) -> None:
        inner = 'hostname "$0" && exec "$@"'
        wrapper = ["ip", "netns", "exec", net.netns, "unshare", "--uts", "sh", "-c", inner, net.hostname]
        super().__init__(folder, env, wrapper, label=f"{net.hostname}/")
        self.net = net

    @property
    def hostname(self) -> str:
        return self.net.hostname

    @property
    def worker_prefix(self) -> str:
        return f"udemy-dl.{self.hostname}."


class TwoHosts:
    """Hosts A and B on one Redis and one MariaDB, with the content origin and the webhook receiver."""

    def __init__(
        self,
        tmp: Path,
        run_id: str,
        redis: RedisServer,
        relays: dict[str, Relay],
        origin: Origin,
        receiver: WebhookReceiver,
        secret: str,
        store: MySQLStore,
    ) -> None:
        self.tmp = tmp
        self.run_id = run_id
        self.redis_server = redis
        self.relays = relays
        self.origin = origin
        self.receiver = receiver
        self.store = store
        self.redis: Redis = redis.client(timeout=10)
        shared = {
            "REDIS_URL": f"redis://redis.internal:{redis.port}/0",
            "DATABASE_URL": database_url(HOSTS_DB, relays["db"].port, "db.internal"),
            "ALLOWED_HOSTS": f"origin.internal:{relays['origin'].port}",
            "CONTENT_TOKEN": origin.token or "",
            "API_SECRET_KEY": secret,
            "WEBHOOK_URL": f"http://hooks.internal:{relays['hooks'].port}/webhooks/downloads",
            "MAX_ATTEMPTS": "3",
        }
        self.hosts: dict[str, Host] = {}
        for net in HOST_NETS:
            folder = tmp / net.hostname
            folder.mkdir(parents=True, exist_ok=True)
            self.hosts[net.letter] = Host(net, folder, site_environ(MARKER, run_id, folder, **shared))
        root_env = {**clean_environ(), MARKER: run_id, "STOP_TIMEOUT": "10", "RETRY_DELAY": "1", **shared}
        self.root = Deployment(tmp, {**root_env, "REDIS_URL": redis.url, "DATABASE_URL": database_url(HOSTS_DB)})
        """The payment service's view, from the root namespace."""

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    @property
    def origin_base(self) -> str:
        """The content origin as every host names it."""
        return f"http://origin.internal:{self.relays['origin'].port}"

    # -- tasks ------------------------------------------------------------------------------

    def make_tasks(self, count: int, size: int, prefix: str = "course") -> list[Task]:
        """*count* one-file courses of *size* bytes, and a `pending` row per course."""
        return make_tasks(self.origin, self.store, count, size, prefix, base_url=self.origin_base)

    def pay(self, tasks: Sequence[Task], priority: str = "normal") -> None:
        done = self.root.cli("confirm-payment", "--json", "--priority", priority, *(str(task.id) for task in tasks))
        assert done.returncode == 0, done.stdout + done.stderr

    def rows(self, tasks: Sequence[Task]) -> dict[int, TaskRow]:
        return {row.id: row for row in self.store.get_many([task.id for task in tasks])}

    def job(self, task: Task) -> Job | None:
        return download_job(self.redis, task.id)

    def rq_info_workers(self) -> dict[str, str]:
        """The udemy-dl workers `rq info` (from the root namespace, through host A's link address) lists:
        name -> hostname."""
        url = f"redis://{self.a.net.root_ip}:{self.redis_server.port}/0"
        listed = rq_info_workers(rq_info("--url", url, env=clean_environ()))
        return {name: host for name, host, _ in listed if name.startswith("udemy-dl.")}

    def completed_ids(self) -> dict[int, set[str]]:
        """taskId -> distinct webhook ids of verified download.completed events."""
        return completed_ids(self.receiver)

    def processing_ids(self) -> list[int]:
        return self.store.ids_with_status(PROCESSING)

    def logs(self) -> str:
        return "\n".join(host.logs(3000) for host in self.hosts.values())

    def cleanup(self) -> None:
        for host in self.hosts.values():
            if host.net.pids():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    host.stop_script(timeout=60)
        for net in HOST_NETS:
            net.remove()
        server_pid = self.redis_server.process.pid if self.redis_server.process else 0
        kill_marked(MARKER, self.run_id, keep=[server_pid])
        self.redis.close()
