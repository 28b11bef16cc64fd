"""Fixtures of the multi-host suite: two "hosts" on one Redis and one MariaDB, and a Redis
Sentinel group that fails over. The code behind them is in tests/support/ (hosts.py, sentinel.py).

Two hosts (`two_hosts`, module scope):

- network namespaces `udl-host-a` and `udl-host-b`, each joined to the root namespace by a veth
  pair (10.213.1.0/24 and 10.213.2.0/24). Inside each, the root side of its own link answers to
  the names redis.internal, db.internal, origin.internal and hooks.internal
  (/etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts): both hosts run with one
  configuration, as the servers of one site do, and each reaches the services over its own link;
- in the root namespace: a redis-server bound to the two root-side addresses (and loopback, for
  the test itself), and TCP relays on those addresses to MariaDB (127.0.0.1:3306), the content
  origin and the webhook receiver (both on loopback);
- each host runs the real start_workers.sh through
  `ip netns exec <ns> unshare --uts sh -c 'hostname host-x && exec start_workers.sh'`, so it has
  its own hostname (workers `udemy-dl.host-a.N`, one reconciler per host) and its own PID_DIR,
  LOG_DIR and DOWNLOAD_DIR.

Sentinel (`sentinel_group`, per test): a master, one replica (`--replicaof`) and three Sentinels
(`redis-server sentinel.conf --sentinel`, quorum 2, down-after 1 s) on loopback ports, each with
its folder (Sentinels rewrite their config file) in the test's tmp dir.

Every process a test starts carries HOSTS_RUN_ID=<uuid> in its environment; teardown kills every
process in the namespaces and every marked process, then removes the veths, the namespaces and
/etc/netns/<ns>, also when the test failed. The suite holds a file lock while it runs (namespace
names and subnets are machine-wide) and first clears what an earlier run killed mid-way left.

Only collected with UDEMY_DL_FAULTS set (the suite is slow: `make test-faults`). A missing tool
(`ip`, `unshare`, redis-server), not being root, or no MariaDB skips, except under CI=true, where
it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devservers import WebhookReceiver
from tests.support.ci import unavailable
from tests.support.hosts import HOST_NETS, MARKER, TwoHosts, run
from tests.support.http_servers import Origin, serving
from tests.support.mariadb import HOSTS_DB, MYSQL_HOST, MYSQL_PORT, fresh_store, mysql_admin, require_database
from tests.support.measurements import write_summary
from tests.support.redis_servers import RedisServer
from tests.support.relay import Relay
from tests.support.scripts import clean_environ, venv_bin
from tests.support.sentinel import SentinelGroup, running_sentinel_group
from udemy_dl.webhooks import generate_secret

collect_ignore_glob = [] if os.environ.get("UDEMY_DL_FAULTS") else ["test_*.py"]
"""Slow (network namespaces, Sentinel failover, a host's workers expiring): only with UDEMY_DL_FAULTS=1."""

LOCK_FILE = Path(tempfile.gettempdir()) / "udemy-dl-hosts.lock"
LOCK_WAIT = 900.0
"""Seconds to wait for another run of this suite on the machine to finish."""


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    write_summary(terminalreporter, config, "hosts", "several hosts: measured times")


@pytest.fixture(scope="session")
def hosts_lock() -> Iterator[None]:
    """One run of this suite per machine at a time (namespace names and subnets are machine-wide)."""
    with open(LOCK_FILE, "a") as handle:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run of tests/hosts holds {LOCK_FILE} for more than {LOCK_WAIT:g} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """redis-server 7 from PATH (it runs the Sentinels too, with --sentinel)."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", "not on PATH")
    if not venv_bin("udemy-dl").is_file():
        unavailable("udemy-dl", f"no console script at {venv_bin('udemy-dl')} (run 'make install')")
    return binary


@pytest.fixture(scope="session")
def hosts_database(hosts_lock: None) -> Iterator[str]:
    """The database `udemy_dl_hosts` on the machine's MariaDB, dropped at the end of the session."""
    yield require_database(HOSTS_DB)
    with contextlib.suppress(Exception):
        mysql_admin(f"DROP DATABASE IF EXISTS {HOSTS_DB}")


@pytest.fixture(scope="session")
def netns_tools(hosts_lock: None) -> None:
    """Root, Linux, `ip` (iproute2) and `unshare`, and `ip netns add` works here."""
    if not sys.platform.startswith("linux"):
        unavailable("network namespaces", f"Linux only, this is {sys.platform}")
    if os.geteuid() != 0:
        unavailable("root", "network namespaces and veth pairs need root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            unavailable(tool, "not on PATH (install iproute2 / util-linux)")
    probe = f"udl-probe-{os.getpid()}"
    done = run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        unavailable("ip netns", f"cannot create a network namespace: {done.stderr.strip()}")
    run(["ip", "netns", "del", probe], check=False)
    for net in HOST_NETS:  # left by a run killed before its teardown
        net.remove()


@pytest.fixture(scope="module")
def two_hosts(
    netns_tools: None, redis_binary: str, hosts_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoHosts]:
    """Hosts A and B (namespaces, veths, names), with Redis, relays, origin, receiver and a fresh table."""
    tmp = tmp_path_factory.mktemp("two-hosts")
    run_id = uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        for net in HOST_NETS:
            stack.callback(net.remove)
            net.create()
        addresses = [net.root_ip for net in HOST_NETS]
        env = {**clean_environ(), MARKER: run_id}
        redis = RedisServer.server(redis_binary, tmp / "redis", env, (*addresses, "127.0.0.1"))
        stack.callback(redis.kill)
        redis.start()
        store = stack.enter_context(fresh_store(HOSTS_DB))
        origin = stack.enter_context(serving(Origin(tmp / "origin", token=uuid.uuid4().hex)))
        secret = generate_secret()
        receiver = stack.enter_context(serving(WebhookReceiver(secret)))
        relays = {
            "db": Relay((MYSQL_HOST, MYSQL_PORT), addresses, "db"),
            "origin": Relay(("127.0.0.1", int(origin.server.server_address[1])), addresses, "origin"),
            "hooks": Relay(("127.0.0.1", int(receiver.server.server_address[1])), addresses, "hooks"),
        }
        for relay in relays.values():
            stack.callback(relay.start().stop)
        world = TwoHosts(tmp, run_id, redis, relays, origin, receiver, secret, store)
        stack.callback(world.cleanup)
        yield world


@pytest.fixture
def sentinel_group(redis_binary: str, tmp_path: Path) -> Iterator[SentinelGroup]:
    with running_sentinel_group(redis_binary, tmp_path, uuid.uuid4().hex) as group:
        yield group
