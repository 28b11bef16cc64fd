"""The status store, on MariaDB and on SQLite: schema, conditional status changes, row counts."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.mariadb import TEST_DB, drop_tasks_table, mysql_admin, mysql_query
from tests.support.service import Backend
from udemy_dl import store as store_module
from udemy_dl.errors import ConfigError, StoreError
from udemy_dl.store import (
    COMPLETED,
    ENROLLED,
    FAILED,
    MYSQL_INDEXES,
    MYSQL_WORKER_COLUMNS,
    PENDING,
    PROCESSING,
    SQLITE_SCHEMA,
    MySQLStore,
    SQLiteStore,
    TaskStore,
    open_store,
    utcnow,
)

EMAIL = "buyer@shop.example"
URL = "https://cdn.example/courses/1"
WHEN = datetime(2026, 1, 2, 3, 4, 5, 678901)


def add(store: TaskStore, status: str = PENDING) -> int:
    return store.insert_task(EMAIL, URL, status)


def status_of(store: TaskStore, task_id: int) -> str:
    row = store.get(task_id)
    assert row is not None
    return row.status


def test_init_schema_twice_is_safe_and_keeps_rows(backend: Backend) -> None:
    """Running init_schema again (db init twice) neither fails nor loses data."""
    task_id = add(backend.store)
    backend.store.init_schema()
    backend.store.init_schema()
    row = backend.store.get(task_id)
    assert row is not None and (row.email, row.course_url, row.status) == (EMAIL, URL, PENDING)


def test_new_row_has_worker_defaults(backend: Backend) -> None:
    """A freshly inserted task has no attempts, no progress, no outcome yet."""
    row = backend.store.get(add(backend.store))
    assert row is not None
    assert (row.attempts, row.progress, row.error_message, row.output_path, row.bytes) == (0, 0, None, None, None)
    assert (row.started_at, row.finished_at) == (None, None)


def test_get_unknown_id_returns_none(backend: Backend) -> None:
    """get() of an id that does not exist is None, not an error."""
    assert backend.store.get(987654) is None


def test_mysql_init_adds_worker_columns_to_a_shop_table(mysql_url: str) -> None:
    """A pre-existing shop table with only id,email,course_url,status gains the worker's columns, rows intact."""
    drop_tasks_table()
    mysql_admin(
        f"CREATE TABLE {TEST_DB}.download_tasks (id INT AUTO_INCREMENT PRIMARY KEY, "
        "email VARCHAR(255) NOT NULL, course_url VARCHAR(1024) NOT NULL, "
        "status VARCHAR(20) NOT NULL DEFAULT 'pending')"
    )
    mysql_admin(
        f"INSERT INTO {TEST_DB}.download_tasks (email, course_url, status) VALUES ('{EMAIL}', '{URL}', 'enrolled')"
    )
    store = MySQLStore(mysql_url)
    try:
        store.init_schema()
        columns = {
            str(row[0]).lower()
            for row in mysql_query(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                (TEST_DB, "download_tasks"),
            )
        }
        assert set(MYSQL_WORKER_COLUMNS) <= columns
        indexes = {
            str(row[0])
            for row in mysql_query(
                "SELECT index_name FROM information_schema.statistics WHERE table_schema = %s AND table_name = %s",
                (TEST_DB, "download_tasks"),
            )
        }
        assert set(MYSQL_INDEXES) <= indexes
        row = store.get(1)
        assert row is not None and (row.email, row.status, row.attempts) == (EMAIL, ENROLLED, 0)
    finally:
        store.close()
        drop_tasks_table()


def test_mysql_upgraded_shop_table_supports_the_worker_flow(mysql_url: str) -> None:
    """After init on a minimal shop table, the full paid -> processing -> completed flow works."""
    drop_tasks_table()
    mysql_admin(
        f"CREATE TABLE {TEST_DB}.download_tasks (id INT AUTO_INCREMENT PRIMARY KEY, "
        "email VARCHAR(255) NOT NULL, course_url VARCHAR(1024) NOT NULL, status VARCHAR(20) NOT NULL)"
    )
    store = MySQLStore(mysql_url)
    try:
        store.init_schema()
        task_id = add(store)
        assert store.mark_processing([task_id]) == 1
        assert store.begin_attempt(task_id, 3)
        assert store.mark_completed(task_id, "/srv/downloads/1", 10, WHEN)
        row = store.get(task_id)
        assert row is not None and (row.status, row.attempts, row.finished_at) == (COMPLETED, 1, WHEN)
    finally:
        store.close()
        drop_tasks_table()


@pytest.mark.parametrize(
    ("initial", "changed", "final"),
    [
        (PENDING, 1, PROCESSING),
        (ENROLLED, 1, PROCESSING),
        (PROCESSING, 0, PROCESSING),
        (COMPLETED, 0, COMPLETED),
        (FAILED, 0, FAILED),
    ],
)
def test_mark_processing_only_from_unpaid(backend: Backend, initial: str, changed: int, final: str) -> None:
    """Payment moves pending/enrolled rows to processing; any other status is left alone."""
    task_id = add(backend.store, initial)
    assert backend.store.mark_processing([task_id]) == changed
    assert status_of(backend.store, task_id) == final


def test_mark_processing_counts_only_rows_it_changed(backend: Backend) -> None:
    """For a mixed batch the return value is the number of rows that became processing."""
    ids = [add(backend.store, status) for status in (PENDING, ENROLLED, COMPLETED, PROCESSING)]
    assert backend.store.mark_processing([*ids, 999999]) == 2


def test_mark_processing_of_no_ids_changes_nothing(backend: Backend) -> None:
    """An empty id list is a no-op returning 0 (no `IN ()` syntax error)."""
    add(backend.store)
    assert backend.store.mark_processing([]) == 0


def test_mark_completed_from_processing(backend: Backend) -> None:
    """processing -> completed records the output, size, time and 100 % progress."""
    task_id = add(backend.store, PROCESSING)
    assert backend.store.mark_completed(task_id, "/srv/downloads/1", 1234, WHEN) is True
    row = backend.store.get(task_id)
    assert row is not None
    assert (row.status, row.progress, row.output_path, row.bytes, row.finished_at) == (
        COMPLETED,
        100,
        "/srv/downloads/1",
        1234,
        WHEN,
    )


@pytest.mark.parametrize("initial", [PENDING, ENROLLED, COMPLETED, FAILED])
def test_mark_completed_only_from_processing(backend: Backend, initial: str) -> None:
    """mark_completed is refused (False, row unchanged) unless the row is processing."""
    task_id = add(backend.store, initial)
    assert backend.store.mark_completed(task_id, "/srv/x", 1, WHEN) is False
    assert status_of(backend.store, task_id) == initial


@pytest.mark.parametrize("initial", [PENDING, ENROLLED, COMPLETED, FAILED])
def test_mark_failed_only_from_processing(backend: Backend, initial: str) -> None:
    """mark_failed is refused (False, row unchanged) unless the row is processing."""
    task_id = add(backend.store, initial)
    assert backend.store.mark_failed(task_id, "boom", None, WHEN) is False
    assert status_of(backend.store, task_id) == initial


def test_completed_row_can_never_change_again(backend: Backend) -> None:
    """A late or duplicate run cannot turn completed into failed or processing, nor touch its fields."""
    task_id = add(backend.store, PROCESSING)
    assert backend.store.begin_attempt(task_id, 3)
    assert backend.store.mark_completed(task_id, "/srv/downloads/1", 99, WHEN)
    before = backend.store.get(task_id)

    assert backend.store.mark_failed(task_id, "late failure", "/srv/failed/1", utcnow()) is False
    assert backend.store.mark_processing([task_id]) == 0
    assert backend.store.begin_attempt(task_id, 3) is None
    assert backend.store.set_progress(task_id, 5) is False
    assert backend.store.mark_completed(task_id, "/srv/other", 1, utcnow()) is False
    assert backend.store.reopen_failed([task_id]) == 0
    assert backend.store.get(task_id) == before


def test_mark_failed_records_reason_and_folder(backend: Backend) -> None:
    """processing -> failed keeps the reason, the failed folder and the time."""
    task_id = add(backend.store, PROCESSING)
    assert backend.store.mark_failed(task_id, "HTTP 404", "/srv/failed/1-x", WHEN) is True
    row = backend.store.get(task_id)
    assert row is not None
    assert (row.status, row.error_message, row.output_path, row.finished_at) == (
        FAILED,
        "HTTP 404",
        "/srv/failed/1-x",
        WHEN,
    )


def test_mark_failed_truncates_a_huge_reason(backend: Backend) -> None:
    """A reason longer than 4000 characters is stored cut to 4000, not refused."""
    task_id = add(backend.store, PROCESSING)
    assert backend.store.mark_failed(task_id, "x" * 10_000, None, WHEN)
    row = backend.store.get(task_id)
    assert row is not None and row.error_message == "x" * 4000


def test_rowcount_counts_matched_rows_even_when_values_do_not_change(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update whose new values equal the old ones still reports the row as matched (MySQL FOUND_ROWS)."""
    monkeypatch.setattr(store_module, "utcnow", lambda: WHEN)
    task_id = add(backend.store, PROCESSING)
    assert backend.store.set_progress(task_id, 50) is True
    assert backend.store.set_progress(task_id, 50) is True  # identical row: matched, not changed


def test_begin_attempt_counts_attempts_and_keeps_first_start(backend: Backend) -> None:
    """Each attempt adds one; started_at is the first attempt's time."""
    task_id = add(backend.store, PROCESSING)
    assert backend.store.begin_attempt(task_id, 3) == 1
    first = backend.store.get(task_id)
    assert backend.store.begin_attempt(task_id, 3) == 2
    second = backend.store.get(task_id)
    assert first is not None and second is not None
    assert (first.attempts, second.attempts) == (1, 2)
    assert first.started_at is not None and second.started_at == first.started_at


def test_begin_attempt_stops_counting_at_the_limit(backend: Backend) -> None:
    """The count it answers is the row's own; once the attempts are used up nothing more is counted."""
    task_id = add(backend.store, PROCESSING)
    other = add(backend.store, PROCESSING)
    assert backend.store.begin_attempt(other, 3) == 1  # another row's count is not this one's
    assert [backend.store.begin_attempt(task_id, 2) for _ in range(3)] == [1, 2, None]
    row = backend.store.get(task_id)
    assert row is not None and row.attempts == 2
    assert backend.store.undo_attempt(task_id, 2)
    assert backend.store.begin_attempt(task_id, 2) == 2


def test_undo_attempt_gives_back_only_the_attempt_it_names(backend: Backend) -> None:
    """A run that lost its lease cannot give back the attempt of the run that replaced it."""
    task_id = add(backend.store, PROCESSING)
    assert [backend.store.begin_attempt(task_id, 3) for _ in range(2)] == [1, 2]
    assert backend.store.undo_attempt(task_id, 1) is False
    row = backend.store.get(task_id)
    assert row is not None and row.attempts == 2


def test_mark_failed_with_an_attempt_leaves_a_reopened_row_alone(backend: Backend) -> None:
    """A late run on attempt 3 cannot fail a row that requeue-failed reopened (attempts back to 0)."""
    task_id = add(backend.store, PROCESSING)
    for _ in range(3):
        backend.store.begin_attempt(task_id, 3)
    assert backend.store.mark_failed(task_id, "first", None, WHEN, attempt=3)
    assert backend.store.reopen_failed([task_id]) == 1
    assert backend.store.mark_failed(task_id, "late", None, WHEN, attempt=3) is False
    row = backend.store.get(task_id)
    assert row is not None and (row.status, row.attempts) == (PROCESSING, 0)


def test_insert_task_returns_the_new_id(backend: Backend) -> None:
    """Each insert answers its own row's id."""
    first = add(backend.store, PENDING)
    second = add(backend.store, PENDING)
    assert second > first > 0
    row = backend.store.get(second)
    assert row is not None and row.id == second


@pytest.mark.parametrize("initial", [PENDING, ENROLLED, FAILED])
def test_begin_attempt_only_on_processing(backend: Backend, initial: str) -> None:
    """An unpaid or settled row gets no attempt counted."""
    task_id = add(backend.store, initial)
    assert backend.store.begin_attempt(task_id, 3) is None
    row = backend.store.get(task_id)
    assert row is not None and row.attempts == 0


def test_set_progress_is_clamped_to_0_100(backend: Backend) -> None:
    """Progress outside 0..100 is stored clamped."""
    task_id = add(backend.store, PROCESSING)
    backend.store.set_progress(task_id, 250)
    high = backend.store.get(task_id)
    backend.store.set_progress(task_id, -5)
    low = backend.store.get(task_id)
    assert high is not None and low is not None and (high.progress, low.progress) == (100, 0)


def test_reopen_failed_only_from_failed(backend: Backend) -> None:
    """An operator's requeue moves failed rows back to processing with a fresh attempt count; others stay."""
    failed = add(backend.store, PROCESSING)
    backend.store.begin_attempt(failed, 3)
    backend.store.mark_failed(failed, "boom", "/srv/failed/x", WHEN)
    pending = add(backend.store, PENDING)
    assert backend.store.reopen_failed([failed, pending]) == 1
    row = backend.store.get(failed)
    assert row is not None
    assert (row.status, row.attempts, row.error_message, row.finished_at) == (PROCESSING, 0, None, None)
    assert status_of(backend.store, pending) == PENDING


def test_status_queries_list_and_count_rows(backend: Backend) -> None:
    """ids_with_status, rows_with_status and count_by_status agree with the rows inserted."""
    ids = {status: [add(backend.store, status), add(backend.store, status)] for status in (PENDING, PROCESSING)}
    add(backend.store, COMPLETED)
    assert backend.store.ids_with_status(PROCESSING) == ids[PROCESSING]
    assert [row.id for row in backend.store.rows_with_status(PENDING)] == ids[PENDING]
    assert backend.store.count_by_status() == {PENDING: 2, PROCESSING: 2, COMPLETED: 1}


def test_get_many_returns_existing_rows_in_id_order(backend: Backend) -> None:
    """get_many skips unknown ids and orders by id."""
    first, second = add(backend.store), add(backend.store)
    assert [row.id for row in backend.store.get_many([second, 424242, first])] == [first, second]


def test_ping_succeeds_on_a_live_store(backend: Backend) -> None:
    """ping() answers on a reachable store (health uses it)."""
    backend.store.ping()


def alter_tasks_table(backend: Backend, statement: str) -> None:
    """Run one DDL statement on the test's download_tasks table, outside the store under test."""
    if backend.name == "mysql":
        mysql_query(statement)
    else:
        assert isinstance(backend.store, SQLiteStore)
        with sqlite3.connect(backend.store.path) as conn:
            conn.execute(statement)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop-table", "table download_tasks missing: run `udemy-dl db init`"),
        ("drop-column", "table download_tasks lacks column(s) pending_event: run `udemy-dl db init`"),
    ],
)
def test_ping_names_what_the_table_lacks_and_the_command_that_fixes_it(
    backend: Backend, damage: str, message: str
) -> None:
    """A database that answers but has no download_tasks table (`db init` never ran), or a table from before
    a column was added (here pending_event), fails the ping saying so; `db init` (init_schema) mends it."""
    backend.store.close()
    if damage == "drop-table":
        alter_tasks_table(backend, "DROP TABLE download_tasks")
    else:
        if backend.name == "sqlite":  # SQLite drops no indexed column
            alter_tasks_table(backend, "DROP INDEX idx_download_tasks_pending_event")
        alter_tasks_table(backend, "ALTER TABLE download_tasks DROP COLUMN pending_event")
    with pytest.raises(StoreError) as caught:
        backend.store.ping()
    assert str(caught.value) == message
    backend.store.init_schema()
    backend.store.ping()


def test_unreachable_mysql_raises_store_error() -> None:
    """A database that does not answer raises StoreError (transient), not a driver exception."""
    store = MySQLStore("mysql://root@127.0.0.1:1/udemy_dl_test")
    with pytest.raises(StoreError):
        store.ping()


def test_missing_table_raises_store_error(tmp_path: Path) -> None:
    """A statement the database refuses (no table yet) is a StoreError naming the problem."""
    store = SQLiteStore(tmp_path / "empty.db")
    with pytest.raises(StoreError, match="download_tasks"):
        store.get(1)


def test_open_store_picks_the_back_end_from_the_url(tmp_path: Path) -> None:
    """mysql:// opens a MySQLStore, sqlite:////abs/path a SQLiteStore on that absolute file."""
    assert isinstance(open_store("mysql://u:p@db.example:3306/shop"), MySQLStore)
    sqlite = open_store(f"sqlite:///{tmp_path}/tasks.db")
    assert isinstance(sqlite, SQLiteStore) and sqlite.path == tmp_path / "tasks.db"


def test_open_store_relative_sqlite_path() -> None:
    """sqlite:///relative/file names a path relative to the working directory, as SQLAlchemy spells it."""
    sqlite = open_store("sqlite:///data/tasks.db")
    assert isinstance(sqlite, SQLiteStore) and sqlite.path == Path("data/tasks.db")


@pytest.mark.parametrize("url", ["postgres://u@db/x", "mysql://u@db.example/", "mysql:///shop", "sqlite:///"])
def test_open_store_refuses_bad_urls_naming_database_url(url: str) -> None:
    """An unusable DATABASE_URL is a ConfigError naming DATABASE_URL."""
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert caught.value.variable == "DATABASE_URL"


def test_mysql_store_repr_hides_the_password() -> None:
    """repr(MySQLStore) (seen in logs and tracebacks) never shows the database password."""
    assert "db-pw-xyz" not in repr(MySQLStore("mysql://shop:db-pw-xyz@db.example/shop"))


def test_sqlite_init_adds_the_outbox_column_to_an_older_file(tmp_path: Path) -> None:
    """A SQLite file made before the outbox existed gains pending_event (and its index) at `db init`, rows intact."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(SQLITE_SCHEMA.replace(",\n    pending_event TEXT NULL", ""))
        conn.execute("INSERT INTO download_tasks (email, course_url, status) VALUES (?, ?, ?)", (EMAIL, URL, PENDING))
    store = SQLiteStore(path)
    try:
        store.init_schema()
        task_id = 1
        assert store.mark_processing([task_id]) == 1
        assert store.mark_completed(task_id, "/srv/downloads/1", 1, WHEN, event="msg_1_completed_x")
        row = store.get(task_id)
        assert row is not None and row.pending_event == "msg_1_completed_x"
        with sqlite3.connect(path) as conn:
            indexes = {str(row[1]) for row in conn.execute("PRAGMA index_list(download_tasks)")}
        assert "idx_download_tasks_pending_event" in indexes
    finally:
        store.close()


def test_final_status_change_records_its_event_until_acknowledged(backend: Backend) -> None:
    """mark_completed/mark_failed put the event's id in the row in the same statement; only that id's
    acknowledgement takes it out; an operator's requeue forgets it."""
    done = add(backend.store, PROCESSING)
    assert backend.store.mark_completed(done, "/srv/downloads/1", 1, WHEN, event="msg_done")
    assert backend.store.event_delivered(done, "msg_other") is False
    assert backend.store.get(done).pending_event == "msg_done"  # type: ignore[union-attr]
    assert backend.store.event_delivered(done, "msg_done") is True
    assert backend.store.get(done).pending_event is None  # type: ignore[union-attr]
    assert backend.store.event_delivered(done, "msg_done") is False

    failed = add(backend.store, PROCESSING)
    assert backend.store.mark_failed(failed, "boom", None, WHEN, event="msg_failed")
    assert backend.store.get(failed).pending_event == "msg_failed"  # type: ignore[union-attr]
    assert backend.store.reopen_failed([failed]) == 1
    assert backend.store.get(failed).pending_event is None  # type: ignore[union-attr]


def test_rows_to_reconcile_are_processing_rows_then_unacknowledged_events(backend: Backend) -> None:
    """One query: every processing row, then settled rows with an event pending; nothing else."""
    processing = add(backend.store, PROCESSING)
    pending = add(backend.store, PROCESSING)
    backend.store.mark_completed(pending, "/d", 1, WHEN, event="msg_pending")
    acknowledged = add(backend.store, PROCESSING)
    backend.store.mark_completed(acknowledged, "/d", 1, WHEN, event="msg_ack")
    backend.store.event_delivered(acknowledged, "msg_ack")
    quiet = add(backend.store, PROCESSING)
    backend.store.mark_failed(quiet, "boom", None, WHEN)
    add(backend.store, PENDING)
    later = add(backend.store, PROCESSING)

    rows = backend.store.rows_to_reconcile()
    assert [(row.id, row.status, row.pending_event) for row in rows] == [
        (processing, PROCESSING, None),
        (later, PROCESSING, None),
        (pending, COMPLETED, "msg_pending"),
    ]
    assert [row.id for row in backend.store.rows_to_reconcile(limit=1)] == [processing, pending]
