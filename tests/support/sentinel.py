"""A Redis Sentinel group on loopback: a master, one replica (`--replicaof`) and three Sentinels
(quorum 2, down-after 1 s), each with its folder (Sentinels rewrite their config file)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from .hosts import MARKER
from .processes import kill_marked
from .redis_servers import RedisServer
from .scripts import clean_environ
from .waiting import wait_for

MASTER_NAME = "mymaster"


def sentinel_command(client: Redis, *args: str) -> Any:
    """`SENTINEL <args>` (raw reply: redis-py's sentinel helpers are untyped)."""
    return client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]


@dataclass
class SentinelGroup:
    """A master, one replica and three Sentinels watching them (quorum 2), all on loopback."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer] = field(default_factory=list)

    @property
    def sentinels_setting(self) -> str:
        """REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it (`get-master-addr-by-name`)."""
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            client = sentinel.client(timeout=2)
            try:
                reply = sentinel_command(client, "get-master-addr-by-name", MASTER_NAME)
            except Exception:
                continue
            finally:
                client.close()
            if reply:
                return int(reply[1])
        return None

    def wait_ready(self, timeout: float = 30) -> None:
        """Each Sentinel knows the replica and the two other Sentinels, and can authorise a failover."""

        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client(timeout=2)
                try:
                    replicas = sentinel_command(client, "replicas", MASTER_NAME)
                    others = sentinel_command(client, "sentinels", MASTER_NAME)
                    sentinel_command(client, "ckquorum", MASTER_NAME)
                except Exception:
                    return False
                finally:
                    client.close()
                linked = [
                    entry
                    for entry in replicas
                    if dict(zip(entry[::2], entry[1::2], strict=True)).get(b"master-link-status") == b"ok"
                ]
                if not linked or len(others) != 2:
                    return False
            return True

        wait_for(ready, timeout=timeout, interval=0.2, what=lambda: f"the Sentinels to be ready\n{self.logs()}")

    def wait_failover(self, old_port: int, timeout: float = 60) -> int:
        """Wait until the Sentinels name a master other than *old_port*; return its port."""

        def promoted() -> int:
            port = self.master_port()
            return port if port is not None and port != old_port else 0

        return wait_for(promoted, timeout=timeout, interval=0.05, what=lambda: f"a failover\n{self.logs()}")

    def logs(self) -> str:
        parts = [("master", self.master), ("replica", self.replica)]
        parts += [(f"sentinel-{n + 1}", sentinel) for n, sentinel in enumerate(self.sentinels)]
        return "\n".join(f"== {name}\n{process.log(1500)}" for name, process in parts)

    def processes(self) -> list[RedisServer]:
        return [*self.sentinels, self.master, self.replica]

    def kill(self) -> None:
        for process in self.processes():
            process.kill()


@contextlib.contextmanager
def running_sentinel_group(binary: str, folder: Path, run_id: str) -> Iterator[SentinelGroup]:
    """Start a master, its replica and three Sentinels; kill them all (and every process marked
    *run_id*) on the way out."""
    env = {**clean_environ(), MARKER: run_id}
    master = RedisServer.server(binary, folder / "master", env)
    replica = RedisServer.server(binary, folder / "replica", env, extra=("--replicaof", "127.0.0.1", str(master.port)))
    group = SentinelGroup(master, replica)
    try:
        master.start()
        replica.start()
        for n in range(3):
            sentinel = RedisServer.sentinel(binary, folder / f"sentinel-{n + 1}", env, MASTER_NAME, master.port)
            group.sentinels.append(sentinel)
            sentinel.start()
        group.wait_ready()
        yield group
    finally:
        kill_marked(MARKER, run_id, keep=[process.process.pid for process in group.processes() if process.process])
        group.kill()
