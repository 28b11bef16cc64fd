"""Fixtures of the main suite: real Redis (DB 15) and MariaDB (`udemy_dl_test`), local origin and
receiver, isolated settings. The code behind them is in tests/support/.

A missing Redis or MariaDB skips the tests that need it with the reason shown, except under
CI (CI=true, =1, =yes...: see tests/support/ci.py), where it is a failure. Every test runs in its own
empty folder with the service's settings variables cleared, so neither the caller's environment
nor a `.env` in the checkout can leak in.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker

from dev.devservers import ContentOrigin, WebhookReceiver
from tests.support.deployment import folder_settings
from tests.support.horses import HorseWorld, TricklingReceiver
from tests.support.http_servers import Origin, serving
from tests.support.intake import Intake, LogRecords, capture_intake_log, start_intake
from tests.support.mariadb import TEST_DB, TEST_URL, drop_tasks_table, require_database
from tests.support.processes import LoggedProcess
from tests.support.redis_servers import TEST_REDIS_URL, RedisServer, flushed_client, require_redis, require_redis_server
from tests.support.service import (
    Backend,
    BusyWorker,
    Rig,
    Service,
    logging_kept,
    make_service,
    reset_process_state,
    start_worker_process,
)
from udemy_dl.settings import VARIABLES, Settings, get_settings
from udemy_dl.store import MySQLStore, SQLiteStore
from udemy_dl.webhooks import generate_secret

collect_ignore = [] if os.environ.get("UDEMY_DL_FAULTS") else ["faults", "hosts"]
"""The fault-injection suite is long: `make test-faults` runs it (UDEMY_DL_FAULTS=1), `make test` does not."""


# -- environment --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Clear the service's variables, point folders into tmp_path, use Redis DB 15, run in tmp_path."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    for variable, folder in folder_settings(tmp_path).items():
        monkeypatch.setenv(variable, folder)
    monkeypatch.chdir(tmp_path)
    reset_process_state()
    with logging_kept():
        yield tmp_path
    reset_process_state()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Set environment variables for this test and return the settings the job code will now see."""

    def apply(**variables: str) -> Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        reset_process_state()
        return get_settings()

    return apply


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """The staging folder of task 1 (a fetcher's destination)."""
    return tmp_path / "downloads" / ".staging" / "1"


# -- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_redis(TEST_REDIS_URL)


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Redis]:
    """A client on Redis DB 15, flushed before and after the test."""
    with flushed_client(redis_url) as connection:
        yield connection


@pytest.fixture
def workers_here(redis_conn: Redis) -> Iterator[list[Worker]]:
    """RQ workers registered by this (live) test process; their deaths are registered at teardown."""
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.register_death()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (no persistence), so it can be restarted without disturbing anyone."""
    server = RedisServer.server(require_redis_server(), tmp_path / "private-redis")
    server.start()
    yield server
    server.stop()


# -- MariaDB / SQLite ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The test database `udemy_dl_test`, created once per session."""
    require_database(TEST_DB)
    return TEST_URL


@pytest.fixture
def mysql_store(mysql_url: str) -> Iterator[MySQLStore]:
    """A MySQLStore on a freshly created download_tasks table."""
    drop_tasks_table()
    store = MySQLStore(mysql_url)
    store.init_schema()
    yield store
    store.close()
    drop_tasks_table()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "x.db")
    store.init_schema()
    yield store
    store.close()


@pytest.fixture
def mysql_backend(mysql_store: MySQLStore) -> Backend:
    return Backend("mysql", TEST_URL, mysql_store)


@pytest.fixture
def sqlite_backend(sqlite_store: SQLiteStore) -> Backend:
    return Backend("sqlite", f"sqlite:///{sqlite_store.path}", sqlite_store)


@pytest.fixture(params=["mysql", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each shared behaviour runs against MariaDB and against SQLite."""
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


# -- local HTTP servers -------------------------------------------------------------------------


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[ContentOrigin]:
    with serving(ContentOrigin(tmp_path / "origin-root")) as server:
        yield server


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[ContentOrigin]:
    """A second origin, on a port ALLOWED_HOSTS does not list."""
    with serving(ContentOrigin(tmp_path / "other-root")) as server:
        yield server


@pytest.fixture
def token_origin(tmp_path: Path) -> Iterator[Origin]:
    """The dev content origin as a deployment uses it: a bearer token required, every request time-stamped."""
    with serving(Origin(tmp_path / "origin", token=secrets.token_urlsafe(24))) as server:
        yield server


@pytest.fixture
def webhook_secret() -> str:
    return generate_secret()


@pytest.fixture
def receiver(webhook_secret: str) -> Iterator[WebhookReceiver]:
    with serving(WebhookReceiver(webhook_secret)) as server:
        yield server


# -- the service --------------------------------------------------------------------------------


@pytest.fixture
def wire_service(
    configure: Callable[..., Settings],
    redis_conn: Redis,
    origin: ContentOrigin,
    receiver: WebhookReceiver,
    webhook_secret: str,
) -> Callable[..., Service]:
    """`wire_service(backend, **variables)`: the service on *backend*, wired to this test's origin and receiver."""

    def wire(backend: Backend, **variables: str) -> Service:
        return make_service(configure, redis_conn, origin, receiver, webhook_secret, backend, **variables)

    return wire


@pytest.fixture
def svc(wire_service: Callable[..., Service], mysql_backend: Backend) -> Service:
    """The service on MariaDB (a retry is due after 1 s)."""
    return wire_service(mysql_backend, RETRY_DELAY="1")


@pytest.fixture
def any_svc(wire_service: Callable[..., Service], backend: Backend) -> Service:
    """The service on each store back end in turn (a retry is due after 1 s)."""
    return wire_service(backend, RETRY_DELAY="1")


@pytest.fixture
def busy_worker(
    configure: Callable[..., Settings],
    redis_conn: Redis,
    mysql_store: MySQLStore,
    origin: ContentOrigin,
    start_worker: Callable[..., LoggedProcess],
) -> BusyWorker:
    """A real worker busy on a paid task (MariaDB) whose slow download keeps its job started."""
    rig = Rig(configure(DATABASE_URL=TEST_URL, ALLOWED_HOSTS=origin.host_port), mysql_store, redis_conn)
    return BusyWorker.start(rig, origin, start_worker)


@pytest.fixture
def start_worker(tmp_path: Path, redis_conn: Redis) -> Iterator[Callable[..., LoggedProcess]]:
    """Start real forking workers (`udemy-dl worker`) with this test's environment; stopped at teardown."""
    started: list[LoggedProcess] = []

    def start(burst: bool = False) -> LoggedProcess:
        worker = start_worker_process(tmp_path, burst)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def horses(svc: Service, start_worker: Callable[..., LoggedProcess]) -> HorseWorld:
    """Real workers (`udemy-dl worker`) on the service (MariaDB, webhooks on), and paid one-file courses."""
    return HorseWorld(svc, start_worker)


@pytest.fixture
def trickling_receiver() -> Iterator[TricklingReceiver]:
    """A webhook receiver whose answer to the first delivery of `msg_hung` trickles forever; others get a 204."""
    receiver = TricklingReceiver(hang={"msg_hung"}).start()
    yield receiver
    receiver.stop()


# -- the intake ---------------------------------------------------------------------------------


@pytest.fixture
def secret() -> str:
    """The API_SECRET_KEY the intake checks signatures with."""
    return generate_secret()


@pytest.fixture
def intake(
    configure: Callable[..., Settings], redis_conn: Redis, mysql_store: MySQLStore, secret: str
) -> Iterator[Intake]:
    """The intake on MariaDB."""
    yield from start_intake(configure(DATABASE_URL=TEST_URL, API_SECRET_KEY=secret), secret)


@pytest.fixture
def intake_on(configure: Callable[..., Settings], redis_conn: Redis, backend: Backend, secret: str) -> Iterator[Intake]:
    """The intake on each store back end (MariaDB and SQLite)."""
    yield from start_intake(configure(DATABASE_URL=backend.url, API_SECRET_KEY=secret), secret)


@pytest.fixture
def intake_log() -> Iterator[LogRecords]:
    """Every record the intake logs during the test."""
    yield from capture_intake_log()
