"""The bench's own corner of Redis (one database number) and of MariaDB (one database and one user).

Workers connect to MariaDB as a dedicated user, so the server's per-user statistics
(INFORMATION_SCHEMA.USER_STATISTICS, switched on for the run) count their statements alone:
the bench's own queries go through root and are never mixed in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from redis import Redis

from .support import BIN, BenchError, clean_env, run, say

BENCH_PREFIX = "udemy_dl_bench_"
"""The run's database and user are this prefix and the bench's PID: two runs at once (other
checkouts on the same MariaDB) keep apart, and each counts its own workers' statements."""


@dataclass(frozen=True)
class SqlCount:
    """Statements and connections of the bench user so far (server counters)."""

    select: int
    update: int
    other: int
    connections: int

    @property
    def statements(self) -> int:
        return self.select + self.update + self.other

    def __sub__(self, earlier: SqlCount) -> SqlCount:
        return SqlCount(
            self.select - earlier.select,
            self.update - earlier.update,
            self.other - earlier.other,
            self.connections - earlier.connections,
        )


class BenchRedis:
    """A dedicated Redis database, flushed before and after the run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)

    def setup(self) -> str:
        try:
            self.connection.ping()
        except Exception as exc:
            raise BenchError(f"Redis at {self.url} does not answer: {exc}") from exc
        self.connection.flushdb()
        info: dict[str, Any] = self.connection.info("server")  # type: ignore[assignment]
        return str(info.get("redis_version", "?"))

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.flushdb()
        self.connection.close()


class BenchMariaDB:
    """Database `udemy_dl_bench` and user `udemy_dl_bench`, created for the run and dropped after it."""

    def __init__(self, admin_url: str) -> None:
        parts = urlsplit(admin_url)
        if parts.scheme != "mysql" or not parts.hostname:
            raise BenchError(f"--mysql must look like mysql://user[:password]@host[:port], got {admin_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 3306
        self.admin_user = parts.username or "root"
        self.admin_password = parts.password or ""
        self.password = secrets.token_hex(16)
        self.name = f"{BENCH_PREFIX}{os.getpid()}"
        """The run's database, and the user its workers connect as."""
        self.conn: Any = None
        self.userstat_was: str | None = None
        self.version = "?"

    # -- URLs ---------------------------------------------------------------------------------

    @property
    def worker_url(self) -> str:
        """DATABASE_URL for the workers: the bench user, whose statements are counted."""
        return f"mysql://{self.name}:{self.password}@{self.host}:{self.port}/{self.name}"

    @property
    def admin_db_url(self) -> str:
        """DATABASE_URL for the bench's own rows and polls: the admin user, not counted."""
        auth = quote(self.admin_user, safe="") + (
            f":{quote(self.admin_password, safe='')}" if self.admin_password else ""
        )
        return f"mysql://{auth}@{self.host}:{self.port}/{self.name}"

    # -- life cycle ---------------------------------------------------------------------------

    def _query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        try:
            cursor.execute(statement, params)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()

    def setup(self, workdir: Path) -> str:
        import mysql.connector

        try:
            self.conn = mysql.connector.connect(
                host=self.host,
                port=self.port,
                user=self.admin_user,
                password=self.admin_password,
                autocommit=True,
                connection_timeout=10,
            )
        except Exception as exc:
            raise BenchError(f"MariaDB at {self.host}:{self.port} does not answer: {exc}") from exc
        self.version = str(self._query("SELECT VERSION()")[0][0])
        for name in self._left_behind():
            self._drop(name)
        self._query(f"CREATE DATABASE {self.name}")
        for host in ("127.0.0.1", "localhost", "::1"):
            self._query(f"CREATE USER '{self.name}'@'{host}' IDENTIFIED BY %s", (self.password,))
            self._query(f"GRANT ALL PRIVILEGES ON {self.name}.* TO '{self.name}'@'{host}'")
        self._enable_userstat()
        run(
            [str(BIN / "udemy-dl"), "db", "init"],
            env=clean_env(DATABASE_URL=self.worker_url, REDIS_URL="redis://127.0.0.1:1/0"),
            cwd=workdir,  # no operator's .env in the checkout may change what the bench runs against
        )
        return self.version

    def _enable_userstat(self) -> None:
        rows = self._query("SELECT @@GLOBAL.userstat")
        self.userstat_was = str(rows[0][0]) if rows else None
        if self.userstat_was not in ("1", "ON"):
            try:
                self._query("SET GLOBAL userstat = ON")
            except Exception as exc:
                raise BenchError(
                    f"cannot switch on MariaDB's userstat (needed to count the workers' statements): {exc}"
                ) from exc

    def _drop(self, name: str) -> None:
        self._query(f"DROP DATABASE IF EXISTS {name}")
        for host in ("127.0.0.1", "localhost", "::1"):
            self._query(f"DROP USER IF EXISTS '{name}'@'{host}'")

    def _runs(self) -> dict[str, bool]:
        """The bench databases on the server, each with whether the run that made it still runs
        (on this host: the name carries its PID)."""
        rows = self._query("SHOW DATABASES LIKE %s", (BENCH_PREFIX.replace("_", "\\_") + "%",))
        runs = {}
        for (name,) in rows:
            pid = str(name).removeprefix(BENCH_PREFIX)
            runs[str(name)] = pid.isdigit() and _pid_runs(int(pid))
        return runs

    def _left_behind(self) -> list[str]:
        """Databases of runs that ended without cleaning up (killed), and this run's own name."""
        return [name for name, running in self._runs().items() if not running or name == self.name] + [self.name]

    def teardown(self) -> None:
        if self.conn is None:
            return
        try:
            self._drop(self.name)
            others = [name for name, running in self._runs().items() if running]
            if self.userstat_was is not None and self.userstat_was not in ("1", "ON") and not others:
                self._query("SET GLOBAL userstat = OFF")  # unless another run still counts with it
        except Exception as exc:
            say(f"cleanup: MariaDB: {exc}")
        finally:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    # -- counters -----------------------------------------------------------------------------

    def count(self) -> SqlCount:
        rows = self._query(
            "SELECT SELECT_COMMANDS, UPDATE_COMMANDS, OTHER_COMMANDS, TOTAL_CONNECTIONS "
            "FROM information_schema.USER_STATISTICS WHERE USER = %s",
            (self.name,),
        )
        if not rows:
            return SqlCount(0, 0, 0, 0)
        select, update, other, connections = (int(value) for value in rows[0])
        return SqlCount(select, update, other, connections)

    def settled_count(self) -> SqlCount:
        """count(), once the server has booked the last statements (it does so just after answering them)."""
        time.sleep(0.3)  # MariaDB updates USER_STATISTICS after the reply is sent; not a result synchronisation
        return self.count()

    def setup_statements_per_connection(self, connections: int = 3) -> int:
        """Statements the driver adds to a connection's first parameterised query, measured on a few connections.

        mysql-connector sends SET NAMES, autocommit and time_zone on connecting, and reads
        @@session.sql_mode before it first escapes a parameter: each connection makes one
        `store.get()` (itself one SELECT) and the rest is set-up.
        """
        from udemy_dl.store import open_store

        before = self.settled_count()
        for _ in range(connections):
            store = open_store(self.worker_url)
            store.get(0)
            store.close()
        delta = self.settled_count() - before
        if delta.connections != connections:
            raise BenchError(f"calibration opened {connections} connections, the server counted {delta.connections}")
        return round((delta.statements - connections) / connections)


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
