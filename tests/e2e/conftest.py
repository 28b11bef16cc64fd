"""Fixtures of the end-to-end tests: real Redis (DB 14), real MariaDB (`udemy_dl_e2e`), the real
scripts. The code behind them is in tests/support/ (e2e.py, deployment.py).

Every process a test starts carries `E2E_RUN_ID=<uuid>` in its environment, so teardown can find
and kill whatever is left (workers, work horses, schedulers) even when the scripts misbehave,
and a test can prove that nothing of its own outlived a stop.

A missing Redis or MariaDB skips these tests with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from dev.devservers import WebhookReceiver
from tests.support.ci import unavailable
from tests.support.deployment import Scripts, served_by, site_environ
from tests.support.e2e import MARKER, E2EEnv
from tests.support.http_servers import Origin
from tests.support.mariadb import E2E_DB, database_url, fresh_store, require_database
from tests.support.processes import kill_marked
from tests.support.redis_servers import E2E_REDIS_URL, flushed_client, require_redis
from tests.support.scripts import clean_environ, run_command, venv_bin
from udemy_dl.store import MySQLStore


@pytest.fixture(scope="session")
def e2e_services() -> None:
    """Redis and MariaDB answer, and the e2e database exists (skip or, under CI=true, fail)."""
    require_redis(E2E_REDIS_URL)
    require_database(E2E_DB)
    if not Path("/proc/self/stat").is_file():
        unavailable("/proc", "these tests read process state from /proc (Linux)")
    if not venv_bin("udemy-dl").is_file():
        unavailable("udemy-dl", f"no console script at {venv_bin('udemy-dl')} (run 'make install')")


@pytest.fixture
def e2e_redis(e2e_services: None) -> Iterator[Redis]:
    """A client on Redis DB 14, flushed before and after the test."""
    with flushed_client(E2E_REDIS_URL) as connection:
        yield connection


@pytest.fixture
def e2e_store(e2e_services: None, tmp_path: Path) -> Iterator[MySQLStore]:
    """A fresh download_tasks table in `udemy_dl_e2e`, created by `udemy-dl db init`."""

    def db_init() -> None:
        env = {**clean_environ(), "DATABASE_URL": database_url(E2E_DB)}
        done = run_command([venv_bin("udemy-dl"), "db", "init"], env=env, cwd=tmp_path)
        assert done.returncode == 0, f"udemy-dl db init failed: {done.stdout}{done.stderr}"

    with fresh_store(E2E_DB, db_init) as store:
        yield store


@pytest.fixture
def e2e_env(
    tmp_path: Path,
    e2e_redis: Redis,
    e2e_store: MySQLStore,
    token_origin: Origin,
    receiver: WebhookReceiver,
    webhook_secret: str,
) -> Iterator[E2EEnv]:
    """Settings for this test, all folders in tmp_path; at teardown, anything still running is killed."""
    run_id = uuid.uuid4().hex
    env = site_environ(
        MARKER,
        run_id,
        tmp_path,
        REDIS_URL=E2E_REDIS_URL,
        DATABASE_URL=database_url(E2E_DB),
        WORKER_COUNT="2",
        **served_by(token_origin, receiver, webhook_secret),
    )
    e2e = E2EEnv(tmp_path, run_id, env, e2e_store, token_origin, receiver)
    yield e2e
    kill_marked(MARKER, run_id)  # last resort: whatever this test started and is still alive goes now


@pytest.fixture
def e2e_scripts(e2e_env: E2EEnv) -> Iterator[Scripts]:
    """start_workers.sh / stop_workers.sh, run from the repo root with the test's environment."""
    scripts = Scripts(e2e_env)
    yield scripts
    scripts.cleanup()
