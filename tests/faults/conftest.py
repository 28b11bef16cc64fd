"""Fixtures of the fault-injection suite: real forking workers, and services the test can break.
The code behind them is in tests/support/ (faults.py above all).

Each test owns its resources, so the suite never collides with `make test` or the e2e tests run at
the same time:

- its own `redis-server` on a free loopback port (data folder in tmp_path), which the test can
  stop, kill, restart on the same port, with or without persistence (AOF, fsync always);
- the database `udemy_dl_faults` on the machine's MariaDB, reached by the workers through an
  in-process TCP relay the test can cut (new connections refused, open ones dropped);
- a content origin (the dev server, bearer token, throttled, every request time-stamped) and a
  verifying webhook receiver, on free ports;
- workers started as operators start them: `start_workers.sh` / `stop_workers.sh`, or
  `udemy-dl pool` run exactly as the systemd unit's ExecStart runs it.

Every process a test starts carries FAULTS_RUN_ID=<uuid> in its environment; teardown kills
whatever is left. Recovery times are collected per scenario and printed as a table at the end of
the session. A missing Redis binary or MariaDB skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devservers import WebhookReceiver
from tests.support.ci import unavailable
from tests.support.faults import MARKER, Faults
from tests.support.http_servers import Origin
from tests.support.mariadb import FAULTS_DB, MYSQL_HOST, MYSQL_PORT, fresh_store, mysql_admin, named_lock
from tests.support.measurements import record, write_summary
from tests.support.redis_servers import RedisServer, require_redis_server
from tests.support.relay import Relay
from tests.support.scripts import clean_environ, venv_bin
from udemy_dl.store import MySQLStore


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[..., float]:
    """`measure(metric, seconds, limit=None, note="")`: print a recovery time and keep it for the summary."""

    def measured(metric: str, seconds: float, limit: float | None = None, note: str = "") -> float:
        return record(request.config, "faults", request.node.name.removeprefix("test_"), metric, seconds, limit, note)

    return measured


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    write_summary(terminalreporter, config, "faults", "fault injection: measured recovery times")


@pytest.fixture(scope="session")
def faults_services() -> str:
    """redis-server and the udemy-dl script are there; returns the redis-server binary."""
    binary = require_redis_server()
    if not venv_bin("udemy-dl").is_file():
        unavailable("udemy-dl", f"no console script at {venv_bin('udemy-dl')} (run 'make install')")
    return binary


@pytest.fixture(scope="session")
def faults_database() -> Iterator[str]:
    """The database this session owns: `udemy_dl_faults`, held with a MariaDB named lock for the
    session; if another fault run holds it, a private one (dropped at the end)."""
    with named_lock(FAULTS_DB) as got:
        name = FAULTS_DB if got else f"{FAULTS_DB}_{os.getpid()}"
        mysql_admin(f"CREATE DATABASE IF NOT EXISTS {name} CHARACTER SET utf8mb4")
        try:
            yield name
        finally:
            if name != FAULTS_DB:
                mysql_admin(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def redis_persistent() -> bool:
    """Override (indirect parametrisation or a module fixture) to run Redis with AOF persistence."""
    return False


@pytest.fixture
def fault_redis(faults_services: str, tmp_path: Path, run_id: str, redis_persistent: bool) -> Iterator[RedisServer]:
    env = {**clean_environ(), MARKER: run_id}
    server = RedisServer.server(faults_services, tmp_path / "redis", env, persistent=redis_persistent)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def db_proxy(faults_services: str) -> Iterator[Relay]:
    proxy = Relay((MYSQL_HOST, MYSQL_PORT)).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_store(faults_database: str) -> Iterator[MySQLStore]:
    """A fresh download_tasks table, reached directly (never through the proxy: a cut must not blind the test)."""
    with fresh_store(faults_database) as store:
        yield store


@pytest.fixture
def faults(
    tmp_path: Path,
    run_id: str,
    fault_redis: RedisServer,
    db_proxy: Relay,
    token_origin: Origin,
    receiver: WebhookReceiver,
    webhook_secret: str,
    faults_database: str,
    fault_store: MySQLStore,
) -> Iterator[Faults]:
    world = Faults(
        tmp_path,
        fault_redis,
        db_proxy,
        token_origin,
        receiver,
        webhook_secret,
        faults_database,
        fault_store,
        run_id,
    )
    try:
        yield world
    finally:
        world.cleanup()
