"""The status store: every SQL statement the service runs, for MySQL/MariaDB and for SQLite.

MySQL is the record of every paid task. Each status change names the status it expects to
find, and the caller learns from the row count whether it happened, so a late or duplicate
run can never turn `completed` back into anything else.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import mysql.connector
from mysql.connector import errors as mysql_errors
from mysql.connector.constants import ClientFlag

from . import defaults
from .errors import ConfigError, StoreError

log = logging.getLogger(__name__)

PENDING = "pending"
ENROLLED = "enrolled"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
UNPAID = (PENDING, ENROLLED)
STATUSES = (PENDING, ENROLLED, PROCESSING, COMPLETED, FAILED)
CANCELLED_PREFIX = "cancelled"
"""How the error of a cancelled task begins: a cancelled task is `failed` (the front end knows four
statuses), and its reason says it was cancelled."""

COLUMNS = (
    "id, email, course_url, status, attempts, progress, error_message, output_path, bytes, "
    "started_at, finished_at, updated_at, priority, pending_event"
)

REQUIRED_COLUMNS = tuple(column.strip() for column in COLUMNS.split(","))
"""The columns of download_tasks the service reads and writes (`health` checks they are there)."""

MYSQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS download_tasks (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    email VARCHAR(320) NOT NULL,
    course_url VARCHAR(2048) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'pending',
    attempts INT NOT NULL DEFAULT 0,
    progress TINYINT UNSIGNED NOT NULL DEFAULT 0,
    error_message TEXT NULL,
    output_path VARCHAR(1024) NULL,
    bytes BIGINT UNSIGNED NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    started_at DATETIME(6) NULL,
    finished_at DATETIME(6) NULL,
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    priority VARCHAR(10) NOT NULL DEFAULT 'normal',
    pending_event VARCHAR(100) NULL,
    KEY idx_download_tasks_status (status, updated_at),
    KEY idx_download_tasks_pending_event (pending_event)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

# Columns the worker owns; added to a table the shop created before the worker existed.
MYSQL_WORKER_COLUMNS = {
    "attempts": "INT NOT NULL DEFAULT 0",
    "progress": "TINYINT UNSIGNED NOT NULL DEFAULT 0",
    "error_message": "TEXT NULL",
    "output_path": "VARCHAR(1024) NULL",
    "bytes": "BIGINT UNSIGNED NULL",
    "started_at": "DATETIME(6) NULL",
    "finished_at": "DATETIME(6) NULL",
    "updated_at": "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)",
    "priority": "VARCHAR(10) NOT NULL DEFAULT 'normal'",
    "pending_event": "VARCHAR(100) NULL",
}

MYSQL_INDEXES = {
    "idx_download_tasks_status": "(status, updated_at)",
    "idx_download_tasks_pending_event": "(pending_event)",
}
"""Indexes the worker's queries need; added to an existing table by `db init`."""

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS download_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL,
    course_url TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    progress INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NULL,
    output_path TEXT NULL,
    bytes INTEGER NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    started_at TEXT NULL,
    finished_at TEXT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    priority TEXT NOT NULL DEFAULT 'normal',
    pending_event TEXT NULL
);
CREATE INDEX IF NOT EXISTS idx_download_tasks_status ON download_tasks (status, updated_at);
"""

SQLITE_INDEXES = "CREATE INDEX IF NOT EXISTS idx_download_tasks_pending_event ON download_tasks (pending_event);"


SQLITE_ADDED_COLUMNS = {"priority": "TEXT NOT NULL DEFAULT 'normal'", "pending_event": "TEXT NULL"}
"""Columns added after the first release, added to an existing SQLite file by `db init`."""


def utcnow() -> datetime:
    """Naive UTC time, as both stores keep it."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class TaskRow:
    """One row of download_tasks."""

    id: int
    email: str
    course_url: str
    status: str
    attempts: int
    progress: int
    error_message: str | None
    output_path: str | None
    bytes: int | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    priority: str = "normal"
    pending_event: str | None = None
    """The webhook-id of the row's final event (download.completed/failed) until the payment service
    has acknowledged it: the outbox that lets the reconciler send it again if Redis loses it."""

    @property
    def cancelled(self) -> bool:
        """Failed because an operator or the payment service cancelled it (a refund, say)."""
        return self.status == FAILED and (self.error_message or "").startswith(CANCELLED_PREFIX)

    @classmethod
    def from_db(cls, row: Sequence[Any]) -> TaskRow:
        def as_time(value: Any) -> datetime | None:
            if value is None or isinstance(value, datetime):
                return value
            return datetime.fromisoformat(str(value))

        return cls(
            id=int(row[0]),
            email=str(row[1]),
            course_url=str(row[2]),
            status=str(row[3]),
            attempts=int(row[4] or 0),
            progress=int(row[5] or 0),
            error_message=row[6],
            output_path=row[7],
            bytes=None if row[8] is None else int(row[8]),
            started_at=as_time(row[9]),
            finished_at=as_time(row[10]),
            updated_at=as_time(row[11]),
            priority=str(row[12]) if len(row) > 12 and row[12] else "normal",
            pending_event=row[13] if len(row) > 13 else None,
        )


class Executed(NamedTuple):
    """What one statement did."""

    matched: int
    """Rows matched (MySQL is asked for FOUND_ROWS, so an update that changes nothing still counts)."""
    rows: list[tuple[Any, ...]]
    last_id: int | None
    """The driver's last row id: an INSERT's new id, or the value an UPDATE gave LAST_INSERT_ID()."""


class TaskStore:
    """SQL shared by both back ends. Statements use %s placeholders; SQLite rewrites them to ?."""

    placeholder = "%s"

    def _connect(self) -> Any:
        raise NotImplementedError

    def init_schema(self) -> None:
        raise NotImplementedError

    def __init__(self, retry_for: float = 0) -> None:
        self._conn: Any = None
        self._pid = 0
        self.retry_for = retry_for
        """Seconds to keep retrying a statement while the database is unreachable (0: fail at once)."""

    def _is_unreachable(self, exc: Exception) -> bool:
        """True for errors that mean "could not talk to the database", worth retrying."""
        return False

    # -- plumbing ---------------------------------------------------------------------------

    share_across_fork = False
    """May a forked child go on using the connection its parent opened? (Only where the protocol
    allows it: one statement at a time, parent idle meanwhile. SQLite never.)"""

    def _connection(self) -> Any:
        if self._conn is None or (self._pid != os.getpid() and not self.share_across_fork):
            self._conn = self._connect()
            self._pid = os.getpid()
        return self._conn

    def _is_alive(self, conn: Any) -> bool:
        return True

    def ensure_connected(self) -> None:
        """Open the connection now, or open it anew if it no longer answers (no SQL statement is sent)."""
        if self._conn is not None and self._pid == os.getpid() and self._is_alive(self._conn):
            return
        self.close()
        self._connection()

    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "%s" else statement.replace("%s", self.placeholder)

    def _execute(self, statement: str, params: Sequence[Any] = (), retry: bool = True) -> Executed:
        """Run one statement; return what it matched and fetched. Raises StoreError on failure.

        While the database is unreachable the statement is retried with backoff for `retry_for`
        seconds, so a status change survives a database restart instead of being lost.
        """
        deadline = time.monotonic() + (self.retry_for if retry else 0)
        delay = 0.5
        while True:
            try:
                conn = self._connection()
                cursor = conn.cursor()
                try:
                    cursor.execute(self._sql(statement), tuple(params))
                    rows = cursor.fetchall() if cursor.description else []
                    return Executed(cursor.rowcount, rows, cursor.lastrowid)
                finally:
                    cursor.close()
            except Exception as exc:  # driver errors differ per back end; all mean "not recorded"
                self.close()
                left = deadline - time.monotonic()
                if self._is_unreachable(exc) and left > 0:
                    pause = min(delay, left)
                    log.warning("status store unreachable (%s); retrying in %.1fs", exc, pause)
                    time.sleep(pause)  # backoff between reconnection attempts
                    delay = min(delay * 2, 10.0)
                    continue
                raise StoreError(f"status store: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _in(ids: Sequence[object]) -> str:
        return ", ".join(["%s"] * len(ids))

    def close(self) -> None:
        # A child drops an inherited connection without closing it: the socket is its parent's.
        if self._conn is not None and self._pid == os.getpid():
            try:
                self._conn.close()
            except Exception:  # closing a broken connection may fail; nothing to keep
                log.debug("closing the store connection failed", exc_info=True)
        self._conn = None

    def ping(self) -> None:
        """Raise StoreError unless the store answers and download_tasks has every column the service
        reads and writes: a table `db init` never created (or an older one it never completed) is
        named, with the command that fixes it."""
        try:
            self._execute(f"SELECT {COLUMNS} FROM download_tasks WHERE 1 = 0")
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, Exception) and self._is_unreachable(cause):
                raise  # the store does not answer: nothing more to ask it
            try:
                present = self._table_columns()
            except StoreError:
                raise exc from None  # the first error says what is wrong
            if not present:
                raise StoreError("table download_tasks missing: run `udemy-dl db init`") from exc
            missing = [column for column in REQUIRED_COLUMNS if column not in present]
            if missing:
                raise StoreError(
                    f"table download_tasks lacks column(s) {', '.join(missing)}: run `udemy-dl db init`"
                ) from exc
            raise

    def _table_columns(self) -> set[str]:
        """The column names of download_tasks (lower-case); empty when there is no such table."""
        raise NotImplementedError

    # -- the shop's side ----------------------------------------------------------------------

    def insert_task(self, email: str, course_url: str, status: str = PENDING) -> int:
        """Create a task row (the shop does this in production; tests and the demo use it)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        inserted = self._execute(
            "INSERT INTO download_tasks (email, course_url, status) VALUES (%s, %s, %s)",
            (email, course_url, status),
            retry=False,  # not idempotent: a retry after a lost answer would insert twice
        )
        return int(inserted.last_id or 0)

    def get(self, task_id: int) -> TaskRow | None:
        rows = self._execute(f"SELECT {COLUMNS} FROM download_tasks WHERE id = %s", (task_id,)).rows
        return TaskRow.from_db(rows[0]) if rows else None

    def get_many(self, task_ids: Sequence[int]) -> list[TaskRow]:
        if not task_ids:
            return []
        rows = self._execute(
            f"SELECT {COLUMNS} FROM download_tasks WHERE id IN ({self._in(task_ids)}) ORDER BY id",
            tuple(task_ids),
        ).rows
        return [TaskRow.from_db(row) for row in rows]

    def mark_processing(self, task_ids: Sequence[int], priority: str = "normal") -> int:
        """Paid: unpaid rows become `processing` (with their priority). Returns how many rows changed."""
        if not task_ids:
            return 0
        count = self._execute(
            f"UPDATE download_tasks SET status = %s, priority = %s, progress = 0, error_message = NULL "
            f"WHERE id IN ({self._in(task_ids)}) AND status IN (%s, %s)",
            (PROCESSING, priority, *task_ids, *UNPAID),
        ).matched
        return count

    # -- the worker's side --------------------------------------------------------------------

    attempt_counter = "attempts + 1"
    """How begin_attempt counts; the store's dialect reads the new count back from the same statement."""
    attempt_returning = " RETURNING attempts"

    def begin_attempt(self, task_id: int, max_attempts: int) -> int | None:
        """Count one more attempt of a `processing` task that has attempts left, in one statement;
        return the new count. None when the row is missing, not processing, or out of attempts
        (the caller reads the row to tell which: that is the rare path)."""
        now = utcnow()
        counted = self._execute(
            f"UPDATE download_tasks SET attempts = {self.attempt_counter}, started_at = COALESCE(started_at, %s), "
            f"updated_at = %s WHERE id = %s AND status = %s AND attempts < %s{self.attempt_returning}",
            (now, now, task_id, PROCESSING, max_attempts),
        )
        if counted.rows:
            return int(counted.rows[0][0])
        if counted.matched == 1 and counted.last_id:
            return int(counted.last_id)
        return None

    def set_progress(self, task_id: int, percent: int) -> bool:
        """Best effort, never retried: a lost progress update is replaced by the next one."""
        count = self._execute(
            "UPDATE download_tasks SET progress = %s, updated_at = %s WHERE id = %s AND status = %s",
            (max(0, min(100, percent)), utcnow(), task_id, PROCESSING),
            retry=False,
        ).matched
        return count == 1

    def undo_attempt(self, task_id: int, attempt: int) -> bool:
        """Give back attempt number *attempt*, when its run was stopped through no fault of its own;
        only while the row still counts that attempt (a run that lost its lease must not give back
        the attempt of the run that replaced it)."""
        count = self._execute(
            "UPDATE download_tasks SET attempts = attempts - 1, updated_at = %s "
            "WHERE id = %s AND status = %s AND attempts = %s AND attempts > 0",
            (utcnow(), task_id, PROCESSING, attempt),
        ).matched
        return count == 1

    def mark_completed(
        self, task_id: int, output_path: str, total_bytes: int, now: datetime, event: str | None = None
    ) -> bool:
        """processing -> completed at *now*, with *event* (its webhook-id) pending in the same statement.
        False when the row was not `processing` (a late or duplicate run)."""
        count = self._execute(
            "UPDATE download_tasks SET status = %s, progress = 100, output_path = %s, bytes = %s, "
            "error_message = NULL, finished_at = %s, updated_at = %s, pending_event = %s "
            "WHERE id = %s AND status = %s",
            (COMPLETED, output_path, total_bytes, now, now, event, task_id, PROCESSING),
        ).matched
        return count == 1

    def mark_failed(
        self,
        task_id: int,
        reason: str,
        output_path: str | None,
        now: datetime,
        event: str | None = None,
        attempt: int | None = None,
    ) -> bool:
        """processing -> failed at *now*, with the reason and *event* pending. With *attempt*, only
        while the row still counts that many attempts (not reopened since). False when the row was
        not `processing` (or no longer at that attempt)."""
        return self._to_failed(task_id, reason, output_path, now, event, attempt, (PROCESSING,))

    def mark_cancelled(
        self, task_id: int, reason: str, now: datetime, event: str | None = None, attempt: int | None = None
    ) -> bool:
        """A task not settled yet (`processing`, or still unpaid) -> failed at *now* with *reason*
        (which begins with CANCELLED_PREFIX) and *event* pending. With *attempt*, only while the row
        still counts that many attempts. False when the row was settled first (a run that completed
        wins over a cancel that came after it)."""
        return self._to_failed(task_id, reason, None, now, event, attempt, (PROCESSING, *UNPAID))

    def _to_failed(
        self,
        task_id: int,
        reason: str,
        output_path: str | None,
        now: datetime,
        event: str | None,
        attempt: int | None,
        from_statuses: tuple[str, ...],
    ) -> bool:
        """The one statement that settles a row `failed`: only from *from_statuses* (and, with
        *attempt*, only at that attempt count). True when it changed the row."""
        params: tuple[Any, ...] = (
            FAILED,
            reason[: defaults.MAX_ERROR_LENGTH],
            output_path,
            now,
            now,
            event,
            task_id,
            *from_statuses,
        )
        condition = ""
        if attempt is not None:
            condition, params = " AND attempts = %s", (*params, attempt)
        count = self._execute(
            "UPDATE download_tasks SET status = %s, error_message = %s, output_path = %s, "
            "finished_at = %s, updated_at = %s, pending_event = %s "
            f"WHERE id = %s AND status IN ({self._in(from_statuses)}){condition}",
            params,
        ).matched
        return count == 1

    def event_delivered(self, task_id: int, event: str) -> bool:
        """The payment service acknowledged *event*: it leaves the outbox. Never retried (a missed
        clear costs at most one duplicate delivery after a Redis data loss, never a lost event)."""
        count = self._execute(
            "UPDATE download_tasks SET pending_event = NULL WHERE id = %s AND pending_event = %s",
            (task_id, event),
            retry=False,
        ).matched
        return count == 1

    def reopen_failed(self, task_ids: Sequence[int]) -> int:
        """failed -> processing, for an operator's requeue. Returns how many rows changed."""
        if not task_ids:
            return 0
        count = self._execute(
            f"UPDATE download_tasks SET status = %s, attempts = 0, progress = 0, error_message = NULL, "
            f"finished_at = NULL, pending_event = NULL, "
            f"updated_at = %s WHERE id IN ({self._in(task_ids)}) AND status = %s",
            (PROCESSING, utcnow(), *task_ids, FAILED),
        ).matched
        return count

    def ids_with_status(self, status: str, limit: int = 10_000) -> list[int]:
        rows = self._execute(
            "SELECT id FROM download_tasks WHERE status = %s ORDER BY id LIMIT %s", (status, limit)
        ).rows
        return [int(row[0]) for row in rows]

    def rows_with_status(self, status: str, limit: int = 10_000) -> list[TaskRow]:
        rows = self._execute(
            f"SELECT {COLUMNS} FROM download_tasks WHERE status = %s ORDER BY id LIMIT %s", (status, limit)
        ).rows
        return [TaskRow.from_db(row) for row in rows]

    def rows_to_reconcile(self, limit: int = 10_000) -> list[TaskRow]:
        """The reconciler's one query: rows still `processing`, then settled rows whose final event
        the payment service has not acknowledged yet (each part capped at *limit*, so a long
        receiver outage cannot crowd out the processing rows)."""
        rows = self._execute(
            f"SELECT * FROM (SELECT {COLUMNS} FROM download_tasks WHERE status = %s ORDER BY id LIMIT %s) AS p "
            f"UNION ALL SELECT * FROM (SELECT {COLUMNS} FROM download_tasks "
            f"WHERE pending_event IS NOT NULL AND status <> %s ORDER BY id LIMIT %s) AS e",
            (PROCESSING, limit, PROCESSING, limit),
        ).rows
        return [TaskRow.from_db(row) for row in rows]

    def count_pending_events(self) -> int:
        """Settled tasks whose final event the payment service has not acknowledged yet."""
        rows = self._execute("SELECT COUNT(*) FROM download_tasks WHERE pending_event IS NOT NULL").rows
        return int(rows[0][0])

    def count_by_status(self) -> dict[str, int]:
        rows = self._execute("SELECT status, COUNT(*) FROM download_tasks GROUP BY status").rows
        return {str(status): int(count) for status, count in rows}


class MySQLStore(TaskStore):
    """MySQL or MariaDB through mysql-connector-python."""

    def __init__(self, url: str, retry_for: float = 0) -> None:
        super().__init__(retry_for)
        parts = urlsplit(url)
        database = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not database:
            raise ConfigError("DATABASE_URL", "expected mysql://user:password@host:port/database")
        self._params = {
            "host": parts.hostname,
            "port": parts.port or 3306,
            "user": unquote(parts.username or ""),
            "password": unquote(parts.password or ""),
            "database": database,
        }

    attempt_counter = "LAST_INSERT_ID(attempts + 1)"
    """MySQL and MariaDB have no UPDATE ... RETURNING; LAST_INSERT_ID(expr) hands the new count back
    in the statement's own answer, so counting an attempt stays one statement."""
    attempt_returning = ""

    share_across_fork = True
    """Each work horse runs one task on the connection its worker opened (and checks between jobs):
    connecting costs four statements, a task three, so a connection per task would double the
    database's load."""

    def _is_alive(self, conn: Any) -> bool:
        try:
            return bool(conn.is_connected())  # COM_PING: no SQL statement
        except Exception:
            return False

    def _is_unreachable(self, exc: Exception) -> bool:
        return isinstance(exc, mysql_errors.OperationalError | mysql_errors.InterfaceError)

    def __repr__(self) -> str:
        return f"MySQLStore(host={self._params['host']!r}, database={self._params['database']!r})"

    def _connect(self) -> Any:
        conn = mysql.connector.connect(
            **self._params,
            autocommit=True,
            connection_timeout=10,
            # Row counts mean "rows matched", so a conditional update that changes nothing still counts.
            client_flags=[ClientFlag.FOUND_ROWS],
            time_zone="+00:00",
        )
        # The driver asks the server for sql_mode the first time it quotes a parameter, and keeps the
        # answer in the process that asked: ask now, so work horses forked later inherit it instead
        # of each sending that SELECT again.
        _ = conn.sql_mode
        return conn

    def _table_columns(self) -> set[str]:
        rows = self._execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = 'download_tasks'"
        ).rows
        return {str(row[0]).lower() for row in rows}

    def init_schema(self) -> None:
        self._execute(MYSQL_SCHEMA)
        present = self._table_columns()
        for column, definition in MYSQL_WORKER_COLUMNS.items():
            if column not in present:
                log.info("adding column download_tasks.%s", column)
                self._execute(f"ALTER TABLE download_tasks ADD COLUMN {column} {definition}")
        rows = self._execute(
            "SELECT DISTINCT index_name FROM information_schema.statistics WHERE table_schema = DATABASE() "
            "AND table_name = 'download_tasks'"
        ).rows
        indexes = {str(row[0]) for row in rows}
        for index, columns in MYSQL_INDEXES.items():
            if index not in indexes:
                log.info("adding index %s", index)
                self._execute(f"CREATE INDEX {index} ON download_tasks {columns}")


class SQLiteStore(TaskStore):
    """The embedded single-host store: one SQLite file in WAL mode."""

    placeholder = "?"

    def __init__(self, path: Path, retry_for: float = 0) -> None:
        super().__init__(retry_for)
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteStore(path={str(self.path)!r})"

    def _connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sqlite3.register_adapter(datetime, lambda value: value.isoformat(sep=" "))
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _table_columns(self) -> set[str]:
        return {str(row[1]).lower() for row in self._execute("PRAGMA table_info(download_tasks)").rows}

    def init_schema(self) -> None:
        conn = self._connection()
        try:
            conn.executescript(SQLITE_SCHEMA)
            present = {str(row[1]) for row in conn.execute("PRAGMA table_info(download_tasks)")}
            for column, definition in SQLITE_ADDED_COLUMNS.items():
                if column not in present:
                    log.info("adding column download_tasks.%s", column)
                    conn.execute(f"ALTER TABLE download_tasks ADD COLUMN {column} {definition}")
            conn.executescript(SQLITE_INDEXES)
        except sqlite3.Error as exc:
            raise StoreError(f"status store: {exc}") from exc


def open_store(database_url: str, retry_for: float = 0) -> TaskStore:
    """Return the store that *database_url* names (mysql://… or sqlite:///path)."""
    parts = urlsplit(database_url)
    if parts.scheme == "mysql":
        return MySQLStore(database_url, retry_for)
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path, as SQLAlchemy spells them.
        raw = unquote(parts.path)
        path = raw[1:] if raw.startswith("/") else raw
        if not path:
            raise ConfigError("DATABASE_URL", "sqlite:/// needs a file path, e.g. sqlite:///./udemy_dl.sqlite3")
        return SQLiteStore(Path(path), retry_for)
    raise ConfigError("DATABASE_URL", f"unsupported scheme {parts.scheme!r}")
