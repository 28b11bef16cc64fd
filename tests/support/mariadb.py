"""The machine's MariaDB (root, no password, 127.0.0.1:3306): each suite's database, statements run
as root, and fresh `download_tasks` tables."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from udemy_dl.store import MySQLStore

from .ci import unavailable

MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
MYSQL_USER = "root"

TEST_DB = os.environ.get("UDEMY_DL_TEST_MYSQL_DB", "udemy_dl_test")
"""The main suite's database."""
E2E_DB = os.environ.get("UDEMY_DL_E2E_MYSQL_DB", "udemy_dl_e2e")
"""The end-to-end tests' database."""
FAULTS_DB = os.environ.get("UDEMY_DL_FAULTS_MYSQL_DB", "udemy_dl_faults")
"""The fault suite's database. A second fault run at the same time (it holds the MariaDB lock of that
name) gets a private `udemy_dl_faults_<pid>`, dropped at its end, so two runs never share a table."""
HOSTS_DB = os.environ.get("UDEMY_DL_HOSTS_MYSQL_DB", "udemy_dl_hosts")
"""The multi-host suite's database."""


def database_url(database: str, port: int = MYSQL_PORT, host: str = MYSQL_HOST) -> str:
    """DATABASE_URL for *database* (on a relay's *port*, a host's name for the server...)."""
    return f"mysql://{MYSQL_USER}@{host}:{port}/{database}"


TEST_URL = database_url(TEST_DB)


def connect(database: str | None = None) -> Any:
    """A root connection (autocommit), to *database* or to none."""
    import mysql.connector

    options: dict[str, Any] = {"database": database} if database else {}
    return mysql.connector.connect(
        host=MYSQL_HOST,
        port=MYSQL_PORT,
        user=MYSQL_USER,
        password="",
        connection_timeout=5,
        autocommit=True,
        **options,
    )


def mysql_query(statement: str, params: tuple[Any, ...] = (), database: str | None = TEST_DB) -> list[tuple[Any, ...]]:
    """Run one statement (in *database*) and return its rows, if it has any."""
    conn = connect(database)
    try:
        cursor = conn.cursor()
        cursor.execute(statement, params)
        fetched: Any = cursor.fetchall() if cursor.description else []
        cursor.close()
        return [tuple(row) for row in fetched]
    finally:
        conn.close()


def mysql_admin(statement: str) -> None:
    """Run one statement as the MariaDB root user (no database selected)."""
    mysql_query(statement, database=None)


def require_database(database: str) -> str:
    """Create *database* if it is not there; skip (or, under CI, fail) when MariaDB does not answer."""
    try:
        mysql_admin(f"CREATE DATABASE IF NOT EXISTS {database} CHARACTER SET utf8mb4")
    except Exception as exc:
        unavailable("MariaDB", f"{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}: {type(exc).__name__}: {exc}")
    return database


def drop_tasks_table(database: str = TEST_DB) -> None:
    mysql_admin(f"DROP TABLE IF EXISTS {database}.download_tasks")


@contextlib.contextmanager
def fresh_store(database: str, create: Callable[[], object] | None = None) -> Iterator[MySQLStore]:
    """A MySQLStore on a new download_tasks table in *database* (made by *create*, else by the store
    itself), dropped on the way out."""
    drop_tasks_table(database)
    if create is not None:
        create()
    store = MySQLStore(database_url(database))
    if create is None:
        store.init_schema()
    try:
        yield store
    finally:
        store.close()
        drop_tasks_table(database)


@contextlib.contextmanager
def named_lock(name: str) -> Iterator[bool]:
    """Try MariaDB's named lock *name* (no wait); held until the block ends. Yields whether it was had."""
    try:
        holder = connect()
    except Exception as exc:
        unavailable("MariaDB", f"{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}: {type(exc).__name__}: {exc}")
    cursor = holder.cursor()
    try:
        cursor.execute("SELECT GET_LOCK(%s, 0)", (name,))
        (got,) = cursor.fetchone()
        yield got == 1
    finally:
        cursor.close()
        holder.close()  # releases the lock
